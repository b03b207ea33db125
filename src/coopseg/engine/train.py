"""The training loop: SGD + poly lr, AMP, DDP, periodic validation, atomic resume.

A run lives in ``<out_dir>/<name>/``: ``config.yaml``, ``log.jsonl``, ``tb/``
(TensorBoard), ``checkpoints/last.pt`` (everything needed to resume) and
``checkpoints/best.safetensors`` (weights + config of the best validation mIoU).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..config import Config, ConfigError, TrainConfig, model_kwargs
from ..data import SeededAugmentation, SegmentationDataset, build_datasets
from ..data.sampling import TrainBatchSampler
from ..models import create_model
from ..models.backbones import find_backbones, stage_parameters, weight_sources
from .checkpoint import (
    init_model_from,
    previous_checkpoint,
    resume_state,
    rng_state,
    save_training_state,
    save_weights,
    set_rng_state,
)
from .distributed import DistInfo, all_reduce_sum, init_distributed
from .evaluate import (
    amp_dtype,
    autocast_context,
    center_region,
    check_class_count,
    evaluate_outputs,
    slide_window,
)
from .logging import RunLogger
from .loss import SegmentationLoss
from .metrics import SegMetrics


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss diverged); the message says what to try."""


def build_optimizer(model: nn.Module, t: TrainConfig) -> torch.optim.Optimizer:
    """SGD with momentum (the papers' choice) or AdamW (faster from random init).

    Backbone weights (every module that records a ``pretrained_source``) form their own
    group at ``train.backbone_lr_mult`` x ``train.lr``; a multiplier of 0 freezes them, and
    ``train.frozen_stages`` freezes the shallowest stages.
    """
    backbones = list(find_backbones(model).values())
    backbone_ids = {id(p) for module in backbones for p in module.parameters()}
    try:
        frozen = [p for module in backbones for p in stage_parameters(module, t.frozen_stages)]
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if t.backbone_lr_mult == 0:
        frozen = [p for module in backbones for p in module.parameters()]
    for p in frozen:
        p.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    backbone = [p for p in trainable if id(p) in backbone_ids]
    head = [p for p in trainable if id(p) not in backbone_ids]
    groups = [{"params": head, "lr": t.lr}]
    if backbone:
        groups.append({"params": backbone, "lr": t.lr * t.backbone_lr_mult})
    if t.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay, nesterov=t.nesterov
        )
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay)
    raise ConfigError(f"train.optimizer: expected sgd or adamw, got {t.optimizer!r}")


def poly_lambda(iterations: int, power: float, warmup: int = 0):
    """lr factor at an iteration: linear warm-up over ``warmup`` steps, then poly decay."""

    def factor(it: int) -> float:
        decay = max(0.0, 1.0 - it / iterations) ** power
        return decay * min(1.0, (it + 1) / warmup) if warmup > 0 else decay

    return factor


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


def continue_schedule(
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    optimizer: torch.optim.Optimizer,
    saved: dict[str, Any],
    train_cfg: TrainConfig,
    iteration: int,
) -> str:
    """Resuming with a changed schedule (``--set train.iterations=N`` to extend a finished
    run): the lr continues on the new schedule from where the run stands, i.e. at the
    value a run configured with the new length would have at this iteration (the
    optimizer's restored lr is the old schedule's, 0 at its end). Returns what changed."""
    keys = ("iterations", "poly_power", "warmup_iterations")
    changed = {k: (saved.get(k), getattr(train_cfg, k)) for k in keys}
    changed = {k: v for k, v in changed.items() if v[0] != v[1]}
    if not changed:
        return ""
    if iteration > train_cfg.iterations:
        raise TrainingError(
            f"train.iterations={train_cfg.iterations} is below the checkpoint's iteration "
            f"{iteration}; give a larger value to extend the run"
        )
    for group, base, factor in zip(
        optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True
    ):
        group["lr"] = base * factor(iteration)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    what = ", ".join(f"train.{k} {a} -> {b}" for k, (a, b) in changed.items())
    lr = optimizer.param_groups[0]["lr"]
    return f"schedule changed ({what}): lr continues at {lr:.3g} from iteration {iteration}"


@dataclass
class TrainResult:
    run_dir: Path
    iteration: int
    best_miou: float
    best_iteration: int
    last_metrics: SegMetrics | None
    history: list[dict[str, Any]] = field(default_factory=list)


def dataset_info(dataset: SegmentationDataset) -> dict[str, Any]:
    return {
        "class_names": list(dataset.class_names),
        "palette": [list(map(int, c)) for c in dataset.palette],
        "ignore_index": dataset.ignore_index,
    }


def build_criterion(model: nn.Module, t: TrainConfig, world_size: int) -> SegmentationLoss:
    """The segmentation loss: the model's default aux weights, overridden by the config's
    (``aux_context`` also sets every member's ``<name>.aux_context``), plus the loss options."""
    aux = dict(getattr(model, "default_aux_weights", {}))
    for key, weight in t.aux_weights.items():
        for name in aux:
            if name.rpartition(".")[2] == key:
                aux[name] = weight
        aux[key] = weight
    return SegmentationLoss(
        aux,
        world_size=world_size,
        class_weights=t.class_weights,
        ohem_thresh=t.ohem_thresh,
        ohem_min_kept=t.ohem_min_kept,
    )


def place_model(
    model: nn.Module, dist: DistInfo, channels_last: bool, find_unused_parameters: bool = False
) -> tuple[nn.Module, nn.Module]:
    """``(model, ddp_model)``: on the device, channels-last if asked, SyncBN and DDP when
    distributed (SyncBN on CUDA only); ``ddp_model`` is ``model`` in a single process."""
    model = model.to(dist.device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if dist.distributed and dist.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if not dist.distributed:
        return model, model
    ddp = DistributedDataParallel(
        model,
        device_ids=[dist.device] if dist.device.type == "cuda" else None,
        find_unused_parameters=find_unused_parameters,
    )
    return model, ddp


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


class Trainer:
    """Builds everything a run needs from a :class:`Config` and trains it."""

    def __init__(
        self, cfg: Config, *, resume: bool | str | None = None, show_progress: bool = True
    ) -> None:
        self.cfg = cfg
        self.dist: DistInfo = init_distributed(cfg.device)
        self.output_metrics: dict[str, SegMetrics] = {}
        self.device = self.dist.device
        self.run_dir = cfg.run_dir
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.show_progress = show_progress and self.dist.is_main
        torch.manual_seed(cfg.seed)

        self.train_set, self.val_set = build_datasets(cfg.data)
        check_class_count(cfg, self.train_set)
        self.info = dataset_info(self.train_set)

        arch, kwargs = model_kwargs(cfg.model)
        self.channels_last = cfg.train.channels_last
        self.model, self.ddp_model = place_model(
            create_model(arch, **kwargs), self.dist, self.channels_last
        )
        model = self.model
        self.weight_sources = weight_sources(model)
        if cfg.train.init_from and not resume:  # a resumed run restores its own weights
            init_model_from(model, cfg.train.init_from)
            self.weight_sources = dict.fromkeys(
                self.weight_sources or {"model": ""}, f"init_from:{cfg.train.init_from}"
            )
        self.criterion = build_criterion(model, cfg.train, self.dist.world_size)
        self.slide = slide_window(cfg.eval, cfg.data.crop_size)
        self.center = center_region(cfg.eval, cfg.data.crop_size)
        t = cfg.train
        self.optimizer = build_optimizer(model, t)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, poly_lambda(t.iterations, t.poly_power, t.warmup_iterations)
        )
        self.amp_dtype = amp_dtype(t.amp, self.device)
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=self.amp_dtype == torch.float16
        )
        self.iteration = 0
        self.best_miou = -1.0
        self.best_iteration = 0
        self.best_by_output: dict[str, float] = {}  # cooperative: each output's best mIoU
        self.history: list[dict[str, Any]] = []
        self.schedule_note = ""
        self.last_save = time.perf_counter()  # train.checkpoint_interval_s counts from here
        resume = cfg.train.resume if resume is None else resume
        state, self.resume_note = start_state(self.ckpt_dir / "last.pt", resume)
        if state is not None:
            self._restore(state)

    # -- state -----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "iteration": self.iteration,
            "best_miou": self.best_miou,
            "best_iteration": self.best_iteration,
            "best_by_output": self.best_by_output,
            "history": self.history,
            "rng": rng_state(),
            "config": self.cfg.to_dict(),
            "info": self.info,
        }

    def _restore(self, state: dict[str, Any]) -> None:
        saved_model = state["config"]["model"]
        if saved_model != self.cfg.model:
            raise TrainingError(
                f"cannot resume {self.ckpt_dir / 'last.pt'}: its model section {saved_model} "
                f"differs from the config's {self.cfg.model}"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.iteration = state["iteration"]
        self.best_miou = state["best_miou"]
        self.best_iteration = state["best_iteration"]
        self.best_by_output = dict(state.get("best_by_output", {}))
        self.history = state.get("history", [])
        set_rng_state(state["rng"])
        self.schedule_note = continue_schedule(
            self.scheduler, self.optimizer, state["config"]["train"], self.cfg.train, self.iteration
        )

    def save_checkpoint(self) -> None:
        if self.dist.is_main:
            save_training_state(self.ckpt_dir / "last.pt", self.state_dict())
        self.last_save = time.perf_counter()

    # -- loop --------------------------------------------------------------------
    def _loader(self) -> DataLoader:
        sampler = TrainBatchSampler(
            len(self.train_set),
            self.cfg.data.batch_size,
            seed=self.cfg.seed,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            start_iteration=self.iteration,
        )
        workers = self.cfg.data.num_workers
        return DataLoader(
            SeededAugmentation(self.train_set),
            batch_sampler=sampler,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=workers > 0,
            generator=torch.Generator(),  # keep the global RNG untouched (resume equality)
        )

    def validate(self) -> SegMetrics:
        """Metrics of the model's prediction (a cooperative model's reported output,
        ``model.report``); every output's metrics are kept in ``self.output_metrics``."""
        self.output_metrics = evaluate_outputs(
            self.model,
            self.val_set,
            self.train_set.num_classes,
            dist=self.dist,
            batch_size=self.cfg.data.val_batch_size,
            scales=self.cfg.eval.scales,
            flip=self.cfg.eval.flip,
            amp_dtype=self.amp_dtype,
            num_workers=self.cfg.data.num_workers,
            channels_last=self.channels_last,
            slide=self.slide,
            center=self.center,
        )
        return next(iter(self.output_metrics.values()))

    def _save_best_per_output(self, iteration: int) -> None:
        """Cooperative models: ``best-<output>.safetensors`` for every output (``fused``
        and each member), chosen by that output's own mIoU -- the papers report each
        network at its best, not at the fused output's best. Loading one selects its
        output (``info["output"]``)."""
        if len(self.output_metrics) < 2:
            return
        for name, metrics in self.output_metrics.items():
            if metrics.miou <= self.best_by_output.get(name, -1.0):
                continue
            self.best_by_output[name] = metrics.miou
            if self.dist.is_main:
                save_weights(
                    self.ckpt_dir / f"best-{name}.safetensors",
                    self.model,
                    self.cfg,
                    {**self.info, "iteration": iteration, "miou": metrics.miou, "output": name},
                )

    def step(self, images: torch.Tensor, masks: torch.Tensor) -> dict[str, float]:
        images = images.to(self.device, non_blocking=True)
        masks = masks.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast_context(self.device, self.amp_dtype):
            outputs = self.ddp_model(images)
        loss, parts = self.criterion(outputs, masks)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.iteration += 1
        return {"loss": loss.detach(), **{f"loss_{k}": v for k, v in parts.items()}}

    def train(self) -> TrainResult:
        cfg, t = self.cfg, self.cfg.train
        logger = RunLogger(self.run_dir, enabled=self.dist.is_main)
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(
                weights_header(self.weight_sources) + cfg.to_yaml()
            )
            notes = [self.resume_note, self.schedule_note]
            for line in [*describe_weights(self.weight_sources), *filter(None, notes)]:
                print(f"[{cfg.name}] {line}", flush=True)
            logger.log(self.iteration, "start", {"weights": self.weight_sources})
        last_metrics: SegMetrics | None = None
        start_iter, start_time = self.iteration, time.perf_counter()
        bar = tqdm(
            total=t.iterations,
            initial=self.iteration,
            disable=not self.show_progress,
            dynamic_ncols=True,
            desc=cfg.name,
            mininterval=0.5 if sys.stderr.isatty() else 30.0,  # keep log files short
        )
        loader_iter = iter(self._loader())
        try:
            while self.iteration < t.iterations:
                images, masks = next(loader_iter)
                values = self.step(images, masks)
                it = self.iteration
                if it % t.log_interval == 0 or it == t.iterations:
                    reduced = {
                        k: float(all_reduce_sum(v.clone()) / self.dist.world_size)
                        for k, v in values.items()
                    }
                    if not math.isfinite(reduced["loss"]):
                        raise TrainingError(
                            f"loss became {reduced['loss']} at iteration {it}; lower train.lr "
                            "or turn off train.amp. The last checkpoint is kept."
                        )
                    elapsed = time.perf_counter() - start_time
                    ips = (it - start_iter) * cfg.data.batch_size / max(elapsed, 1e-9)
                    lr = self.scheduler.get_last_lr()[0]
                    logger.log(it, "train", {**reduced, "lr": lr, "img_per_s": ips})
                    bar.set_postfix(
                        loss=f"{reduced['loss']:.3f}",
                        lr=f"{lr:.2e}",
                        ips=f"{ips:.1f}",
                        refresh=False,
                    )
                bar.update(1)
                out_of_time = time_is_up(self.dist, start_time, t.max_time_s)
                finished = it == t.iterations or out_of_time
                if (t.val_interval and it % t.val_interval == 0) or finished:
                    last_metrics = self.validate()
                    record = {
                        "miou": last_metrics.miou,
                        "pixel_acc": last_metrics.pixel_acc,
                        "mean_acc": last_metrics.mean_acc,
                    }
                    if len(self.output_metrics) > 1:  # cooperative: each member too
                        record |= {f"miou_{k}": m.miou for k, m in self.output_metrics.items()}
                    logger.log(it, "val", record)
                    self.history.append({"iteration": it, **record})
                    if last_metrics.miou > self.best_miou:
                        self.best_miou, self.best_iteration = last_metrics.miou, it
                        if self.dist.is_main:
                            save_weights(
                                self.ckpt_dir / "best.safetensors",
                                self.model,
                                cfg,
                                {**self.info, "iteration": it, "miou": last_metrics.miou},
                            )
                    self._save_best_per_output(it)
                    members = ", ".join(
                        f"{k} {100 * m.miou:.2f}" for k, m in list(self.output_metrics.items())[1:]
                    )
                    bar.write(
                        f"[{cfg.name}] iteration {it}: val mIoU {100 * last_metrics.miou:.2f}"
                        + (f" ({members})" if members else "")
                    )
                by_time = t.checkpoint_interval_s and (
                    time.perf_counter() - self.last_save >= t.checkpoint_interval_s
                )
                if (
                    finished
                    or by_time
                    or (t.checkpoint_interval and it % t.checkpoint_interval == 0)
                ):
                    self.save_checkpoint()
                if out_of_time:
                    bar.write(
                        f"[{cfg.name}] train.max_time_s={t.max_time_s} reached at "
                        f"iteration {it}; stopping (resumable with --resume)"
                    )
                    break
        except KeyboardInterrupt:
            self.save_checkpoint()
            bar.write(
                f"[{cfg.name}] interrupted at iteration {self.iteration}; checkpoint "
                f"saved to {self.ckpt_dir / 'last.pt'}; continue with --resume"
            )
            raise
        finally:
            bar.close()
            logger.close()
        if self.dist.is_main:
            save_weights(
                self.ckpt_dir / "final.safetensors",
                self.model,
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
        )


def train(
    cfg: Config, *, resume: bool | str | None = None, show_progress: bool = True
) -> TrainResult:
    """Train ``cfg``; ``resume`` (default ``train.resume``): True continues from
    ``<run_dir>/checkpoints/last.pt``, ``"auto"`` does if there is one."""
    return Trainer(cfg, resume=resume, show_progress=show_progress).train()
