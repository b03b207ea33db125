"""Segmentation training: one model (or a cooperative set of members) and one optimizer.

A run lives in ``<out_dir>/<name>/``: ``config.yaml``, ``log.jsonl``, ``tb/``
(TensorBoard), ``checkpoints/last.pt`` (everything needed to resume; the one before it
as ``last.prev.pt``) and ``checkpoints/best.safetensors`` (weights + config of the best
validation mIoU). The loop itself is :class:`~coopseg.engine.loop.TrainingLoop`.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..config import Config, ConfigError, TrainConfig, model_kwargs
from ..data import SegmentationDataset, build_datasets
from ..data.sizes import fit_crop
from ..models import create_model
from ..models.backbones import find_backbones, stage_parameters, weight_sources
from .checkpoint import CheckpointError, init_model_from, save_weights
from .distill import Teacher, mutual_loss, soft_kl, student_logits
from .distributed import DistInfo
from .evaluate import check_class_count, evaluate_outputs
from .inference import autocast_context, center_region, slide_window
from .loop import TrainingError, TrainingLoop, TrainResult
from .loss import SegmentationLoss
from .metrics import SegMetrics
from .precision import Step, training_precision
from .schedule import poly_lambda

__all__ = ["TrainResult", "Trainer", "TrainingError", "poly_lambda", "train"]

PRECISE_BN_SEED_OFFSET = 104_729  # the precise-BN batches differ from the training stream


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


def dataset_info(dataset: SegmentationDataset) -> dict[str, Any]:
    return {
        "class_names": list(dataset.class_names),
        "palette": [list(map(int, c)) for c in dataset.palette],
        "ignore_index": dataset.ignore_index,
    }


def build_criterion(model: nn.Module, t: TrainConfig, world_size: int) -> SegmentationLoss:
    """The segmentation loss: the model's default aux weights, overridden by the config's
    (``aux_context`` also sets every member's ``<name>.aux_context``), plus the terms of
    ``train.loss``."""
    aux = dict(getattr(model, "default_aux_weights", {}))
    for key, weight in t.aux_weights.items():
        for name in aux:
            if name.rpartition(".")[2] == key:
                aux[name] = weight
        aux[key] = weight
    return SegmentationLoss.from_config(aux, t, world_size)


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


class Trainer(TrainingLoop):
    """Builds everything a segmentation run needs from a :class:`Config` and trains it."""

    def __init__(
        self, cfg: Config, *, resume: bool | str | None = None, show_progress: bool = True
    ) -> None:
        super().__init__(cfg, show_progress)
        self.output_metrics: dict[str, SegMetrics] = {}
        self.best_by_output: dict[str, float] = {}  # cooperative: each output's best mIoU
        self.crop_notes = fit_crop(cfg.data)  # crop_size auto resolved; a crop far too large
        if self.dist.is_main:
            for line in self.crop_notes:
                print(f"[{cfg.name}] {line}", flush=True)
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
        resuming = (cfg.train.resume if resume is None else resume) is True
        if cfg.train.init_from and not resuming:  # a resumed run restores its own weights
            init_model_from(model, cfg.train.init_from)
            self.weight_sources = dict.fromkeys(
                self.weight_sources or {"model": ""}, f"init_from:{cfg.train.init_from}"
            )
        self.criterion = build_criterion(model, cfg.train, self.dist.world_size)
        self.teacher = None
        if cfg.train.teacher:
            try:
                self.teacher = Teacher(
                    cfg.train.teacher,
                    cfg.train.teacher_output,
                    self.train_set.num_classes,
                    self.device,
                )
            except (ValueError, CheckpointError) as err:
                raise ConfigError(str(err)) from None
        self.slide = slide_window(cfg.eval, cfg.data.crop_size)
        self.center = center_region(cfg.eval, cfg.data.crop_size)
        t = cfg.train
        self.optimizers["seg"] = build_optimizer(model, t)
        self.schedulers["seg"] = self.build_scheduler(self.optimizer)
        self.amp_dtype, self.precision, self.precision_note = training_precision(
            t.amp, self.device, self.probe_step, self.dist
        )
        self.scalers["seg"] = torch.amp.GradScaler(
            self.device.type, enabled=self.amp_dtype == torch.float16
        )
        self.begin(resume)

    def probe_step(self) -> Step:
        """A training step in a given precision on a copy of the model and a random batch
        of the run's shape (``train.amp: auto``'s probe; the run's state stays as it is)."""
        model = copy.deepcopy(self.model)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0)
        d = self.cfg.data
        g = torch.Generator().manual_seed(0)
        bands = getattr(self.model, "in_chans", None) or 3  # N-band models probe N bands
        images = torch.randn(d.batch_size // self.dist.world_size, bands, *d.crop_size, generator=g)
        masks = torch.randint(
            0, self.train_set.num_classes, (len(images), *d.crop_size), generator=g
        )
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)

        def step(dtype: torch.dtype | None) -> None:
            with autocast_context(self.device, dtype):
                outputs = model(images)
            loss, _ = self.criterion(outputs, masks)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        return step

    def bn_batches(self, count: int) -> Iterator[torch.Tensor]:
        """``count`` augmented training batches, a stream of their own that depends on the
        iteration (resume sees the same ones), for the precise-BN pass."""
        d = self.cfg.data
        loader = self.loader(
            self.train_set, d.batch_size, self.cfg.seed + PRECISE_BN_SEED_OFFSET, "data.batch_size"
        )
        for images, _ in itertools.islice(loader, count):
            images = images.to(self.device, non_blocking=True)
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            yield images

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.optimizers["seg"]

    @property
    def scheduler(self) -> torch.optim.lr_scheduler.LambdaLR:
        return self.schedulers["seg"]

    @property
    def scaler(self) -> torch.amp.GradScaler:
        return self.scalers["seg"]

    def extra_state(self) -> dict[str, Any]:
        return {"best_by_output": self.best_by_output}

    def restore_extra(self, state: dict[str, Any]) -> None:
        self.best_by_output = dict(state.get("best_by_output", {}))

    def validate(self) -> SegMetrics:
        """Metrics of the model's prediction (a cooperative model's reported output,
        ``model.report``); every output's metrics are kept in ``self.output_metrics``."""
        self.output_metrics = evaluate_outputs(
            self.eval_model,
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

    def validation(self) -> tuple[dict[str, float], SegMetrics | None, str]:
        metrics = self.validate()
        record = {
            "miou": metrics.miou,
            "pixel_acc": metrics.pixel_acc,
            "mean_acc": metrics.mean_acc,
        }
        if len(self.output_metrics) > 1:  # cooperative: each output too
            record |= {f"miou_{k}": m.miou for k, m in self.output_metrics.items()}
        others = ", ".join(
            f"{k} {100 * m.miou:.2f}" for k, m in list(self.output_metrics.items())[1:]
        )
        line = f"val mIoU {100 * metrics.miou:.2f}" + (f" ({others})" if others else "")
        return record, metrics, line

    def after_validation(self, iteration: int) -> None:
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
                    self.eval_model,
                    self.cfg,
                    {**self.info, "iteration": iteration, "miou": metrics.miou, "output": name},
                )

    def batch_streams(self) -> dict[str, Iterator]:
        d = self.cfg.data
        return {
            "seg": iter(self.loader(self.train_set, d.batch_size, self.cfg.seed, "data.batch_size"))
        }

    def train_step(self, streams: dict[str, Iterator]) -> dict[str, torch.Tensor]:
        return self.step(*next(streams["seg"]))

    def step(self, images: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
        images = images.to(self.device, non_blocking=True)
        masks = masks.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast_context(self.device, self.amp_dtype):
            outputs = self.ddp_model(images)
        loss, parts = self.criterion(outputs, masks)
        t = self.cfg.train
        if t.mutual_weight > 0:
            term = mutual_loss(outputs, masks, t.mutual_temperature)
            loss, parts["mutual"] = loss + t.mutual_weight * term, term.detach()
        if self.teacher is not None:
            with autocast_context(self.device, self.amp_dtype):
                target = self.teacher(images)
            term = soft_kl(student_logits(outputs), target, masks, t.teacher_temperature)
            loss, parts["teacher"] = loss + t.teacher_weight * term, term.detach()
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.iteration += 1
        return {"loss": loss.detach(), **{f"loss_{k}": v for k, v in parts.items()}}


def train(
    cfg: Config, *, resume: bool | str | None = None, show_progress: bool = True
) -> TrainResult:
    """Train ``cfg``; ``resume`` (default ``train.resume``): True continues from
    ``<run_dir>/checkpoints/last.pt``, ``"auto"`` does if there is one."""
    return Trainer(cfg, resume=resume, show_progress=show_progress).train()
