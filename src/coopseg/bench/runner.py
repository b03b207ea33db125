"""Running a bench's trainings: one run per (row, seed), cached, optionally in parallel.

A bench table takes an hour or more on 2 CPU cores, so a run that finished is never
trained again: its result is written beside it (``<run>/bench-result.json``, with the
config it came from) and reused while the config is unchanged. Checkpoints are deleted
after a run unless asked to keep them (a pair's ``best-*`` files and ``last.pt`` take
~0.2 GB a run). ``jobs > 1`` trains that many runs at once in worker processes, each with
``threads`` threads: with small models two one-thread processes use 2 cores better than
one two-thread process.
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

import torch

from ..config import Config, config_from_dict

RESULT_FILE = "bench-result.json"


def train_seconds_from_log(run_dir: Path) -> float | None:
    """Seconds from the run's start record to its last training record in ``log.jsonl``:
    the iterations' wall time without the final validation and checkpoint writes."""
    try:
        lines = (run_dir / "log.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines if line.strip()]
    except (OSError, ValueError):
        return None
    starts = [r["time"] for r in records if r.get("kind") == "start"]
    ends = [r["time"] for r in records if r.get("kind") == "train"]
    if not starts or not ends or ends[-1] < starts[-1]:
        return None
    return ends[-1] - starts[-1]


def train_measured(cfg: Config, make_trainer: Callable[[], Any]) -> tuple[Any, Any, dict]:
    """Empty the run's folder, build the trainer, train it and measure the run:
    ``(trainer, what train() returned, costs)``; costs are parameters, GMACs at the crop
    size, iterations, training time (from the log) and total time, time per step, threads."""
    from ..engine.profile import count_macs, count_params

    shutil.rmtree(cfg.run_dir, ignore_errors=True)  # the bench's own folder: rerunnable
    trainer = make_trainer()
    start = time.perf_counter()
    outcome = trainer.train()
    total_s = time.perf_counter() - start
    model = trainer.model
    train_s = train_seconds_from_log(cfg.run_dir) or total_s
    costs = {
        "params_m": count_params(model) / 1e6,
        "trainable_params_m": count_params(model, trainable=True) / 1e6,
        "gmacs": count_macs(model, tuple(cfg.data.crop_size)) / 1e9,
        "iterations": trainer.iteration,
        "train_s": train_s,
        "total_s": total_s,
        "step_s": train_s / max(trainer.iteration, 1),
        "threads": torch.get_num_threads(),
    }
    return trainer, outcome, costs


def finish_run(cfg: Config, result: dict[str, Any], keep_checkpoints: bool) -> dict[str, Any]:
    """Drop the run's checkpoints (unless kept) and cache its result; return the result."""
    if not keep_checkpoints:
        shutil.rmtree(cfg.run_dir / "checkpoints", ignore_errors=True)
    save_result(cfg, result)
    return result


def run_one(cfg: Config, keep_checkpoints: bool = False) -> dict[str, Any]:
    """Train ``cfg`` from scratch and measure it: each output's val metrics (the final
    validation; keys as the trainer labels them: ``out``, or ``fused``/member names),
    parameters, GMACs at the scene size, and the training time."""
    from ..engine.train import Trainer

    trainer, outcome, costs = train_measured(cfg, lambda: Trainer(cfg, show_progress=False))
    metrics = trainer.output_metrics
    result = {
        "miou": {name: m.miou for name, m in metrics.items()},
        "iou": {name: list(m.iou) for name, m in metrics.items()},
        "pixel_acc": {name: m.pixel_acc for name, m in metrics.items()},
        "scores": scores_from_history(outcome.history, output_score_keys(list(metrics))),
        **costs,
    }
    del trainer
    return finish_run(cfg, result, keep_checkpoints)


def scores_from_history(
    history: Sequence[Mapping[str, Any]], keys: Mapping[str, str]
) -> dict[str, dict[str, float]]:
    """Each score in % over a run's validation passes, ``{label: {"final": last pass,
    "best": best pass, "best_iteration": …}}``, reading ``record[keys[label]]``. The
    papers keep each network's best validation checkpoint ("the validation set to get
    the best model"); the final one stands beside it."""
    scores: dict[str, dict[str, float]] = {}
    for label, key in keys.items():
        passes = [(r["iteration"], 100 * float(r[key])) for r in history if r.get(key) is not None]
        if not passes:
            continue
        best_it, best = max(passes, key=lambda p: p[1])
        scores[label] = {"final": passes[-1][1], "best": best, "best_iteration": best_it}
    return scores


def output_score_keys(outputs: Sequence[str]) -> dict[str, str]:
    """A segmentation run's score label -> validation record key: a single network's one
    output ``out`` is named ``top`` (as in a pair) and logged as ``miou``; a pair's
    outputs are logged as ``miou_<output>``."""
    if len(outputs) == 1:
        return {"top" if outputs[0] == "out" else outputs[0]: "miou"}
    return {name: f"miou_{name}" for name in outputs}


def _plain(cfg: Config) -> dict[str, Any]:
    """The config as JSON would store it (tuples become lists), for comparisons."""
    return json.loads(json.dumps(cfg.to_dict()))


def _matches(stored: Any, current: Any, default: Any) -> bool:
    """``stored == current``, where a section key the stored config lacks (added to the
    config schema after the run) matches when ``current`` holds its default."""
    if not (isinstance(stored, dict) and isinstance(current, dict)):
        return stored == current
    if not isinstance(default, dict):  # the model section: no defaults to fall back on
        return stored == current
    for key in set(stored) | set(current):
        if key not in current:
            return False
        if key not in stored:
            if key not in default or current[key] != default[key]:
                return False
        elif not _matches(stored[key], current[key], default.get(key)):
            return False
    return True


def _same_run(stored: dict[str, Any], cfg: Config) -> bool:
    """Whether a stored config is ``cfg`` up to ``out_dir``: a bench folder that was moved
    or copied (``bench all`` over finished single benches) still holds the same runs, and
    a result committed before a new config key existed still counts while that key is at
    its default. (The model section is compared as given: a changed constructor default
    is not seen.)"""
    plain, default = _plain(cfg), _plain(Config())
    default["model"] = None
    return _matches({**stored, "out_dir": None}, {**plain, "out_dir": None}, default)


def save_result(cfg: Config, result: dict[str, Any]) -> None:
    """Store a finished run's result beside it, keyed by its config (the cache)."""
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    payload = {"config": _plain(cfg), "result": result}
    (cfg.run_dir / RESULT_FILE).write_text(json.dumps(payload, indent=1))


def cached_result(cfg: Config, store: Path | None = None) -> dict[str, Any] | None:
    """The result a finished run of exactly this config left in its folder or in
    ``store`` (``<store>/<run name>.json``, committed so that a new machine goes on
    where the last one stopped), if any."""
    for path in [cfg.run_dir / RESULT_FILE] + ([store / f"{cfg.name}.json"] if store else []):
        try:
            payload = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(payload.get("config"), dict) and _same_run(payload["config"], cfg):
            return payload.get("result")
    return None


def store_result(cfg: Config, result: dict[str, Any], store: Path) -> None:
    """Write a finished run's config and result to ``<store>/<run name>.json``
    atomically (a small file, meant to be committed)."""
    store.mkdir(parents=True, exist_ok=True)
    path = store / f"{cfg.name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"config": _plain(cfg), "result": result}, indent=1) + "\n")
    tmp.replace(path)


def _init_worker(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


Work = Callable[[Config, bool], dict[str, Any]]


def _keeps(keep_checkpoints: bool | Collection[str], cfg: Config) -> bool:
    if isinstance(keep_checkpoints, bool):
        return keep_checkpoints
    return cfg.name in keep_checkpoints


def _work(work: Work, raw: dict[str, Any], keep_checkpoints: bool) -> dict[str, Any]:
    return work(config_from_dict(raw), keep_checkpoints)


def run_configs(
    configs: Sequence[Config],
    *,
    jobs: int = 1,
    threads: int | None = None,
    keep_checkpoints: bool | Collection[str] = False,
    rerun: bool = False,
    on_result: Callable[[Config, dict[str, Any], bool], None] | None = None,
    work: Work | None = None,
    store: Path | None = None,
    then: Mapping[str, Sequence[Config]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Results by run name, training what is not cached (``rerun``: everything).

    ``work(cfg, keep_checkpoints)`` trains one run and returns its result (default
    :func:`run_one`, a ``Trainer`` run); with ``jobs > 1`` it must be a module-level
    function (it is sent to the workers by name). It should save its result with
    :func:`save_result` so that the run is cached.

    ``keep_checkpoints``: for every run, or for the runs of these names (a teacher's).
    ``then``: runs that need a run's output (a distilled student its teacher's
    checkpoint): started once the named run has finished or was found cached.
    ``jobs > 1``: that many worker processes (spawned), in the order given, each with
    ``threads`` torch threads. ``on_result(cfg, result, reused)`` is called as runs end.
    ``store``: a folder of committed results, read as a cache and written as runs end.
    """
    work = work or run_one  # looked up at call time (tests replace ``run_one``)
    then = then or {}
    results: dict[str, dict[str, Any]] = {}

    def done(cfg: Config, result: dict[str, Any]) -> None:
        results[cfg.name] = result
        if store is not None:
            store_result(cfg, result, store)
        if on_result:
            on_result(cfg, result, False)

    def to_train(batch: Sequence[Config]) -> list[Config]:
        """The runs of ``batch`` to train; cached ones are collected, their dependents
        looked at in turn."""
        out: list[Config] = []
        for cfg in batch:
            cached = None if rerun else cached_result(cfg, store)
            if cached is None:
                out.append(cfg)
                continue
            results[cfg.name] = cached
            if on_result:
                on_result(cfg, cached, True)
            out += to_train(then.get(cfg.name, ()))
        return out

    todo = to_train(configs)
    if jobs <= 1 or (len(todo) <= 1 and not any(c.name in then for c in todo)):
        if threads:
            torch.set_num_threads(threads)
        while todo:
            cfg = todo.pop(0)
            done(cfg, work(cfg, _keeps(keep_checkpoints, cfg)))
            todo += to_train(then.get(cfg.name, ()))
        return results
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        max_workers=jobs, mp_context=context, initializer=_init_worker, initargs=(threads,)
    ) as pool:

        def submit(cfg: Config) -> None:
            keep = _keeps(keep_checkpoints, cfg)
            futures[pool.submit(_work, work, cfg.to_dict(), keep)] = cfg

        futures: dict[Any, Config] = {}
        for cfg in todo:
            submit(cfg)
        while futures:
            finished, _ = wait(futures, return_when=FIRST_COMPLETED)
            for future in finished:
                cfg = futures.pop(future)
                done(cfg, future.result())
                for dependent in to_train(then.get(cfg.name, ())):
                    submit(dependent)
    return results


def prepare_fashionscenes(cfg: Config) -> None:
    """Build the scenes once before parallel workers start (they would race to)."""
    from ..data import build_fashionscenes

    if cfg.data.dataset != "fashionscenes":
        return
    build_fashionscenes(
        Path(cfg.data.root) if cfg.data.root else None,
        size=cfg.data.scene_size,
        train=cfg.data.train_scenes,
        val=cfg.data.val_scenes,
        seed=cfg.data.scene_seed,
        source=Path(cfg.data.source) if cfg.data.source else None,
    )


def save_report(
    out_dir: Path,
    name: str,
    report: dict[str, Any],
    series: dict[str, list[Any]],
    groups: Sequence[str],
    title: str,
    markdown: Callable[[dict[str, Any]], str],
) -> str:
    """Write ``<name>.png`` (when there are rows), ``<name>.json`` and ``<name>.md`` for a
    bench's report; return the Markdown."""
    from .charts import bar_chart

    out_dir.mkdir(parents=True, exist_ok=True)
    if report["table"]:
        bar_chart(groups, series, out_dir / f"{name}.png", title=title, threshold=report["plateau"])
        report["chart"] = f"{name}.png"
    (out_dir / f"{name}.json").write_text(json.dumps(report, indent=2))
    text = markdown(report)
    (out_dir / f"{name}.md").write_text(text)
    return text
