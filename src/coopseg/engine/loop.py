"""The one training loop every trainer runs: iteration-indexed batches, logging,
validation and best checkpoints, time limits, atomic resumable checkpoints.

A trainer (:class:`~coopseg.engine.train.Trainer` for segmentation models and
cooperative pairs, :class:`~coopseg.engine.joint.JointTrainer` for JointSeg's two
agents) subclasses :class:`TrainingLoop`, builds its data, model and one optimizer,
scheduler and scaler per agent, calls :meth:`TrainingLoop.begin`, and says how one
iteration steps (:meth:`~TrainingLoop.train_step`) and what validation records
(:meth:`~TrainingLoop.validation`). Everything about surviving faults lives here once:
``train.resume: auto``, the ``last.prev.pt`` fallback, checkpoints by iteration and by
time, a stretched schedule when a finished run is extended, stopping on SIGTERM, SIGUSR1
or Ctrl-C after the current step with ``last.pt`` written (:mod:`.preemption`), and one
writer per run folder (:mod:`.runlock`).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..config import Config, ConfigError, TrainConfig
from ..data import SeededAugmentation
from ..data.sampling import TrainBatchSampler
from ..models.backbones import weight_sources
from .checkpoint import (
    previous_checkpoint,
    resume_state,
    rng_state,
    save_training_state,
    save_weights,
    set_rng_state,
)
from .distributed import DistInfo, all_reduce_sum, init_distributed
from .ema import build_ema, precise_bn
from .logging import RunLogger
from .metrics import SegMetrics
from .preemption import RunInterrupted, StopSignals, ignore_stop_signals
from .runlock import RunLock, RunLockedError
from .schedule import TrainingClock, build_scheduler, describe_schedule, schedule_done


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss diverged); the message says what to try."""


@dataclass
class TrainResult:
    run_dir: Path
    iteration: int
    best_miou: float
    best_iteration: int
    last_metrics: SegMetrics | None
    history: list[dict[str, Any]] = field(default_factory=list)
    last_cls: dict[str, float] | None = None  # JointSeg's classifier agent
    train_s: float = 0.0  # seconds spent in training steps (the time schedule's clock)


def describe_weights(sources: dict[str, str]) -> list[str]:
    """One line per backbone: pretrained or not, and from where."""
    lines = []
    for path, source in sources.items():
        kind, _, where = source.partition(":")
        if kind == "random":
            lines.append(f"{path}: random init (not pretrained)")
        else:
            origin = f"{kind} {where}" if where else kind
            lines.append(f"{path}: pretrained, weights from {origin}")
    return lines


def weights_header(sources: dict[str, str]) -> str:
    """YAML comment lines recording where the backbones' initial weights came from."""
    return "".join(f"# weights {path}: {source}\n" for path, source in sources.items())


def time_is_up(dist: DistInfo, start_time: float, max_time_s: float) -> bool:
    """``train.max_time_s`` reached? Every rank takes part; rank 0's clock decides."""
    if max_time_s <= 0:
        return False
    late = dist.is_main and time.perf_counter() - start_time > max_time_s
    flag = torch.tensor([float(late)], device=dist.device)
    return bool(all_reduce_sum(flag).item() > 0)


def start_state(checkpoint: Path, resume: bool | str) -> tuple[dict[str, Any] | None, str]:
    """The state a run starts from (None: a new run) and a line saying which file it
    came from. A new run is refused where one already is."""
    if not resume:
        if checkpoint.exists() or previous_checkpoint(checkpoint).exists():
            raise TrainingError(
                f"{checkpoint.parent.parent} already holds a run; pass --resume to "
                "continue it (--resume auto: whether or not there is one), or choose "
                "another name (--set name=...) or out_dir"
            )
        return None, ""
    return resume_state(checkpoint, resume)


SCHEDULE_KEYS = {
    "iterations": ("schedule", "iterations", "poly_power", "warmup_iterations"),
    "time": ("schedule", "time_budget_s", "poly_power", "warmup_s"),
}


def continue_schedule(
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    optimizer: torch.optim.Optimizer,
    saved: dict[str, Any],
    train_cfg: TrainConfig,
    iteration: int,
    train_s: float = 0.0,
) -> str:
    """Resuming with a changed schedule (``--set train.iterations=N`` or
    ``train.time_budget_s=S`` to extend a finished run): the lr continues on the new
    schedule from where the run stands, i.e. at the value a run configured with the new
    length would have at this iteration / training time (the optimizer's restored lr is
    the old schedule's, 0 at its end). Returns what changed."""
    defaults = {"schedule": "iterations", "time_budget_s": 0.0, "warmup_s": 0.0}
    keys = SCHEDULE_KEYS[train_cfg.schedule]
    changed = {k: (saved.get(k, defaults.get(k)), getattr(train_cfg, k)) for k in keys}
    changed = {k: v for k, v in changed.items() if v[0] != v[1]}
    if not changed:
        return ""
    if train_cfg.schedule == "iterations" and iteration > train_cfg.iterations:
        raise TrainingError(
            f"train.iterations={train_cfg.iterations} is below the checkpoint's iteration "
            f"{iteration}; give a larger value to extend the run"
        )
    if train_cfg.schedule == "time" and train_s > train_cfg.time_budget_s:
        raise TrainingError(
            f"train.time_budget_s={train_cfg.time_budget_s:g} is below the checkpoint's "
            f"{train_s:.1f} s of training; give a larger value to extend the run"
        )
    for group, base, factor in zip(
        optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True
    ):
        group["lr"] = base * factor(iteration)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    what = ", ".join(f"train.{k} {a} -> {b}" for k, (a, b) in changed.items())
    lr = optimizer.param_groups[0]["lr"]
    timed = train_cfg.schedule == "time"
    where = f"{train_s:.1f} s of training" if timed else f"iteration {iteration}"
    return f"schedule changed ({what}): lr continues at {lr:.3g} from {where}"


class TrainingLoop:
    """State and loop shared by every trainer (module docstring).

    Subclasses set ``model``, ``info`` and the per-agent ``optimizers``, ``schedulers``
    and ``scalers`` (one agent, ``"seg"``, for segmentation), then call :meth:`begin`.
    """

    # what to try when the loss stops being finite
    divergence_hint: ClassVar[str] = "lower train.lr or turn off train.amp"

    model: nn.Module
    info: dict[str, Any]

    def __init__(self, cfg: Config, show_progress: bool = True) -> None:
        self.cfg = cfg
        self.dist: DistInfo = init_distributed(cfg.device)
        self.device = self.dist.device
        self.run_dir = cfg.run_dir
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.show_progress = show_progress and self.dist.is_main
        torch.manual_seed(cfg.seed)
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedulers: dict[str, torch.optim.lr_scheduler.LambdaLR] = {}
        self.scalers: dict[str, torch.amp.GradScaler] = {}
        self.weight_sources: dict[str, str] = {}
        self.save_weight_files = True  # best/final .safetensors (not for bench baselines)
        self.iteration = 0
        self.best_miou = -1.0
        self.best_iteration = 0
        self.history: list[dict[str, Any]] = []
        self.resume_note = self.schedule_note = self.precision_note = ""
        self.precision: dict[str, Any] = {}  # what train.amp resolved to (the start record)
        self.last_save = time.perf_counter()  # train.checkpoint_interval_s counts from here
        # training seconds: the time schedule's progress, restored on resume
        self.train_clock = TrainingClock()
        self.ema: torch.optim.swa_utils.AveragedModel | None = None  # train.ema_decay
        self.run_lock = RunLock(self.run_dir)
        self._claim_run_dir()

    def build_scheduler(
        self, optimizer: torch.optim.Optimizer
    ) -> torch.optim.lr_scheduler.LambdaLR:
        """An agent's lr schedule (``train.schedule``), driven by this loop's clock."""
        return build_scheduler(optimizer, self.cfg.train, self.train_clock)

    @property
    def eval_model(self) -> nn.Module:
        """What validation evaluates and the weight files hold: the EMA when on."""
        return self.ema.module if self.ema is not None else self.model

    def _claim_run_dir(self) -> None:
        """Before any work: rank 0 creates the run folder and locks it (a second job on
        it is refused, naming the holder); under DDP every rank fails alike."""
        problem = ""
        if self.dist.is_main:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                self.run_lock.acquire()
            except RunLockedError as err:
                problem = str(err)
            except OSError as err:
                problem = (
                    f"out_dir: cannot write the run folder {self.run_dir} "
                    f"({err.strerror or err}); choose another out_dir (--set out_dir=...)"
                )
            if self.run_lock.warning:
                print(f"[{self.cfg.name}] warning: {self.run_lock.warning}", flush=True)
        if self.dist.distributed:
            flag = all_reduce_sum(torch.tensor([float(bool(problem))], device=self.device))
            if flag.item() > 0 and not problem:
                problem = f"rank 0 cannot claim the run folder {self.run_dir} (its error says why)"
        if problem:
            raise TrainingError(problem)

    def begin(self, resume: bool | str | None) -> None:
        """After the subclass built everything: start fresh or restore (``train.resume``)."""
        if not self.weight_sources:
            self.weight_sources = weight_sources(self.model)
        if self.cfg.train.ema_decay:
            self.ema = build_ema(self.model, self.cfg.train.ema_decay)
        resume = self.cfg.train.resume if resume is None else resume
        state, self.resume_note = start_state(self.ckpt_dir / "last.pt", resume)
        if state is not None:
            self._restore(state)

    # -- subclass hooks ----------------------------------------------------------
    def batch_streams(self) -> dict[str, Iterator]:  # pragma: no cover - abstract
        raise NotImplementedError

    def train_step(self, streams: dict[str, Iterator]) -> dict[str, torch.Tensor]:
        """One iteration (advances ``self.iteration``); returns the loss terms."""
        raise NotImplementedError  # pragma: no cover - abstract

    def validation(self) -> tuple[dict[str, float], SegMetrics | None, str]:
        """Validate: the logged record, the segmentation headline (for the best
        checkpoint; None without one) and the line to print."""
        raise NotImplementedError  # pragma: no cover - abstract

    def after_validation(self, iteration: int) -> None:
        """E.g. a cooperative model's best checkpoint per output."""

    def bn_batches(self, count: int) -> Iterator[torch.Tensor]:  # pragma: no cover
        """``count`` training input batches for the precise-BN pass."""
        raise NotImplementedError

    def before_validation(self) -> None:
        """``train.precise_bn_batches``: exact BN statistics of the evaluated weights."""
        count = self.cfg.train.precise_bn_batches
        if count:
            precise_bn(self.eval_model, self.bn_batches(count), self.dist)

    def check_resumable(self, state: dict[str, Any]) -> None:
        """Refuse a checkpoint of another model (subclasses add their own sections)."""
        saved_model = state["config"]["model"]
        if saved_model != self.cfg.model:
            raise TrainingError(
                f"cannot resume {self.ckpt_dir / 'last.pt'}: its model section {saved_model} "
                f"differs from the config's {self.cfg.model}"
            )
        agents = state.get("agents", ["seg"])
        if list(agents) != list(self.optimizers):
            raise TrainingError(
                f"cannot resume {self.ckpt_dir / 'last.pt'}: it trained agents {agents}, "
                f"this run trains {list(self.optimizers)}"
            )

    def extra_state(self) -> dict[str, Any]:
        return {}

    def restore_extra(self, state: dict[str, Any]) -> None:
        """Counterpart of :meth:`extra_state`."""

    # -- state -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "agents": list(self.optimizers),
            "optimizers": {k: v.state_dict() for k, v in self.optimizers.items()},
            "schedulers": {k: v.state_dict() for k, v in self.schedulers.items()},
            "scalers": {k: v.state_dict() for k, v in self.scalers.items()},
            "iteration": self.iteration,
            "best_miou": self.best_miou,
            "best_iteration": self.best_iteration,
            "history": self.history,
            "train_s": self.train_clock.elapsed_s,
            **({"ema": self.ema.state_dict()} if self.ema is not None else {}),
            "rng": rng_state(),
            "config": self.cfg.to_dict(),
            "info": self.info,
            **self.extra_state(),
        }

    def _restore(self, state: dict[str, Any]) -> None:
        self.check_resumable(state)
        self.model.load_state_dict(state["model"])
        for agent in self.optimizers:
            self.optimizers[agent].load_state_dict(state["optimizers"][agent])
            self.schedulers[agent].load_state_dict(state["schedulers"][agent])
            self.scalers[agent].load_state_dict(state["scalers"][agent])
        self.iteration = state["iteration"]
        self.best_miou = state["best_miou"]
        self.best_iteration = state["best_iteration"]
        self.history = state.get("history", [])
        self.train_clock.elapsed_s = float(state.get("train_s", 0.0))
        if self.ema is not None:
            if "ema" in state:
                self.ema.load_state_dict(state["ema"])
            else:  # turned on when resuming: the average starts from here
                self.ema = build_ema(self.model, self.cfg.train.ema_decay)
        self.restore_extra(state)
        set_rng_state(state["rng"])
        notes = [
            continue_schedule(
                self.schedulers[agent],
                self.optimizers[agent],
                state["config"]["train"],
                self.cfg.train,
                self.iteration,
                self.train_clock.elapsed_s,
            )
            for agent in self.optimizers
        ]
        self.schedule_note = next(filter(None, notes), "")

    def save_checkpoint(self) -> None:
        if self.dist.is_main:
            save_training_state(self.ckpt_dir / "last.pt", self.state_dict())
        self.last_save = time.perf_counter()

    def loader(self, dataset: Dataset, batch: int, seed: int, key: str) -> DataLoader:
        """Batches indexed by iteration from ``self.iteration`` on (resume and DDP see the
        samples one uninterrupted process would); ``key`` names the batch size's config
        key in errors."""
        try:
            sampler = TrainBatchSampler(
                len(dataset),  # type: ignore[arg-type]
                batch,
                seed=seed,
                rank=self.dist.rank,
                world_size=self.dist.world_size,
                start_iteration=self.iteration,
            )
        except ValueError as err:
            raise ConfigError(f"{key}: {err}") from err
        workers = self.cfg.data.num_workers
        return DataLoader(
            SeededAugmentation(dataset),
            batch_sampler=sampler,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=workers > 0,
            generator=torch.Generator(),  # keep the global RNG untouched (resume equality)
            worker_init_fn=ignore_stop_signals if workers > 0 else None,
        )

    # -- the loop ----------------------------------------------------------------
    def _start_run(self, logger: RunLogger) -> None:
        cfg = self.cfg
        if not self.dist.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(
            weights_header(self.weight_sources) + cfg.to_yaml()
        )
        notes = [self.resume_note, self.schedule_note, self.precision_note]
        for line in [*describe_weights(self.weight_sources), *filter(None, notes)]:
            print(f"[{cfg.name}] {line}", flush=True)
        record = {"weights": self.weight_sources, **describe_schedule(cfg.train)}
        logger.log(self.iteration, "start", {**record, **self.precision})

    def _log_step(
        self, logger: RunLogger, bar: tqdm, values: dict[str, torch.Tensor], rate: float
    ) -> None:
        it = self.iteration
        reduced = {
            k: float(all_reduce_sum(v.clone()) / self.dist.world_size) for k, v in values.items()
        }
        bad = [k for k, v in reduced.items() if not math.isfinite(v)]
        if bad:
            raise TrainingError(
                f"{bad[0]} became {reduced[bad[0]]} at iteration {it}; "
                f"{self.divergence_hint}. The last checkpoint is kept."
            )
        if len(self.schedulers) == 1:
            lrs = {"lr": next(iter(self.schedulers.values())).get_last_lr()[0]}
        else:
            lrs = {f"lr_{a}": s.get_last_lr()[0] for a, s in self.schedulers.items()}
        logger.log(
            it,
            "train",
            {**reduced, **lrs, "img_per_s": rate, "train_s": self.train_clock.elapsed_s},
        )
        shown = {k: f"{v:.3f}" for k, v in reduced.items() if k.count("_") <= 1}
        shown |= {k: f"{v:.2e}" for k, v in lrs.items()}
        bar.set_postfix({**shown, "ips": f"{rate:.1f}"}, refresh=False)

    def train(self) -> TrainResult:
        cfg, t = self.cfg, self.cfg.train
        logger = RunLogger(self.run_dir, enabled=self.dist.is_main)
        self._start_run(logger)
        last_metrics: SegMetrics | None = None
        start_iter, start_time = self.iteration, time.perf_counter()
        timed = t.schedule == "time"
        bar = tqdm(
            total=None if timed else t.iterations,
            initial=self.iteration,
            disable=not self.show_progress,
            dynamic_ncols=True,
            desc=cfg.name,
            mininterval=0.5 if sys.stderr.isatty() else 30.0,  # keep log files short
        )
        streams = self.batch_streams()
        signals, stopped = StopSignals().install(), None
        try:
            while not schedule_done(t, self.iteration, self.train_clock):
                self.train_clock.start()
                values = self.train_step(streams)
                if self.ema is not None:
                    self.ema.update_parameters(self.model)
                self.train_clock.stop(self.dist, sync=timed)  # rank 0's clock decides
                it = self.iteration
                done = schedule_done(t, it, self.train_clock)
                if it % t.log_interval == 0 or done:
                    elapsed = time.perf_counter() - start_time
                    rate = (it - start_iter) * cfg.data.batch_size / max(elapsed, 1e-9)
                    self._log_step(logger, bar, values, rate)
                bar.update(1)
                out_of_time = time_is_up(self.dist, start_time, t.max_time_s)
                finished = done or out_of_time
                if (t.val_interval and it % t.val_interval == 0) or finished:
                    self.before_validation()
                    record, metrics, line = self.validation()
                    last_metrics = metrics if metrics is not None else last_metrics
                    logger.log(it, "val", {**record, "train_s": self.train_clock.elapsed_s})
                    self.history.append({"iteration": it, **record})
                    if metrics is not None and metrics.miou > self.best_miou:
                        self.best_miou, self.best_iteration = metrics.miou, it
                        if self.dist.is_main and self.save_weight_files:
                            save_weights(
                                self.ckpt_dir / "best.safetensors",
                                self.eval_model,
                                cfg,
                                {**self.info, "iteration": it, "miou": metrics.miou},
                            )
                    self.after_validation(it)
                    bar.write(f"[{cfg.name}] iteration {it}: {line}")
                by_time = t.checkpoint_interval_s and (
                    time.perf_counter() - self.last_save >= t.checkpoint_interval_s
                )
                by_count = t.checkpoint_interval and it % t.checkpoint_interval == 0
                if finished or by_time or by_count:
                    self.save_checkpoint()
                if out_of_time:
                    bar.write(
                        f"[{cfg.name}] train.max_time_s={t.max_time_s} reached at "
                        f"iteration {it}; stopping (resumable with --resume)"
                    )
                    break
                stopped = None if finished else signals.agreed(self.dist)
                if stopped is not None:  # SIGTERM, SIGUSR1 or Ctrl-C on any rank
                    if not (by_time or by_count):
                        self.save_checkpoint()
                    break
        except KeyboardInterrupt:
            self.save_checkpoint()
            bar.write(
                f"[{cfg.name}] interrupted at iteration {self.iteration}; checkpoint "
                f"saved to {self.ckpt_dir / 'last.pt'}; continue with --resume"
            )
            raise
        finally:
            signals.restore()
            bar.close()
            logger.close()
            self.run_lock.release()
        if stopped is not None:
            err = RunInterrupted(stopped, self.iteration, str(self.ckpt_dir / "last.pt"))
            if self.dist.is_main:
                print(f"[{cfg.name}] {err}", flush=True)
            raise err
        if self.dist.is_main and self.save_weight_files:
            save_weights(
                self.ckpt_dir / "final.safetensors",
                self.eval_model,
                cfg,
                {**self.info, "iteration": self.iteration},
            )
        return TrainResult(
            self.run_dir,
            self.iteration,
            self.best_miou,
            self.best_iteration,
            last_metrics,
            self.history,
            self.last_classifier_metrics(),
            self.train_clock.elapsed_s,
        )

    def last_classifier_metrics(self) -> dict[str, float] | None:
        return None
