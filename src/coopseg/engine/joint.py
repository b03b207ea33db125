"""JointSeg's cooperative training: two agents, two optimizers, one shared encoder.

Every iteration the classifier agent takes one step on a classification batch
(``joint.cls_batch_ratio`` x ``data.batch_size`` images with labels, no masks) with its
optimizer over M ∪ C at ``joint.cls_lr_ratio`` x ``train.lr``; then the segmentation
agent takes one step on a segmentation batch (``data.batch_size`` images with masks)
with its optimizer over M ∪ S at ``train.lr``. The shared encoder M is therefore moved
by both, at their own rates and with their own momentum. Both use ``train.optimizer``
(SGD with ``train.nesterov``: the paper's Nesterov momentum) and the poly schedule.
Paper: "the learning rate is 30 times", "the batch size ... is 32 times"; the order of
the two steps within an iteration is ours.

Data: both streams use every ``data.*`` augmentation option (``vflip``, ``random_pad``,
``normalize``; paper: flips left/right and up/down and random padding "for both
classification and segmentation", each image standardised). The classifier stream alone
adds ``joint.cls_hue/cls_contrast/cls_saturation`` jitter (paper: "for classification
additional augmentation") and sees whole scenes, never rescaled (ours: so that the grade,
an object count, stays true; ``random_pad`` may still shift a border object out).

Everything else is the one training loop (:class:`~coopseg.engine.loop.TrainingLoop`):
iteration-indexed batches (resume and DDP see the same samples), logging, validation,
resume (``train.resume: auto``, ``last.prev.pt``), checkpoints by iteration and time,
each agent's optimizer, scheduler and scaler in ``last.pt``. The segmenter trains with
SegmentationLoss and is scored with ``evaluate``; the classifier is evaluated on the
validation scenes' clean labels: top-1, top-2 and binary (normal vs abnormal) accuracy.

``JointTrainer(cfg, model=..., tasks=...)`` also runs the bench's baselines with the
same loop: ``tasks=("seg",)`` trains any segmentation model (e.g. U-Net on a JointSeg
encoder) with the segmenter's optimizer alone; ``tasks=("cls",)`` trains a JointSeg's
encoder + classifier node alone (a plain classifier of the same encoder).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..config import Config, ConfigError, model_kwargs
from ..data import FashionScenes
from ..data.fashionscenes import NUM_CLASSES, build_fashionscenes
from ..data.joint import (
    BINARY_RULES,
    ClassificationScenes,
    binary_labels,
    check_area_edges,
    joint_scenes,
    noisy_labels,
    num_cls_classes,
    predicted_abnormal,
    scene_class_labels,
)
from ..data.sampling import shard_indices
from ..data.sizes import fit_crop
from ..data.transforms import NORMALIZE_MODES, data_transform
from ..models import create_model
from .distributed import DistInfo, all_reduce_sum, init_distributed
from .evaluate import check_class_count, evaluate
from .inference import amp_dtype, autocast_context
from .loop import TrainingError, TrainingLoop, TrainResult
from .metrics import SegMetrics
from .train import (
    build_criterion,
    build_optimizer,
    dataset_info,
    place_model,
)

AGENTS = ("cls", "seg")
CLS_SEED_OFFSET = 7919  # the classifier's batch stream differs from the segmenter's


def check_joint(cfg: Config) -> None:
    """Ranges of the ``joint`` section the schema cannot express; errors name the key."""
    j = cfg.joint
    if j.cls_lr_ratio <= 0:
        raise ConfigError(f"joint.cls_lr_ratio: expected > 0, got {j.cls_lr_ratio}")
    if j.cls_batch_ratio < 1:
        raise ConfigError(f"joint.cls_batch_ratio: expected >= 1, got {j.cls_batch_ratio}")
    if not 0.0 <= j.cls_label_noise <= 1.0:
        raise ConfigError(f"joint.cls_label_noise: expected in [0, 1], got {j.cls_label_noise}")
    if j.cls_scenes < 1:
        raise ConfigError(f"joint.cls_scenes: expected >= 1, got {j.cls_scenes}")
    if j.binary_rule not in BINARY_RULES:
        raise ConfigError(
            f"joint.binary_rule: expected one of {list(BINARY_RULES)}, got {j.binary_rule!r}"
        )
    if not j.count_classes or not all(1 <= c < NUM_CLASSES for c in j.count_classes):
        raise ConfigError(
            f"joint.count_classes: expected object classes in 1..{NUM_CLASSES - 1}, "
            f"got {j.count_classes}"
        )
    try:
        check_area_edges(j.area_edges)
    except ValueError as exc:
        raise ConfigError(f"joint.{exc}") from None
    if j.cls_data == "separate" and j.cls_scene_seed == cfg.data.scene_seed:
        raise ConfigError(
            f"joint.cls_scene_seed: equals data.scene_seed ({j.cls_scene_seed}), so the "
            "separate classifier scenes would repeat the segmenter's; choose another seed"
        )
    if not 0.0 <= j.cls_hue <= 0.5:
        raise ConfigError(f"joint.cls_hue: expected in [0, 0.5], got {j.cls_hue}")
    for key in ("cls_contrast", "cls_saturation"):
        if getattr(j, key) < 0:
            raise ConfigError(f"joint.{key}: expected >= 0, got {getattr(j, key)}")
    d = cfg.data
    if d.normalize not in NORMALIZE_MODES:
        raise ConfigError(
            f"data.normalize: expected one of {list(NORMALIZE_MODES)}, got {d.normalize!r}"
        )
    if d.random_pad < 0:
        raise ConfigError(f"data.random_pad: expected >= 0, got {d.random_pad}")
    if cfg.data.dataset != "fashionscenes":
        raise ConfigError(
            f"joint: classifier labels are derived from FashionScenes scenes; data.dataset "
            f"{cfg.data.dataset!r} has no image-level labels"
        )


def classifier_scenes_root(cfg: Config) -> Path:
    """Build (or reuse) the classifier's own scenes of ``joint.cls_data: separate``: the
    training split of a FashionScenes build with ``joint.cls_scenes`` scenes and generator
    seed ``joint.cls_scene_seed`` (scene i of a build depends on (seed, split, i) alone,
    so another seed shares no scene with the segmenter's train or val split)."""
    d, j = cfg.data, cfg.joint
    return build_fashionscenes(
        None,
        size=d.scene_size,
        train=j.cls_scenes,
        val=1,
        seed=j.cls_scene_seed,
        source=Path(d.source) if d.source else None,
    )


# -- classifier evaluation ---------------------------------------------------------
@torch.no_grad()
def evaluate_classifier(
    model: nn.Module,
    dataset: Dataset,
    binary_normal: list[int],
    *,
    dist: DistInfo,
    batch_size: int = 16,
    amp: torch.dtype | None = None,
    binary_rule: str = "argmax",
) -> dict[str, float]:
    """Top-1, top-2 and binary accuracy (fractions) of ``model(x, task="cls")["cls"]``.

    Binary (paper: levels >= 1 abnormal, level 0 normal): the prediction's group
    (:func:`coopseg.data.joint.predicted_abnormal`, by ``binary_rule``) is compared with
    the label's. With DDP each rank takes a shard and the counts are summed.
    """
    was_training = model.training
    model.eval()
    device = dist.device
    shard = Subset(dataset, shard_indices(len(dataset), dist.rank, dist.world_size))
    loader = DataLoader(shard, batch_size=batch_size, generator=torch.Generator())
    counts = torch.zeros(4, dtype=torch.float64, device=device)  # top1, top2, binary, n
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        with autocast_context(device, amp):
            logits = model(images, task="cls")["cls"].float()
        k = min(2, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        pred_abnormal = predicted_abnormal(logits, binary_normal, binary_rule)
        true_abnormal = torch.as_tensor(binary_labels(labels, binary_normal), device=device)
        counts[0] += (top[:, 0] == labels).sum()
        counts[1] += (top == labels[:, None]).any(1).sum()
        counts[2] += (pred_abnormal == true_abnormal).sum()
        counts[3] += len(labels)
    all_reduce_sum(counts)
    model.train(was_training)
    n = max(float(counts[3]), 1.0)
    return {
        "top1": float(counts[0]) / n,
        "top2": float(counts[1]) / n,
        "binary": float(counts[2]) / n,
        "samples": int(counts[3]),
    }


def classifier_val_set(cfg: Config, val_set: FashionScenes) -> ClassificationScenes:
    """The validation scenes with their clean classifier labels."""
    j = cfg.joint
    labels = scene_class_labels(val_set, j.cls_label, j.count_classes, j.area_edges)
    return ClassificationScenes(val_set, labels)


def format_cls_table(metrics: dict[str, float], title: str | None = None) -> str:
    rows = [("Top-1 %", metrics["top1"]), ("Top-2 %", metrics["top2"])]
    rows.append(("Binary %", metrics["binary"]))
    lines = [title] if title else []
    lines += ["Classifier   Acc", "-----------  ------"]
    lines += [f"{name:<11}  {100 * v:6.2f}" for name, v in rows]
    return "\n".join(lines)


def evaluate_classifier_checkpoint(
    cfg: Config, model: nn.Module, json_path: Path | None = None
) -> dict[str, float]:
    """``coopseg eval`` for a JointSeg checkpoint's classifier: print, and add the metrics
    under ``"classifier"`` to the JSON report the segmentation evaluation wrote."""
    dist = init_distributed(cfg.device)
    check_joint(cfg)
    val_set = joint_scenes(cfg.data, "val")
    metrics = evaluate_classifier(
        model.to(dist.device),
        classifier_val_set(cfg, val_set),
        cfg.joint.binary_normal,
        dist=dist,
        batch_size=cfg.data.val_batch_size,
        amp=amp_dtype(cfg.train.amp, dist.device),
        binary_rule=cfg.joint.binary_rule,
    )
    if dist.is_main:
        title = f"{cfg.name}: classifier ({cfg.joint.cls_label} labels, {len(val_set)} scenes)"
        print(format_cls_table(metrics, title))
        if json_path is not None:
            report = json.loads(json_path.read_text()) if json_path.is_file() else {}
            report["classifier"] = {
                **metrics,
                "label": cfg.joint.cls_label,
                "binary_normal": cfg.joint.binary_normal,
                "binary_rule": cfg.joint.binary_rule,
                "count_classes": cfg.joint.count_classes,
                "area_edges": cfg.joint.area_edges,
            }
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(report, indent=2))
    return metrics


# -- the trainer --------------------------------------------------------------------
JointResult = TrainResult  # with ``last_cls``: the classifier agent's last metrics


class JointTrainer(TrainingLoop):
    """Two agents over one shared encoder, each with its own optimizer (module doc)."""

    divergence_hint = "lower train.lr (or joint.cls_lr_ratio) or turn off train.amp"

    def __init__(
        self,
        cfg: Config,
        *,
        resume: bool | str | None = None,
        show_progress: bool = True,
        model: nn.Module | None = None,
        tasks: tuple[str, ...] = AGENTS,
    ) -> None:
        check_joint(cfg)
        if not tasks or set(tasks) - set(AGENTS):
            raise ValueError(f"tasks must be a non-empty subset of {AGENTS}, got {tasks}")
        super().__init__(cfg, show_progress)
        self.tasks = tuple(t for t in AGENTS if t in tasks)
        t, j = cfg.train, cfg.joint
        for line in fit_crop(cfg.data):  # crop_size auto resolved; a crop far too large
            if self.dist.is_main:
                print(f"[{cfg.name}] {line}", flush=True)

        self.train_set, self.val_set = (
            joint_scenes(cfg.data, "train"),
            joint_scenes(cfg.data, "val"),
        )
        check_class_count(cfg, self.train_set)
        self.info = dataset_info(self.train_set)
        self.num_cls_classes = num_cls_classes(j.cls_label)
        self.cls_set, self.noisy_indices = self._classifier_data()
        self.cls_val_set = classifier_val_set(cfg, self.val_set)
        self.last_cls: dict[str, float] | None = None

        self.custom_model = model is not None
        self.save_weight_files = not self.custom_model  # bench baselines keep no files
        if model is None:
            arch, kwargs = model_kwargs(cfg.model)
            if arch != "jointseg":
                raise ConfigError(f"JointTrainer trains model.arch jointseg, not {arch!r}")
            model = create_model(arch, **kwargs)
        self.joint_model = hasattr(model, "agent_parameters")
        if "cls" in self.tasks:
            if not self.joint_model:
                raise ValueError("a classifier agent needs a model with agent_parameters()")
            if getattr(model, "num_cls_classes", None) != self.num_cls_classes:
                raise ConfigError(
                    f"model.num_cls_classes is {getattr(model, 'num_cls_classes', None)} but "
                    f"joint.cls_label {j.cls_label!r} has {self.num_cls_classes} classes"
                )
        self.channels_last = t.channels_last
        # each agent's pass leaves the other's part idle: DDP must allow unused parameters
        self.model, self.ddp_model = place_model(
            model, self.dist, self.channels_last, find_unused_parameters=True
        )
        model = self.model
        self.criterion = build_criterion(model, t, self.dist.world_size)
        self.amp_dtype = amp_dtype(t.amp, self.device)
        for agent in self.tasks:
            params = model.agent_parameters(agent) if self.joint_model else list(model.parameters())
            settings = dataclasses.replace(t, lr=self.agent_lr(agent))
            if agent == "cls" and j.cls_weight_decay is not None:
                settings = dataclasses.replace(settings, weight_decay=j.cls_weight_decay)
            optimizer = build_optimizer(nn.ParameterList(params), settings)
            self.optimizers[agent] = optimizer
            self.schedulers[agent] = self.build_scheduler(optimizer)
            self.scalers[agent] = torch.amp.GradScaler(
                self.device.type, enabled=self.amp_dtype == torch.float16
            )
        self.begin(resume)

    def agent_lr(self, agent: str) -> float:
        """The base lr of an agent: ``train.lr``, times ``joint.cls_lr_ratio`` for C."""
        return self.cfg.train.lr * (self.cfg.joint.cls_lr_ratio if agent == "cls" else 1.0)

    @property
    def cls_batch_size(self) -> int:
        return self.cfg.data.batch_size * self.cfg.joint.cls_batch_ratio

    def _classifier_data(self) -> tuple[ClassificationScenes, Any]:
        """Scenes for the classifier (whole scenes, no rescale, so the label stays true;
        colour jitter on top of the data options), with ``joint.cls_label_noise`` of their
        labels replaced by random ones."""
        cfg, d, j = self.cfg, self.cfg.data, self.cfg.joint
        size = d.scene_size
        jitter = {"hue": j.cls_hue, "contrast": j.cls_contrast, "saturation": j.cls_saturation}
        transform = data_transform(
            d, "train", crop_size=[size, size], scale_range=[1.0, 1.0], jitter=jitter
        )
        root = Path(self.train_set.root) if j.cls_data == "train" else classifier_scenes_root(cfg)
        scenes = FashionScenes(root, "train", transform)
        clean = scene_class_labels(scenes, j.cls_label, j.count_classes, j.area_edges)
        labels, replaced = noisy_labels(
            clean, j.cls_label_noise, self.num_cls_classes, self.cfg.seed
        )
        return ClassificationScenes(scenes, labels), replaced

    # -- state -----------------------------------------------------------------
    def check_resumable(self, state: dict[str, Any]) -> None:
        super().check_resumable(state)
        saved, mine = state["config"].get("joint"), self.cfg.to_dict()["joint"]
        if saved != mine:
            raise TrainingError(
                f"cannot resume {self.ckpt_dir / 'last.pt'}: its joint section {saved} "
                f"differs from the config's {mine}"
            )

    # -- loop --------------------------------------------------------------------
    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def _update(self, agent: str, loss: torch.Tensor) -> None:
        optimizer, scaler = self.optimizers[agent], self.scalers[agent]
        optimizer.zero_grad(set_to_none=True)  # also clears the other agent's grads on M
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        self.schedulers[agent].step()

    def cls_step(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """One classifier-agent step: M ∪ C move, S does not."""
        images, labels = self._prepare(images), labels.to(self.device, non_blocking=True)
        with autocast_context(self.device, self.amp_dtype):
            logits = self.ddp_model(images, task="cls")["cls"]
        loss = F.cross_entropy(logits.float(), labels)
        self._update("cls", loss)
        return {"loss_cls": loss.detach()}

    def seg_step(self, images: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
        """One segmentation-agent step: M ∪ S move, C does not."""
        images, masks = self._prepare(images), masks.to(self.device, non_blocking=True)
        with autocast_context(self.device, self.amp_dtype):
            outputs = (
                self.ddp_model(images, task="seg") if self.joint_model else self.ddp_model(images)
            )
        outputs = {k: v for k, v in outputs.items() if k != "cls"}
        loss, parts = self.criterion(outputs, masks)
        self._update("seg", loss)
        return {"loss_seg": loss.detach(), **{f"loss_seg_{k}": v for k, v in parts.items()}}

    def batch_streams(self) -> dict[str, Iterator]:
        cfg = self.cfg
        streams = {}
        if "cls" in self.tasks:
            seed = cfg.seed + CLS_SEED_OFFSET
            streams["cls"] = iter(
                self.loader(self.cls_set, self.cls_batch_size, seed, "joint.cls_batch_ratio")
            )
        if "seg" in self.tasks:
            loader = self.loader(self.train_set, cfg.data.batch_size, cfg.seed, "data.batch_size")
            streams["seg"] = iter(loader)
        return streams

    def train_step(self, streams: dict[str, Iterator]) -> dict[str, torch.Tensor]:
        values: dict[str, torch.Tensor] = {}
        if "cls" in streams:
            values |= self.cls_step(*next(streams["cls"]))
        if "seg" in streams:
            values |= self.seg_step(*next(streams["seg"]))
        self.iteration += 1
        return values

    def validate(self) -> tuple[SegMetrics | None, dict[str, float] | None]:
        seg = cls = None
        d = self.cfg.data
        if "seg" in self.tasks:
            seg = evaluate(
                self.model,
                self.val_set,
                self.train_set.num_classes,
                dist=self.dist,
                batch_size=d.val_batch_size,
                scales=self.cfg.eval.scales,
                flip=self.cfg.eval.flip,
                amp_dtype=self.amp_dtype,
                num_workers=d.num_workers,
                channels_last=self.channels_last,
            )
        if "cls" in self.tasks:
            cls = evaluate_classifier(
                self.model,
                self.cls_val_set,
                self.cfg.joint.binary_normal,
                dist=self.dist,
                batch_size=d.val_batch_size,
                amp=self.amp_dtype,
                binary_rule=self.cfg.joint.binary_rule,
            )
        return seg, cls

    def validation(self) -> tuple[dict[str, float], SegMetrics | None, str]:
        seg, cls = self.validate()
        record: dict[str, float] = {}
        if seg is not None:
            record |= {"miou": seg.miou, "pixel_acc": seg.pixel_acc}
        if cls is not None:
            record |= {f"cls_{k}": float(v) for k, v in cls.items()}
            self.last_cls = cls
        return record, seg, ", ".join(f"{k} {v:.3f}" for k, v in record.items())

    def last_classifier_metrics(self) -> dict[str, float] | None:
        return self.last_cls


def train_joint(
    cfg: Config, *, resume: bool | str | None = None, show_progress: bool = True
) -> JointResult:
    """Train a JointSeg config; ``resume`` as :func:`coopseg.engine.train.train`."""
    return JointTrainer(cfg, resume=resume, show_progress=show_progress).train()


__all__ = [
    "JointResult",
    "JointTrainer",
    "check_joint",
    "classifier_scenes_root",
    "evaluate_classifier",
    "evaluate_classifier_checkpoint",
    "train_joint",
]
