"""Issue 21: the time-budget schedule (fake clock), amp auto's probe (fake timer), EMA and
precise BN, and a short time-budgeted run that resumes."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from coopseg.config import ConfigError, config_from_dict
from coopseg.engine import precision
from coopseg.engine.distributed import DistInfo
from coopseg.engine.ema import build_ema, precise_bn
from coopseg.engine.schedule import TrainingClock, schedule_done, time_poly_lambda
from coopseg.engine.train import Trainer

SINGLE = DistInfo(0, 1, 0, torch.device("cpu"))


class FakeClock:
    """Advances by ``tick`` seconds at every reading."""

    def __init__(self, tick: float = 1.0) -> None:
        self.now, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


def test_time_schedule_decays_by_training_seconds_only() -> None:
    clock = TrainingClock(FakeClock(2.0))
    factor = time_poly_lambda(clock, budget_s=10.0, power=1.0, warmup_s=4.0)
    t = config_from_dict({"train": {"schedule": "time", "time_budget_s": 10.0}}).train
    assert factor(0) == 0.0  # warm-up starts from 0
    clock.start()
    assert clock.stop() == 2.0  # one step of 2 s
    assert factor(123) == pytest.approx(0.5 * 0.8)  # the iteration argument is ignored
    clock.clock()  # time between steps (validation, checkpoints): not counted
    clock.clock()
    clock.start()
    clock.stop()
    assert clock.elapsed_s == 4.0 and factor(0) == pytest.approx(0.6)
    assert not schedule_done(t, 10**6, clock)  # train.iterations does not stop it
    clock.elapsed_s = 10.0
    assert factor(0) == 0.0 and schedule_done(t, 0, clock)


def test_schedule_keys_are_checked() -> None:
    with pytest.raises(ConfigError, match="train.time_budget_s is not set"):
        config_from_dict({"train": {"schedule": "time"}})
    with pytest.raises(ConfigError, match="use train.warmup_s instead"):
        config_from_dict(
            {"train": {"schedule": "time", "time_budget_s": 9, "warmup_iterations": 5}}
        )
    with pytest.raises(ConfigError, match="train.schedule: expected one of"):
        config_from_dict({"train": {"schedule": "epochs"}})
    with pytest.raises(ConfigError, match="train.ema_decay: expected a number in"):
        config_from_dict({"train": {"ema_decay": 1.0}})
    # the iteration schedule ignores the time keys: one --set switches a config
    assert config_from_dict({"train": {"time_budget_s": 9}}).train.schedule == "iterations"


def fake_step(seconds: dict[torch.dtype | None, float], timer: FakeClock):
    def step(dtype: torch.dtype | None) -> None:
        timer.now += seconds[dtype]

    return step


@pytest.mark.parametrize(
    ("bf16_s", "expected"), [(0.5, torch.bfloat16), (0.9375, None), (1.5, None)]
)
def test_probe_takes_bf16_only_when_clearly_faster(bf16_s, expected) -> None:
    timer = FakeClock(tick=0.0)
    step = fake_step({None: 1.0, torch.bfloat16: bf16_s}, timer)
    choice, fp32_s, measured = precision.probe_precision(step, timer=timer)
    assert (choice, fp32_s, measured) == (expected, 1.0, bf16_s)


def test_amp_auto_probes_only_cpus_with_native_bf16() -> None:
    cpu = torch.device("cpu")
    timer = FakeClock(tick=0.0)
    calls = []

    def make_step():
        calls.append(1)
        return fake_step({None: 0.2, torch.bfloat16: 0.1}, timer)

    dtype, record, line = precision.training_precision(
        "auto", cpu, make_step, SINGLE, timer=timer, native_bf16=True
    )
    assert dtype is torch.bfloat16 and record["amp_probe"] == {"fp32_ms": 200.0, "bf16_ms": 100.0}
    assert line.startswith("amp auto: bf16 (probe on this CPU") and "bf16 100 ms/step" in line
    dtype, record, line = precision.training_precision(
        "auto", cpu, make_step, SINGLE, native_bf16=False
    )
    assert dtype is None and record["precision"] == "fp32" and "emulated" in line
    assert precision.training_precision("bf16", cpu, make_step, SINGLE)[0] is torch.bfloat16
    assert precision.training_precision("none", cpu, make_step, SINGLE)[:2] == (
        None,
        {"amp": "none", "precision": "fp32"},
    )
    assert len(calls) == 1  # only the native-bf16 auto case built a probe


def test_ema_is_the_hand_computed_average() -> None:
    model = nn.Linear(2, 1, bias=False)
    ema = build_ema(model, decay=0.75)
    expected = None
    for value in (1.0, 3.0, -2.0, 5.0):
        with torch.no_grad():
            model.weight.fill_(value)
        ema.update_parameters(model)
        expected = value if expected is None else 0.75 * expected + 0.25 * value
    # 1 -> 0.75*1 + 0.25*3 = 1.5 -> 0.625 -> 1.71875
    assert expected == pytest.approx(1.71875)
    torch.testing.assert_close(ema.module.weight, torch.full((1, 2), expected))
    assert model.weight[0, 0].item() == 5.0  # the trained weights are untouched


def test_precise_bn_gives_the_batch_statistics() -> None:
    bn = nn.BatchNorm2d(3, momentum=0.1)
    model = nn.Sequential(nn.Identity(), bn).eval()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 3, 5, 5, generator=g) * (i + 1) + i for i in range(3)]
    assert precise_bn(model, iter(batches), SINGLE) == 1
    means = torch.stack([b.mean((0, 2, 3)) for b in batches])
    variances = torch.stack([b.transpose(0, 1).reshape(3, -1).var(1) for b in batches])
    torch.testing.assert_close(bn.running_mean, means.mean(0))  # = mean over all pixels
    torch.testing.assert_close(bn.running_var, variances.mean(0))
    assert bn.momentum == 0.1 and not model.training  # restored


def test_time_budget_run_resumes_with_ema_and_precise_bn(make_config) -> None:
    """A fake clock makes every step last 1 s: a 4 s budget is 4 iterations whatever the
    machine; a run stopped after one step resumes at 1 s of training and ends at 4."""
    train = {
        "schedule": "time",
        "time_budget_s": 4.0,
        "poly_power": 1.0,
        "val_interval": 0,
        "checkpoint_interval": 0,
        "ema_decay": 0.5,
        "precise_bn_batches": 1,
        "lr": 0.01,
    }
    first = Trainer(
        make_config(name="budget", train={**train, "max_time_s": 1e-9}), show_progress=False
    )
    first.train_clock.clock = FakeClock()
    assert first.train().iteration == 1
    resumed = Trainer(make_config(name="budget", train=train), resume=True, show_progress=False)
    resumed.train_clock.clock = FakeClock()
    assert resumed.train_clock.elapsed_s == 1.0 and resumed.ema.n_averaged.item() == 1
    result = resumed.train()
    assert (result.iteration, result.train_s) == (4, 4.0)
    assert resumed.ema.n_averaged.item() == 4

    records = [
        json.loads(line) for line in (result.run_dir / "log.jsonl").read_text().split("\n")[:-1]
    ]
    start = [r for r in records if r["kind"] == "start"]
    assert start[-1]["schedule"] == "time" and start[-1]["time_budget_s"] == 4.0
    assert start[-1]["precision"] == "fp32"
    lrs = [(r["step"], r["lr"]) for r in records if r["kind"] == "train"]
    # the lr set at the end of step k reads the clock as of step k - 1: 0.01 (1 - (k-1)/4)
    assert lrs == [(k, pytest.approx(0.01 * (1 - (k - 1) / 4))) for k in (1, 2, 3, 4)]

    from coopseg.engine.checkpoint import load_model

    saved, _, _ = load_model(result.run_dir / "checkpoints" / "final.safetensors")
    ema_weights = resumed.ema.module.state_dict()
    for key, value in saved.state_dict().items():
        torch.testing.assert_close(value, ema_weights[key], msg=key)  # the EMA is saved
    raw = resumed.model.state_dict()
    assert any(not torch.equal(raw[k], ema_weights[k]) for k in raw if raw[k].is_floating_point())

    # amp auto's probe steps a copy: the run's weights stay as they are
    step = resumed.probe_step()
    step(None)
    step(torch.bfloat16)
    for key, value in resumed.model.state_dict().items():
        assert torch.equal(value, raw[key]), key


def test_demo_budget_bench_skips_variants_it_has(tmp_path, monkeypatch) -> None:
    """The benchmark pass is resumable per variant (each takes ~5 min)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "demo_budget.py"
    spec = importlib.util.spec_from_file_location("demo_budget", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    ran = []

    def fake_run(name, overrides, val_interval, workdir):
        ran.append((name, overrides))
        curve = [{"iteration": 9, "wall_s": 2.0, "train_s": 1.5, "miou": 0.5}]
        return {"variant": name, "precision": "fp32", "schedule": "time", "iterations": 9,
                "train_s": 1.5, "wall_s": 2.0, "final_miou": 0.5, "min_object_iou": 0.25,
                "curve": curve}  # fmt: skip

    monkeypatch.setattr(bench, "run_variant", fake_run)
    out = tmp_path / "r.json"
    assert bench.main(["--json", str(out), "--variants", "fp32-time", "bf16-iterations"]) == 0
    assert ran[1] == (
        "bf16-iterations",
        ["train.amp=bf16", "train.schedule=iterations", "train.iterations=780",
         "train.precise_bn_batches=0"],
    )  # fmt: skip
    assert bench.main(["--json", str(out)]) == 0  # the two done are skipped
    assert [name for name, _ in ran[2:]] == [
        n for n in bench.variants(bench.SETTINGS) if n not in ("fp32-time", "bf16-iterations")
    ]
    table = out.with_suffix(".md").read_text()
    assert "| bf16-iterations | fp32 | time | 9 | 1.5 | 2.0 | 50.0 | 25.0 | 50.0 (2) |" in table


def test_extending_a_time_budget_continues_the_decay() -> None:
    from coopseg.engine.loop import TrainingError, continue_schedule
    from coopseg.engine.schedule import build_scheduler

    old = config_from_dict({"train": {"schedule": "time", "time_budget_s": 4, "poly_power": 1}})
    new = config_from_dict({"train": {"schedule": "time", "time_budget_s": 8, "poly_power": 1}})
    clock = TrainingClock()
    clock.elapsed_s = 4.0  # the finished run's training time, restored from last.pt
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = build_scheduler(optimizer, new.train, clock)
    saved = old.to_dict()["train"]
    note = continue_schedule(scheduler, optimizer, saved, new.train, 40, clock.elapsed_s)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05)  # 0.1 x (1 - 4/8)
    assert "train.time_budget_s 4.0 -> 8.0" in note and "from 4.0 s of training" in note
    assert continue_schedule(scheduler, optimizer, saved, old.train, 40, 4.0) == ""
    with pytest.raises(TrainingError, match="time_budget_s=3 is below the checkpoint's 4.0 s"):
        short = config_from_dict({"train": {"schedule": "time", "time_budget_s": 3}})
        continue_schedule(scheduler, optimizer, saved, short.train, 40, 4.0)
    # a checkpoint from before train.schedule existed reads as the iteration schedule
    legacy = {k: v for k, v in config_from_dict({}).to_dict()["train"].items() if k != "schedule"}
    assert continue_schedule(scheduler, optimizer, legacy, config_from_dict({}).train, 3) == ""
