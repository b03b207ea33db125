"""The claims register: statistics against hand-computed values, the verdict rule with
Holm's correction, the committed run store a new machine continues from, and the
ensemble-members-are-single-networks fact the cooperative claims rely on."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from coopseg.bench import claims, runner
from coopseg.bench.claims import Bench, Claim, Side
from coopseg.bench.stats import holm, one_sided_p, seeds_needed, t_interval
from coopseg.config import Config, config_from_dict

from .conftest import tiny_config


def test_interval_and_p_values_match_hand_computed_t_statistics() -> None:
    diffs = [1.0, 2.0, 3.0]  # mean 2, sd 1, sem 1/sqrt(3)
    lo, hi = t_interval(diffs)
    half = 4.302652729911275 / math.sqrt(3)  # t(0.975, 2 df)
    assert (lo, hi) == pytest.approx((2 - half, 2 + half))
    # With 2 df the t CDF is 1/2 + t / (2 sqrt(2 + t^2)): t = 2 sqrt(3) gives p = 0.03709,
    # and against 5 (t = -3 sqrt(3)) p = 1/2 - 3 sqrt(3) / (2 sqrt(29)) = 0.01755.
    assert one_sided_p(diffs, 0.0, "greater") == pytest.approx(0.5 - 3**0.5 / 14**0.5)
    assert one_sided_p(diffs, 5.0, "less") == pytest.approx(0.5 - 3 * 3**0.5 / (2 * 29**0.5))
    assert one_sided_p([2.0, 2.0], 1.0, "greater") == 0.0  # no spread: by the side only
    assert math.isnan(one_sided_p([1.0], 0.0, "greater"))
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert math.isnan(holm([math.nan, 0.02])[0]) and holm([math.nan, 0.02])[1] == 0.02
    # The arithmetic: a spread of 1.1 points needs about 12 seeds for ±0.7.
    assert seeds_needed(1.1, 0.7) == 12 and seeds_needed(0.5, 0.7) == 5


def _claim(paper: str, effect: float, margin: float | None = None) -> Claim:
    return Claim(
        paper,
        f"{paper} claim",
        Side("b", "x", "top"),
        Side("b", "y", "top"),
        effect,
        "T1",
        margin=margin,
    )


def _results(diffs: list[float]) -> dict[str, dict[int, dict[str, Any]]]:
    """Rows x and y of a fake bench whose per-seed difference x - y is ``diffs``."""

    def run(v: float) -> dict[str, Any]:
        return {"scores": {"top": {"best": v, "final": v - 1}}}

    return {
        "x": {s: run(30.0 + d) for s, d in enumerate(diffs)},
        "y": {s: run(30.0) for s in range(len(diffs))},
    }


def test_verdicts_follow_the_stated_rule_with_holm_within_a_paper() -> None:
    clear = [1.0, 1.2, 0.9, 1.1, 1.0, 0.8]
    cases = {
        "reproduced": ([_claim("p", 1.0)], clear),
        "refuted": ([_claim("p", 3.0)], [0.1, -0.2, 0.0, 0.2, -0.1, 0.0]),  # far below 3
        "inconclusive": ([_claim("p", 1.0)], [2.0, -1.5, 1.0, -0.5]),
    }
    for expected, (cl, diffs) in cases.items():
        (entry,) = claims.evaluate(cl, {"b": _results(diffs)})
        assert entry["verdict"] == expected, (expected, entry)
        assert entry["estimate"] == pytest.approx(sum(diffs) / len(diffs))
        assert entry["seeds"] == list(range(len(diffs))) and entry["per_seed"] == pytest.approx(
            diffs
        )
        assert entry["estimate_final"] == pytest.approx(entry["estimate"])  # both sides -1
        assert set(entry) >= {"paper", "claim", "contrast", "paper_effect", "ci95", "verdict"}
    # Non-inferiority: no worse than -2 points.
    (ni,) = claims.evaluate([_claim("p", 0.0, margin=2.0)], {"b": _results([-0.3, 0.2, -0.1, 0.0])})
    assert ni["verdict"] == "reproduced" and ni["ci95"][0] > -2.0
    # Holm: p = 0.03 on its own is above 0.025; two such claims in one paper stay so, and
    # a claim at p = 0.015 alone passes but not beside a second one (0.015 x 2 = 0.03).
    d = [-0.3, 2.3, 0.1, 1.9, 0.0, 2.0, 0.4, 1.6]  # mean 1.0, one-sided p = 0.0155
    p_alone = one_sided_p(d, 0.0, "greater")
    assert 0.0125 < p_alone < 0.025
    alone = claims.evaluate([_claim("p", 5.0)], {"b": _results(d)})
    assert alone[0]["verdict"] == "reproduced"
    two = claims.evaluate([_claim("p", 5.0), _claim("p", 5.0)], {"b": _results(d)})
    assert [e["verdict"] for e in two] == ["refuted", "refuted"]  # below 5, not above 0
    assert two[0]["p_above_holm"] == pytest.approx(2 * p_alone)
    other = claims.evaluate([_claim("p", 5.0), _claim("q", 5.0)], {"b": _results(d)})
    assert other[0]["verdict"] == "reproduced"  # Holm counts within a paper only
    # Above 0 and below the paper's effect at once: reproduced, flagged as smaller.
    (smaller,) = claims.evaluate([_claim("p", 5.0)], {"b": _results(clear)})
    assert smaller["verdict"] == "reproduced" and smaller["below_paper_effect"] is True
    assert "a smaller effect here" in claims.markdown([smaller], {})
    (entry,) = claims.evaluate([_claim("p", 1.0)], {"b": _results(clear)})
    assert entry["below_paper_effect"] is False
    # Two segmenters still on the background plateau (< 15 %) in some seed test nothing:
    # far below the paper's 5 points would read "refuted", it reads inconclusive.
    flat = _results([0.1, -0.2, 0.0, 0.2, -0.1, 0.0])
    for runs in flat.values():
        runs[2]["scores"]["top"]["best"] -= 20.0  # 10 % and 10.0 + 0.0
    (entry,) = claims.evaluate([_claim("p", 5.0)], {"b": flat})
    assert entry["plateau_seeds"] == [2] and entry["verdict"] == "inconclusive"
    assert "background plateau" in claims.markdown([entry], {})
    one_side = _results([0.1, -0.2, 0.0, 0.2, -0.1, 0.0])
    one_side["y"][2]["scores"]["top"]["best"] = 10.0  # only b on it: a real difference
    (entry,) = claims.evaluate([_claim("p", 50.0)], {"b": one_side})
    assert entry["plateau_seeds"] == [] and entry["verdict"] == "refuted"


def test_every_claim_names_its_table_and_rows_the_benches_have() -> None:
    from coopseg.bench import coop, dfdam

    assert {c.paper for c in claims.CLAIMS} <= set(claims.PAPERS)
    for c in claims.CLAIMS:
        assert c.paper_effect >= 0 and c.source, c.claim
        for side in (c.a, c.b):
            rows = {"coop": coop.ROWS, "dfdam": dfdam.ROWS}.get(side.bench)
            if rows is not None:
                assert side.row in rows, (c.claim, side)
    headline = {c.paper for c in claims.CLAIMS if c.headline}
    assert headline == {"cross", "feature-sharing", "dfdam", "jointseg", "ours"}
    (cross,) = [
        c for c in claims.CLAIMS if c.headline and c.a.output == "top" and c.paper == "cross"
    ]
    assert cross.contrast == "cross top − ensemble fused" and cross.paper_effect == 1.0
    needed = claims.rows_needed(claims.select(["cross"]))
    assert needed == {"coop": ["cross", "ensemble", "cross-no-extra", "oneway"]}
    with pytest.raises(ValueError, match="unknown paper 'nope'"):
        claims.select(["nope"])
    first = claims.rows_needed(claims.select(["cross", "ours"], headline=True))
    assert first == {"coop": ["cross", "ensemble", "mutual", "distilled"]}
    # More seeds for one claim train its two rows only.
    (extra,) = claims.select(contrasts=["cross-no-extra"])
    assert claims.rows_needed([extra]) == {"coop": ["cross", "cross-no-extra"]}
    with pytest.raises(ValueError, match="no claim's contrast contains 'crosss'"):
        claims.select(contrasts=["crosss"])


def test_register_stores_each_run_and_a_new_machine_continues(tmp_path: Path, monkeypatch) -> None:
    trained: list[str] = []

    def config(row: str, seed: int, mode: str, out: Path) -> Config:
        return config_from_dict({"name": f"{row}-seed{seed}", "seed": seed, "out_dir": str(out)})

    def work(cfg: Config, keep: bool = False) -> dict[str, Any]:
        trained.append(cfg.name)
        value = {"x": 31.0, "y": 30.0}[cfg.name[0]] + 0.1 * cfg.seed * (cfg.name[0] == "x")
        return {"scores": {"top": {"best": value, "final": value}}}

    monkeypatch.setattr(claims, "benches", lambda: {"b": Bench(config, work, {})})
    cl = [_claim("p", 1.0)]
    store = tmp_path / "store"
    results = claims.run_register(cl, [0, 1], out_dir=tmp_path / "a", store=store, jobs=1)
    assert sorted(trained) == ["x-seed0", "x-seed1", "y-seed0", "y-seed1"]
    assert sorted(p.name for p in (store / "b").iterdir()) == [
        "x-seed0.json",
        "x-seed1.json",
        "y-seed0.json",
        "y-seed1.json",
    ]
    stored = json.loads((store / "b" / "x-seed1.json").read_text())
    assert stored["config"]["seed"] == 1 and stored["result"]["scores"]["top"]["best"] == 31.1

    # A new machine: no run folders, only the committed store; seed 2 is new.
    trained.clear()
    again = claims.run_register(cl, [0, 1, 2], out_dir=tmp_path / "new", store=store, jobs=1)
    assert sorted(trained) == ["x-seed2", "y-seed2"]
    assert again["b"]["x"][1] == results["b"]["x"][1]
    (entry,) = claims.evaluate(cl, again)
    assert entry["per_seed"] == pytest.approx([1.0, 1.1, 1.2])
    text = claims.write([entry], tmp_path / "claims.json", {"mode": "register"})
    saved = json.loads((tmp_path / "claims.json").read_text())
    assert saved[0]["verdict"] == entry["verdict"] and len(saved[0]["ci95"]) == 2
    assert "| p | p claim | x top − y top | +1.00 | +1.10 |" in text
    assert claims.register_markdown(tmp_path / "claims.json") == text
    # Collecting only (--report-only) trains nothing and still finds every stored run.
    trained.clear()
    only = claims.run_register(cl, [0, 1, 2], out_dir=tmp_path / "x", store=store, train=False)
    assert trained == [] and only == again


def test_a_student_trains_after_its_teacher_and_a_new_machine_retrains_the_teacher(
    tmp_path: Path, monkeypatch
) -> None:
    """A distilled row reads its teacher's checkpoint: the teacher keeps its checkpoints
    (no other run does), trains before the student, and is trained again where only its
    stored result reached this machine, leaving that stored result as it was."""
    calls: list[tuple[str, bool]] = []

    def config(row: str, seed: int, mode: str, out: Path) -> Config:
        return config_from_dict({"name": f"{row}-seed{seed}", "seed": seed, "out_dir": str(out)})

    def teacher_file(row: str, seed: int, out: Path) -> Path:
        return Path(out) / f"t-seed{seed}" / "checkpoints" / "best.safetensors"

    def work(cfg: Config, keep: bool = False) -> dict[str, Any]:
        calls.append((cfg.name, keep))
        if cfg.name.startswith("s"):  # the student needs its teacher's file
            assert teacher_file("s", cfg.seed, cfg.out_dir).is_file()
        if keep:
            (cfg.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            (cfg.run_dir / "checkpoints" / "best.safetensors").write_text("w")
        value = {"s": 32.0, "t": 33.0, "b": 30.0}[cfg.name[0]] + cfg.seed
        return {"scores": {"top": {"best": value, "final": value}}}

    bench = Bench(config, work, {}, {"s": "t"}, teacher_file)
    monkeypatch.setattr(claims, "benches", lambda: {"b": bench})
    cl = [Claim("p", "distilled", Side("b", "s", "top"), Side("b", "b", "top"), 1.0, "ours")]
    store = tmp_path / "store"
    claims.run_register(cl, [0], out_dir=tmp_path / "a", store=store, jobs=1)
    assert calls == [("b-seed0", False), ("t-seed0", True), ("s-seed0", False)]
    assert (store / "b" / "t-seed0.json").is_file()

    # A new machine with the teacher's stored result but no checkpoint: trained again,
    # checkpoints kept, its stored result untouched.
    calls.clear()
    (store / "b" / "s-seed0.json").unlink()
    before = (store / "b" / "t-seed0.json").read_text()
    got = claims.run_register(cl, [0], out_dir=tmp_path / "new", store=store, jobs=1)
    assert calls == [("t-seed0", True), ("s-seed0", False)]
    assert (store / "b" / "t-seed0.json").read_text() == before
    assert got["b"]["s"][0]["scores"]["top"]["best"] == 32.0
    # Everything stored: nothing trains, the student's result is collected.
    calls.clear()
    only = claims.run_register(cl, [0], out_dir=tmp_path / "x", store=store, train=False)
    assert calls == [] and only["b"]["s"][0] == got["b"]["s"][0]


def test_a_result_stored_before_a_new_config_key_still_counts() -> None:
    cfg = config_from_dict({"name": "r", "train": {"lr": 0.01}})
    stored = json.loads(json.dumps(cfg.to_dict()))
    del stored["train"]["amp"]  # a key added later, at its default here: the same run
    assert runner._same_run(stored, cfg)
    changed = config_from_dict({"name": "r", "train": {"lr": 0.01, "amp": "bf16"}})
    assert not runner._same_run(stored, changed)  # the new key set otherwise: not the run
    stored["train"]["lr"] = 0.02
    assert not runner._same_run(stored, cfg)


def test_an_ensemble_member_trains_exactly_as_the_single_network(tiny_scenes, tmp_path) -> None:
    """Why the register trains no single rows: with no links and a loss per member, each
    member of an ensemble sees the same batches and gradients as the single network of
    its init seed, so its output *is* that single network (here: equal weights after
    training steps)."""
    from coopseg.engine.train import Trainer

    member = {
        "arch": "deeplabv3plus",
        "backbone": "resnet18",
        "aspp_channels": 16,
        "decoder_channels": 16,
        "low_level_channels": 8,
        "dropout": 0.0,
        "init_seed": 7,
    }
    train = {"iterations": 3, "val_interval": 0, "optimizer": "adamw", "lr": 1e-3}

    def trained(members: list[dict[str, Any]], name: str) -> dict[str, torch.Tensor]:
        preset = "ensemble" if len(members) > 1 else "single"
        model = {"arch": "cooperative", "preset": preset, "num_classes": 11}
        cfg = tiny_config(
            tiny_scenes, tmp_path, name=name, model={**model, "members": members}, train=train
        )
        trainer = Trainer(cfg, show_progress=False)
        trainer.train()
        return trainer.model.members["top"].state_dict()

    single = trained([{**member, "name": "top"}], "single")
    ensemble = trained([{**member, "name": "top"}, {**member, "init_seed": 8}], "ensemble")
    assert single.keys() == ensemble.keys()
    for key, value in single.items():
        torch.testing.assert_close(ensemble[key], value, rtol=0, atol=1e-6, msg=key)


def test_the_one_network_table_counts_inference_and_training_cost() -> None:
    """Issue 20's table: a mutual-learning or distilled member deploys as one network (the
    GMACs of the single network), a cross network needs the pair; a distilled network's
    training cost includes its teacher's forward passes and the teacher's own training."""
    from coopseg.bench import coop

    def run(gmacs: float, **scores: float) -> dict[str, Any]:
        return {"gmacs": gmacs, "scores": {k: {"best": v} for k, v in scores.items()}}

    runs = {
        "ensemble": {
            0: run(0.6, top=24.0, bottom=23.0, fused=26.0),
            1: run(0.6, top=26.0, bottom=25.0, fused=28.0),
        },
        "mutual": {0: run(0.6, top=27.0, bottom=26.0), 1: run(0.6, top=29.0, bottom=28.0)},
        "cross": {0: run(0.64, top=33.0, bottom=32.0), 1: run(0.64, top=35.0, bottom=34.0)},
        "distilled": {0: run(0.24, top=30.0)},  # one seed so far: the table uses seed 0
    }
    table = coop.one_network_table(runs).splitlines()
    assert "1 seeds" in table[0]
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1:] for line in table[2:]}
    single = float(rows["single lite0"][1])
    assert rows["single lite0"][0] == rows["lite0 distilled from the cross pair"][0] == "1"
    assert rows["mutual-learning member lite2"][0] == "1"
    assert (
        rows["cross pair, its lite0 network"][0] == rows["ensemble lite0 + lite2 (fused)"][0] == "2"
    )
    assert float(rows["lite0 distilled from the cross pair"][1]) == single
    assert float(rows["mutual-learning member lite0"][1]) == single
    assert float(rows["cross pair, its lite0 network"][1]) > 2 * single
    per_run = 400 * 8 / 1000  # register mode: iterations x batch, in thousands
    tm = {k: float(v[3].rstrip(" |")) for k, v in rows.items()}
    assert tm["single lite0"] == pytest.approx(3 * single * per_run, abs=0.06)
    assert tm["ensemble lite0 + lite2 (fused)"] == pytest.approx(3 * 0.6 * per_run, abs=0.06)
    distilled = 3 * 0.24 * per_run + 0.64 * per_run + 3 * 0.64 * per_run
    assert tm["lite0 distilled from the cross pair"] == pytest.approx(distilled, abs=0.06)
    assert rows["lite0 distilled from the cross pair"][2] == "30.0 ± 0.0"
    del runs["distilled"]
    assert coop.one_network_table(runs) is None  # a row without a seed: no table yet


def _marking_work(cfg: Config, keep: bool = False) -> dict[str, Any]:
    """A worker's fake run (module level: spawned workers import it): a student checks
    that its teacher has finished, then each run leaves its mark."""
    if cfg.name.startswith("student"):
        assert (Path(cfg.out_dir) / "teacher.done").is_file(), "student started too early"
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    (Path(cfg.out_dir) / f"{cfg.name.split('-')[0]}.done").write_text(str(keep))
    return {"scores": {"top": {"best": 1.0, "final": 1.0}}}


def test_a_dependent_run_starts_in_the_pool_once_its_teacher_is_done(tmp_path: Path) -> None:
    def cfg(name: str) -> Config:
        return config_from_dict({"name": name, "out_dir": str(tmp_path)})

    teacher, other, student = cfg("teacher-s0"), cfg("other-s0"), cfg("student-s0")
    got = runner.run_configs(
        [teacher, other],
        jobs=2,
        threads=1,
        keep_checkpoints={"teacher-s0"},
        work=_marking_work,
        then={"teacher-s0": [student]},
    )
    assert sorted(got) == ["other-s0", "student-s0", "teacher-s0"]
    assert (tmp_path / "teacher.done").read_text() == "True"  # only the teacher keeps its
    assert (tmp_path / "other.done").read_text() == "False"
