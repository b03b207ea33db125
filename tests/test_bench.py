"""The miniature benches: statistics, row configs, reports, and member init pairing.

Training is faked (``runner.run_one``) except in one tiny real run, so the file stays fast.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from coopseg.bench import coop, dfdam, jointseg, runner
from coopseg.bench.stats import mean_std, paired_difference, t_critical
from coopseg.config import Config, ConfigError
from coopseg.models import create_model

# -- statistics --------------------------------------------------------------------


def test_paired_difference_on_hand_made_numbers() -> None:
    d = paired_difference([31.0, 33.0, 32.0], [30.0, 31.0, 30.0], "cross top − ensemble fused")
    assert d["diffs"] == [1.0, 2.0, 2.0] and d["n"] == 3
    assert d["mean"] == pytest.approx(5 / 3)
    assert d["std"] == pytest.approx(math.sqrt(1 / 3))  # sample std of 1, 2, 2
    assert d["sem"] == pytest.approx(math.sqrt(1 / 3) / math.sqrt(3))
    assert d["t"] == pytest.approx(5.0)  # (5/3) / (1/3)
    assert d["t_critical"] == pytest.approx(4.303)
    assert d["distinguishable"] is True
    assert "distinguishable from seed noise, cross top is higher" in d["sentence"]
    assert "+1.7 ± 0.6 points over 3 seeds (per seed +1.0, +2.0, +2.0)" in d["sentence"]

    noisy = paired_difference([30.0, 31.0, 32.0], [29.0, 32.0, 31.5])  # +1, -1, +0.5
    assert noisy["distinguishable"] is False
    assert noisy["t"] == pytest.approx(noisy["mean"] / (noisy["std"] / math.sqrt(3)))
    assert "not distinguishable from seed noise" in noisy["sentence"]

    one = paired_difference([30.0], [28.0])
    assert one["distinguishable"] is None and "one seed" in one["sentence"]
    lower = paired_difference([28.0, 28.0], [30.0, 30.0], "a − b")  # no spread at all
    assert lower["t"] == -math.inf and lower["distinguishable"] is True
    assert "a is lower" in lower["sentence"]
    assert paired_difference([1.0, 2.0], [1.0, 2.0])["distinguishable"] is False
    with pytest.raises(ValueError, match="pair them by seed"):
        paired_difference([1.0, 2.0], [1.0])
    assert t_critical(1) == pytest.approx(12.706) and t_critical(100) == pytest.approx(1.984)
    assert mean_std([30.0, 40.0]) == {"mean": 35.0, "std": pytest.approx(7.0710678)}


# -- coop: row configs ----------------------------------------------------------------


def test_coop_rows_have_equal_budgets_and_their_own_model_keys() -> None:
    configs = {row: coop.bench_config(row, 1) for row in coop.ROWS}
    base = configs["ensemble"]
    mutual = configs["mutual"].train  # mutual learning: the same budget plus its KL term
    assert (mutual.mutual_weight, mutual.mutual_temperature) == (1.0, 1.0)
    assert dataclasses.replace(mutual, mutual_weight=0.0) == base.train
    # Distillation: the same budget plus its teacher, the same seed's cross pair's best
    # top-network checkpoint; the student is the top member alone (the single network).
    distilled = configs["distilled"]
    assert distilled.train.teacher == str(
        Path("runs/bench-coop/runs/cross-seed1/checkpoints/best-top.safetensors")
    )
    assert distilled.train.teacher_output == "top"
    unset = {"teacher": None, "teacher_output": None}
    assert dataclasses.replace(distilled.train, **unset) == base.train
    assert distilled.model["members"] == base.model["members"][:1]
    assert distilled.model["preset"] == "single"
    for row, cfg in configs.items():
        if row not in ("mutual", "distilled"):
            assert cfg.train == base.train, row  # equal budgets
        assert cfg.data == base.data, row
        assert cfg.seed == 1 and cfg.name == f"{row}-seed1"
        members = cfg.model["members"]
        assert len(members) == len(coop.ROWS[row].backbones) and cfg.model["link_init"] == "zero"
        assert [m["init_seed"] for m in members] == [1000, 1001][: len(members)]
        for m in members:  # the papers' separable DeepLabv3+, ASPP on an 8x8 map
            assert m["pretrained"] is True and m["separable"] is True
            assert m["output_stride"] == 16 and m["aspp_rates"] == [1, 2, 3]
    quick = coop.MODES["quick"]
    assert base.data.scene_size == 128 and base.data.scene_size // 16 == 8
    assert base.train.iterations == quick["iterations"]
    assert base.train.val_interval == quick["val_interval"] > 0  # best checkpoint is scored
    assert base.train.frozen_stages == quick["frozen_stages"]
    assert coop.MODES["register"]["val_scenes"] == 500
    assert configs["cross-detach"].model["preset"] == "cross"
    assert configs["cross-detach"].model["detach"] is True
    assert "detach" not in configs["cross"].model
    for row in ("cross-no-extra", "oneway", "oneway-same", "oneway-multiple"):
        model = configs[row].model
        assert model["connection1"] is False and model["connection2"] is False, row
    assert "connection1" not in configs["cross"].model
    lite0, lite2 = "tf_efficientnet_lite0", "tf_efficientnet_lite2"
    for row in ("ensemble", "cross", "cross-no-extra", "oneway", "cross-detach", "mutual"):
        assert [m["backbone"] for m in configs[row].model["members"]] == [lite0, lite2], row
    for row in ("ensemble-same", "oneway-same", "oneway-multiple", "cross-same"):
        assert [m["backbone"] for m in configs[row].model["members"]] == [lite0, lite0], row
    assert configs["ensemble"].model["fuse"] == "sum_logits"  # the cross paper's ensemble

    # Overrides reach every row alike.
    a = coop.bench_config("ensemble", 0, settings={"iterations": 5, "scene_size": 32})
    b = coop.bench_config("cross", 0, settings={"iterations": 5, "scene_size": 32})
    assert a.train == b.train and a.train.iterations == 5 and b.data.crop_size == [32, 32]
    c = coop.bench_config("cross", 0, member={"aspp_channels": 32}, overrides=["train.lr=0.01"])
    assert all(m["aspp_channels"] == 32 for m in c.model["members"]) and c.train.lr == 0.01
    with pytest.raises(ValueError, match="unknown bench setting"):
        coop.bench_config("ensemble", 0, settings={"iterationz": 5})
    with pytest.raises(ConfigError, match="init_seed"):
        coop.bench_config("ensemble", 0, member={"init_seed": -1})


def test_a_member_starts_like_the_single_network_of_its_seed() -> None:
    def build(row: str) -> torch.nn.Module:
        cfg = coop.bench_config(row, 2, member={"pretrained": False})
        kwargs = {k: v for k, v in cfg.model.items() if k != "arch"}
        torch.manual_seed(99)  # the global RNG must not matter
        return create_model("cooperative", **kwargs)

    spec = coop.bench_config("ensemble", 2, member={"pretrained": False}).model["members"][0]
    torch.manual_seed(spec["init_seed"])
    alone = {k: v for k, v in spec.items() if k not in ("arch", "name", "init_seed")}
    single = create_model("deeplabv3plus", **alone, num_classes=11).state_dict()
    ensemble, cross = build("ensemble"), build("cross")
    state = torch.get_rng_state()
    for name, model in (("ensemble", ensemble), ("cross", cross)):
        top = model.members["top"].state_dict()
        shared = [k for k in single if top[k].shape == single[k].shape]
        assert all(torch.equal(top[k], single[k]) for k in shared), name
        if name == "ensemble":
            assert len(shared) == len(single)  # no link: identical from end to end
    widened = [k for k in single if cross.members["top"].state_dict()[k].shape != single[k].shape]
    assert "classifier.weight" in widened and "decoder.reduce.0.weight" not in widened
    assert "decoder.conv2.3.weight" in widened  # the pointwise conv after a link
    # The members' seeds leave the global RNG alone.
    torch.manual_seed(99)
    assert torch.equal(torch.get_rng_state(), state)


# -- coop: reports, with training faked ----------------------------------------------

FAKE_MIOU = {  # (row, output) -> val mIoU % at seed 0; each seed adds 1 point
    ("ensemble", "fused"): 32.0,
    ("ensemble", "top"): 30.0,
    ("ensemble", "bottom"): 30.5,
    ("cross", "top"): 34.0,
    ("cross", "bottom"): 33.0,
    ("cross", "fused"): 34.5,
    ("oneway", "top"): 29.0,
    ("oneway", "bottom"): 10.0,  # this row never left the plateau
    ("oneway", "fused"): 25.0,
}


def fake_run(calls: list[str]):
    def run_one(cfg: Config, keep_checkpoints: bool = False) -> dict[str, Any]:
        calls.append(cfg.name)
        row = cfg.name.rsplit("-seed", 1)[0]
        wobble = {0: 0.0, 1: 1.0, 2: 0.5}[cfg.seed]  # seed noise shared by every row
        miou = {
            out: (v + wobble + (0.3 * cfg.seed if row == "cross" else 0)) / 100
            for (r, out), v in FAKE_MIOU.items()
            if r == row
        }
        members = len(cfg.model.get("members", [None]))
        scores = {
            ("top" if k == "out" else k): {"final": 100 * v - 0.5, "best": 100 * v}
            for k, v in miou.items()
        }
        return {
            "miou": miou,
            "scores": scores,
            "params_m": 3.68 * members,
            "gmacs": 0.06 * members,
            "train_s": 100.0 * members + cfg.seed,
            "step_s": 0.16 * members,
        }

    return run_one


def test_coop_bench_writes_markdown_json_and_chart(tmp_path: Path, monkeypatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(runner, "run_one", fake_run(calls))
    rows = ("ensemble", "cross-no-paths", "oneway", "cross")
    report = coop.run_coop_bench(seeds=(0, 1, 2), rows=rows, out_dir=tmp_path, jobs=1)

    assert not any(c.startswith("cross-no-paths") for c in calls)  # reuses the ensemble's
    assert len(calls) == 3 * 3
    table = report["table"]
    assert list(table) == list(rows)
    assert table["ensemble"]["miou"]["top"]["mean"] == pytest.approx(30.5)  # 30, 31, 30.5
    assert table["cross"]["compared"] == ["top", "bottom"]
    assert table["ensemble"]["compared"] == ["fused", "top", "bottom"]
    assert table["oneway"]["compared"] == ["bottom"]
    assert table["cross-no-paths"]["same_as"] == "ensemble"
    assert table["cross-no-paths"]["miou"] == table["ensemble"]["miou"]
    assert table["oneway"]["plateau"] and not table["cross"]["plateau"]

    diffs = {d["label"]: d for d in report["comparisons"]}
    cross_single = diffs["cross top − ensemble top"]  # the ensemble's top is the single net
    assert cross_single["diffs"] == pytest.approx([4.0, 4.3, 4.6])
    assert cross_single["distinguishable"] is True
    assert diffs["cross bottom − ensemble fused"]["mean"] == pytest.approx(1.3)
    assert diffs["cross bottom − oneway bottom"]["mean"] == pytest.approx(23.3)
    assert "cross top − cross-no-extra top" not in diffs  # that row did not run

    text = (tmp_path / "coop.md").read_text()
    assert "| cross | lite0 + lite2 | **34.8 ± 0.7** | **33.8 ± 0.7** | 35.3 ± 0.7 |" in text
    assert "= ensemble" in text  # cross-no-paths' runs are the ensemble's
    assert "**on the plateau** (< 15 %: seed 0 bottom, seed 1 bottom, seed 2 bottom)" in text
    assert "**Rows on the plateau**" in text and "oneway" in text
    assert "150 iterations, batch 8 per member" in text  # the budget, stated
    assert "cross top − ensemble top: +4.3 ± 0.3 points over 3 seeds" in text
    assert "distinguishable from seed noise, cross top is higher" in text
    assert "![val mIoU per row and output](coop.png)" in text
    saved = json.loads((tmp_path / "coop.json").read_text())
    assert saved["table"]["cross"]["miou"]["top"]["mean"] == pytest.approx(34.8)
    assert [r["seed"] for r in saved["runs"]["cross"]] == [0, 1, 2]
    assert saved["settings"]["iterations"] == 150 and saved["rows"]["cross"]["preset"] == "cross"
    assert (tmp_path / "coop.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_stop_on_plateau_ends_after_the_first_seed(tmp_path: Path, monkeypatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(runner, "run_one", fake_run(calls))
    report = coop.run_coop_bench(
        seeds=(0, 1), rows=("ensemble", "oneway"), out_dir=tmp_path, stop_on_plateau=True
    )
    assert sorted(calls) == ["ensemble-seed0", "oneway-seed0"] and report["seeds"] == [0]
    assert "Every row learned" not in (tmp_path / "coop.md").read_text()
    one = {"cross": [{"miou": {"top": 0.3}, "params_m": 1, "gmacs": 1, "train_s": 1, "seed": 0}]}
    assert coop.summarise(one)["cross"]["plateau"] is False  # 30 % >= 15 %
    assert coop.summarise(one, plateau=35.0)["cross"]["plateau"] is True


# -- a real run: trainer integration, caching -----------------------------------------


def test_real_tiny_runs_are_measured_and_then_reused(
    tiny_scenes: Path, tmp_path: Path, monkeypatch
) -> None:
    settings = {
        "iterations": 2,
        "scene_size": 64,
        "train_scenes": 48,
        "val_scenes": 16,
        "val_interval": 1,
    }
    small = {"aspp_channels": 16, "decoder_channels": 16, "low_level_channels": 8}
    kwargs = {
        "seeds": (0,),
        "rows": ("ensemble", "oneway-same"),
        "out_dir": tmp_path,
        "settings": settings,
        "member": {**small, "backbone": "resnet18", "pretrained": False},
        "overrides": [f"data.root={tiny_scenes}", "device=cpu"],
    }
    report = coop.run_coop_bench(**kwargs)
    single, pair = report["runs"]["ensemble"][0], report["runs"]["oneway-same"][0]
    assert set(pair["miou"]) == {"fused", "top", "bottom"}
    for name, score in pair["scores"].items():  # two validation passes: best and final
        assert score["best"] >= score["final"] and score["best_iteration"] in (1, 2), name
        assert score["final"] == pytest.approx(100 * pair["miou"][name])
    assert pair["iterations"] == 2 and 0 < pair["train_s"] <= pair["total_s"]
    assert pair["gmacs"] > single["gmacs"] > 0 and pair["params_m"] > single["params_m"]
    run_dir = tmp_path / "runs" / "oneway-same-seed0"
    assert (run_dir / runner.RESULT_FILE).exists() and not (run_dir / "checkpoints").exists()

    def no_training(*args: Any, **kw: Any) -> dict[str, Any]:
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(runner, "run_one", no_training)
    again = coop.run_coop_bench(**kwargs)
    assert again["runs"]["oneway-same"][0]["miou"] == pair["miou"]
    changed = {**kwargs, "settings": {**settings, "iterations": 3}}
    with pytest.raises(AssertionError, match="trained again"):
        coop.run_coop_bench(**changed)  # another config: not the cached result


# -- dfdam ---------------------------------------------------------------------------


def test_dfdam_rows_share_the_recipe_and_differ_in_fusion() -> None:
    configs = {row: dfdam.bench_config(row, 0) for row in dfdam.ROWS}
    base = configs["deeplabv3plus"]
    assert base.model["arch"] == "deeplabv3plus" and base.model["output_stride"] == 16
    assert base.model["aspp_rates"] == [1, 2, 3] and "output_stride" not in configs["dafm"].model
    for row, cfg in configs.items():
        assert cfg.train == base.train and cfg.data == base.data, row
        assert cfg.model["backbone"] == "tf_efficientnet_lite0" and cfg.model["pretrained"]
        if row != "deeplabv3plus":
            assert cfg.model["arch"] == "dfdam" and cfg.model["fusion"] == row
    assert base.train == coop.bench_config("ensemble", 0).train  # one recipe for both benches
    roles = dfdam.stage_roles()
    assert roles == {
        "layer1": {"module": "blocks.1", "stride": 4, "channels": 24},
        "layer3": {"module": "blocks.4", "stride": 16, "channels": 112},
        "layer4": {"module": "blocks.6", "stride": 32, "channels": 320},
    }


def test_dfdam_bench_report(tmp_path: Path, monkeypatch) -> None:
    values = {"deeplabv3plus": 31.0, "sum": 30.0, "dafm": 32.0, "dafm+2dpam": 33.0}

    def run_one(cfg: Config, keep_checkpoints: bool = False) -> dict[str, Any]:
        row = cfg.name.rsplit("-seed", 1)[0]
        miou = (values[row] + cfg.seed * (0.5 if row == "dafm" else 0.4)) / 100
        return {
            "miou": {"out": miou},
            "params_m": 3.2,
            "gmacs": 0.07,
            "train_s": 130.0,
            "step_s": 0.16,
        }

    monkeypatch.setattr(runner, "run_one", run_one)
    costs = {
        r: {"params_m": 3.2, "gmacs_scene": 0.07, "gmacs_paper": 3.5, "latency_ms": 40.0}
        for r in dfdam.ROWS
    }
    monkeypatch.setattr(dfdam, "measure_costs", lambda *a, **k: costs)
    report = dfdam.run_dfdam_bench(seeds=(0, 1, 2), out_dir=tmp_path, jobs=1)
    diffs = {d["label"]: d for d in report["comparisons"]}
    assert list(diffs) == [
        "dafm − sum",
        "dafm+2dpam − dafm",
        "dafm+2dpam − sum",
        "dafm+2dpam − deeplabv3plus",
    ]
    assert diffs["dafm − sum"]["diffs"] == pytest.approx([2.0, 2.1, 2.2])
    text = (tmp_path / "dfdam.md").read_text()
    assert "instead of the paper's ResNet-50/101" in text
    assert "`blocks.1` (stride 4, 24 ch) as layer1" in text
    assert "| DF-DAM dafm+2dpam | 33.4 ± 0.4 | 3.20 | 0.070 | 3.50 | 40.0 | 130 | ok |" in text
    assert "ResNet-50: sum 68.2, DAFM 73.7, DAFM + 2DPAM 74.6" in text
    assert (tmp_path / "dfdam.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "dfdam.json").read_text())["costs"]["sum"]["latency_ms"] == 40


def test_dfdam_costs_are_measured_for_each_row() -> None:
    costs = dfdam.measure_costs(["sum", "dafm+2dpam"], 32, (32, 64), rounds=1, iters=1)
    assert costs["dafm+2dpam"]["params_m"] > costs["sum"]["params_m"]  # DAFM + 2DPAM modules
    assert costs["dafm+2dpam"]["gmacs_paper"] > costs["sum"]["gmacs_paper"] > 0
    assert all(c["latency_ms"] > 0 for c in costs.values())


# -- bench all and the CLI -----------------------------------------------------------


def test_bench_all_writes_one_report(tmp_path: Path, monkeypatch) -> None:
    from coopseg.bench import report as all_report

    monkeypatch.setattr(runner, "run_one", fake_run([]))
    monkeypatch.setattr(dfdam, "measure_costs", lambda *a, **k: {})

    def jointseg(out: Path, kw: dict[str, Any]) -> str:
        return "## JointSeg in miniature\n\nJointSeg table\n"

    monkeypatch.setitem(all_report.RUNNERS, "jointseg", jointseg)
    for row, value in (
        ("deeplabv3plus", 31.0),
        ("sum", 30.0),
        ("dafm", 32.0),
        ("dafm+2dpam", 33.0),
    ):
        monkeypatch.setitem(FAKE_MIOU, (row, "out"), value)
    summary = all_report.run_all(seeds=(0, 1), out_dir=tmp_path, jobs=1, settings={})
    text = (tmp_path / "report.md").read_text()
    assert text.startswith("# The papers' comparisons in miniature")
    assert "## Cooperative learning in miniature" in text and "## DF-DAM's Table 1" in text
    assert "JointSeg table" in text
    assert "](coop/coop.png)" in text and "](dfdam/dfdam.png)" in text
    assert (tmp_path / "coop" / "coop.png").exists() and (tmp_path / "dfdam" / "dfdam.png").exists()
    assert summary["benches"] == ["coop", "dfdam", "jointseg"]
    assert "Training time of the runs behind the tables" in text
    assert json.loads((tmp_path / "report.json").read_text())["machine"]["cpu_count"] >= 1


def test_cli_passes_the_bench_options(monkeypatch) -> None:
    from coopseg import cli
    from coopseg.bench import commands

    seen: dict[str, Any] = {}
    monkeypatch.setattr(coop, "run_coop_bench", lambda *a, **k: seen.update(args=a, kw=k))
    argv = [
        "bench",
        "coop",
        "--rows",
        "ensemble",
        "cross",
        "--iterations",
        "500",
        "--scene-size",
        "96",
        "--frozen-stages",
        "1",
        "--member",
        "aspp_channels=32",
        "--set",
        "train.lr=0.002",
        "--jobs",
        "1",
        "--seeds",
        "0",
        "1",
        "2",
        "3",
    ]
    assert cli.main(argv) == 0
    assert seen["args"] == ("quick", [0, 1, 2, 3], ["ensemble", "cross"], "runs/bench-coop")
    kw = seen["kw"]
    assert kw["settings"]["iterations"] == 500 and kw["settings"]["scene_size"] == 96
    assert kw["settings"]["frozen_stages"] == 1 and kw["settings"]["lr"] is None
    assert kw["member"] == {"aspp_channels": 32} and kw["overrides"] == ["train.lr=0.002"]
    assert kw["jobs"] == 1 and kw["threads"] == 1 and kw["plateau"] == 15.0
    untaught = tuple(r for r, spec in coop.ROWS.items() if spec.teacher is None)
    assert untaught == commands.COOP_ROWS and tuple(dfdam.ROWS) == commands.DFDAM_ROWS
    monkeypatch.undo()
    with pytest.raises(ValueError, match="bench register --papers ours"):
        coop.run_coop_bench(rows=["distilled"])
    assert tuple(jointseg.ROWS) == commands.JOINTSEG_ROWS
    with pytest.raises(SystemExit):
        cli.main(["bench", "coop", "--rows", "nonsense"])


def test_bench_all_sums_the_training_time_behind_each_table(tmp_path: Path) -> None:
    from coopseg.bench.report import run_minutes

    runs = {
        "single": [{"train_s": 60.0}, {"train_s": 120.0}],
        "cross-no-paths": [{"train_s": 90.0, "same_as": "ensemble"}],  # not trained again
        "ensemble": [{"train_s": 90.0}],
    }
    (tmp_path / "coop.json").write_text(json.dumps({"runs": runs}))
    assert run_minutes(tmp_path / "coop.json") == pytest.approx(4.5)
    assert math.isnan(run_minutes(tmp_path / "missing.json"))
