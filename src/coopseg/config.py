"""Experiment configuration: YAML files checked against a typed schema.

Every key a config may hold is a field below; an unknown key or a value of the
wrong type is an error naming the dotted key (and the file), because a typo that
is silently ignored costs a whole training run. The ``model`` section is checked
against the signature of the architecture it names instead, so each architecture
documents its own options once, in its constructor.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PACKAGED_CONFIGS = Path(__file__).parent / "configs"  # the YAMLs shipped with coopseg


class ConfigError(ValueError):
    """A config key or value is wrong; the message names it."""


class OverrideError(ConfigError):
    """A ``--set`` override is wrong; the message names the override, not the file."""


class ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader, plus floats written like ``1e-3``, ``1E+4`` or ``.5e-2``.

    PyYAML follows YAML 1.1, where a float needs a dot and a signed exponent, so
    ``lr: 1e-3`` would be the string ``'1e-3'``; YAML 1.2 and every user mean a number.
    """


ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def yaml_load(text: str) -> Any:
    """Parse config YAML (files and ``--set`` values) with :class:`ConfigLoader`."""
    return yaml.load(text, Loader=ConfigLoader)  # a SafeLoader: plain values only


@dataclass
class DataConfig:
    """Which data set, where it lives, and how batches are made."""

    dataset: str = "fashionscenes"  # fashionscenes | cityscapes | voc | folder
    # data set folder; fashionscenes: its cache folder. Unset: $CITYSCAPES_DATASET
    # (cityscapes), else $COOPSEG_DATA_ROOT/<dataset> or $COOPSEG_DATA_ROOT
    root: str | None = None
    train_split: str = "train"  # cityscapes: train|val; voc: train|trainval|train_aug; folder
    val_split: str = "val"  # split evaluated (folder: splits/<name>.txt, else the ratio split)
    voc_sbd_root: str | None = None  # voc: SBD benchmark_RELEASE (default: beside VOCdevkit)
    classes_file: str | None = None  # folder: class names/colours YAML (default ROOT/classes.yaml)
    val_ratio: float = 0.1  # folder without splits/: fraction of stems held out for val
    split_seed: int = 0  # folder without splits/: seed of that held-out draw
    source: str | None = None  # fashionscenes: folder with the Fashion-MNIST IDX files
    scene_size: int = 128  # fashionscenes: canvas side in pixels
    train_scenes: int = 2000  # fashionscenes: number of training scenes
    val_scenes: int = 250  # fashionscenes: number of validation scenes
    scene_seed: int = 0  # fashionscenes: seed of the scene generator
    batch_size: int = 8  # global batch (split across DDP processes)
    val_batch_size: int = 16
    num_workers: int = 0
    # [height, width] of the random training crop; auto: the training images' median
    # size, at most 512x512 (resolved when training starts: the run's config.yaml has it)
    crop_size: list[int] | str = field(default_factory=lambda: [128, 128])
    scale_range: list[float] = field(default_factory=lambda: [0.75, 1.5])
    # random scale drawn from this set instead (DF-DAM: [0.75, 1.0, ..., 2.0]); null = range
    scale_set: list[float] | None = None
    hflip: bool = True
    vflip: bool = False  # random up/down flip (image and mask)
    random_pad: int = 0  # pad each side by a random 0..N px (mean / ignore) before the crop
    # dataset (mean/std above) | image (per-image standardisation: one mean/std over all
    # pixels and channels, as tf.image.per_image_standardization) | image_channel (per channel)
    normalize: str = "dataset"
    # one value per band: 3 (RGB) or, for N-band .npy / .tif folder data, N (= model.in_chans)
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    # N-band images: the three bands (0-based) drawn as red, green, blue in predict
    # overlays and the report; null = the first three
    rgb_bands: list[int] | None = None


@dataclass
class CrossEntropyLossConfig:
    """``train.loss.ce``: cross-entropy, the default term."""

    weight: float = 1.0  # 0 turns the term off
    class_weights: list[float] | None = None  # weight per class; null = all 1
    ohem_thresh: float | None = None  # OHEM: train on pixels whose true-class prob < this
    ohem_min_kept: int = 0  # OHEM: plus at least this many hardest labelled pixels per image
    label_smoothing: float = 0.0  # target (1 - e) on the true class + e / C on every class


@dataclass
class DiceLossConfig:
    """``train.loss.dice``: soft Dice over the classes (segmentation_models.pytorch)."""

    weight: float = 0.0  # 0: off
    smooth: float = 0.0  # added to numerator and denominator


@dataclass
class FocalLossConfig:
    """``train.loss.focal``: softmax focal loss (Lin et al. 2017)."""

    weight: float = 0.0  # 0: off
    gamma: float = 2.0  # focusing power; 0 is cross-entropy
    class_weights: list[float] | None = None  # alpha per class; null = all 1


@dataclass
class LovaszLossConfig:
    """``train.loss.lovasz``: Lovász-softmax, a surrogate of the mean IoU (smp)."""

    weight: float = 0.0  # 0: off
    per_image: bool = False  # per image, then averaged (false: over the batch)


@dataclass
class LossConfig:
    """``train.loss``: the training loss, a weighted sum of these terms on every head."""

    ce: CrossEntropyLossConfig = field(default_factory=CrossEntropyLossConfig)
    dice: DiceLossConfig = field(default_factory=DiceLossConfig)
    focal: FocalLossConfig = field(default_factory=FocalLossConfig)
    lovasz: LovaszLossConfig = field(default_factory=LovaszLossConfig)


@dataclass
class TrainConfig:
    """Optimisation: SGD/AdamW + poly lr over iterations or over a training-time budget."""

    iterations: int = 1000
    optimizer: str = "sgd"  # sgd (the papers') | adamw
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = False
    poly_power: float = 0.9
    # lr of pretrained backbone weights = this x train.lr (fine-tuning: < 1 keeps ImageNet
    # features while a fresh head learns fast); 0 freezes the backbone
    backbone_lr_mult: float = 1.0
    warmup_iterations: int = 0  # linear lr warm-up from 0 before the poly decay
    # iterations: poly decay over train.iterations steps (the papers') | time: over
    # train.time_budget_s seconds of training (steps only; validation and checkpoints
    # excluded), so the decay ends inside the budget on any machine; not bit-reproducible
    schedule: str = "iterations"
    time_budget_s: float = 0.0  # schedule time: training seconds the run lasts (> 0)
    warmup_s: float = 0.0  # schedule time: linear lr warm-up over this many seconds
    # before each validation, re-estimate batch-norm statistics exactly (momentum None)
    # over this many training batches; 0: off (the running averages are used as they are)
    precise_bn_batches: int = 0
    # exponential moving average of the weights (and BN buffers), decay per step; when on
    # the average is what validation evaluates and best/final.safetensors hold; 0: off
    ema_decay: float = 0.0
    # backbone feature stages, shallowest first, whose weights stay frozen (0: none); the
    # high-resolution stages cost the most backward time and change least in fine-tuning
    frozen_stages: int = 0
    aux_weights: dict[str, float] = field(default_factory=dict)
    amp: str = "none"  # none | bf16 | fp16 | auto
    channels_last: bool = False
    val_interval: int = 200  # 0: validate only at the end
    checkpoint_interval: int = 200  # save last.pt every N iterations (0: only at the end)
    # also save last.pt when this many seconds passed since the last save (0: off), so a
    # slow run loses at most that much work to a crash or a pre-emption
    checkpoint_interval_s: float = 0.0
    # false: a new run (refused if the run folder holds one) | true: continue it (there
    # must be a checkpoint) | auto: continue if there is one, else start (restarts)
    resume: bool | str = False
    log_interval: int = 10
    max_time_s: float = 0.0  # stop (and checkpoint) after this many seconds; 0 = no limit
    loss: LossConfig = field(default_factory=LossConfig)
    # the keys before train.loss, still read: the same as train.loss.ce.<key>
    class_weights: list[float] | None = None
    ohem_thresh: float | None = None
    ohem_min_kept: int = 0
    # whole-model start: weights of a coopseg checkpoint (.pt / .safetensors) of the same
    # model, loaded before training (e.g. DF-DAM's VOC trainval fine-tune); null = none
    init_from: str | None = None
    # deep mutual learning (engine/distill.py): each member of a cooperative model also
    # learns towards the others' softened, detached predictions; 0 = off
    mutual_weight: float = 0.0
    mutual_temperature: float = 1.0
    # distillation: a trained coopseg checkpoint whose output (teacher_output; null: the
    # one it reports -- fused, or a member) the model learns towards, besides the labels
    teacher: str | None = None
    teacher_output: str | None = None
    teacher_weight: float = 1.0
    teacher_temperature: float = 1.0


@dataclass
class EvalConfig:
    """Inference protocol used by validation and ``coopseg eval``."""

    scales: list[float] = field(default_factory=lambda: [1.0])
    flip: bool = False
    # whole (one pass per image) | slide (overlapping windows) | center (score only the
    # central crop_size region, as the cooperative papers did on VOC val and test)
    mode: str = "whole"
    # slide: window [height, width]; center: the region scored; null = data.crop_size
    crop_size: list[int] | None = None
    stride: list[int] | None = None  # slide: step [height, width]; null = 2/3 of the window
    window_batch: int = 4  # slide: windows per forward pass (bounds memory)


@dataclass
class JointConfig:
    """JointSeg's two agents (``model.arch: jointseg``): rates, batches, classifier labels."""

    cls_lr_ratio: float = 30.0  # classifier lr = this x train.lr (the segmenter's); paper: 30
    cls_batch_ratio: int = 32  # classifier batch = this x data.batch_size; paper: 32
    # count (grade 0..4: objects of count_classes) | area (grade 0..4: the share of object
    # pixels, any class, binned at area_edges) | dominant (class with most pixels, 11)
    cls_label: str = "count"
    # classes whose objects the count grade counts (ours: footwear, the "lesions", so grade
    # 0, "no lesion", is the most frequent; all of 1..10: plain object count, grade 0 empty)
    count_classes: list[int] = field(default_factory=lambda: [6, 8, 10])
    # area grade: 4 increasing object-pixel shares; default the 40/55/70/85 % quantiles at
    # 64 px (grades 40/15/15/15/15 %); at 128 px use [0.09, 0.12, 0.15, 0.19]
    area_edges: list[float] = field(default_factory=lambda: [0.24, 0.29, 0.34, 0.41])
    binary_normal: list[int] = field(default_factory=lambda: [0])  # paper: level 0 is normal
    binary_rule: str = "argmax"  # predicted normal: top-1 label in binary_normal | mass (>= 1/2)
    # classifier stream only (paper: hue, contrast, saturation changes); ColorJitter ranges
    cls_hue: float = 0.0  # max hue shift, a fraction of the colour circle (<= 0.5); 0: off
    cls_contrast: float = 0.0  # contrast factor drawn from [1 - x, 1 + x]; 0: off
    cls_saturation: float = 0.0  # saturation factor drawn from [1 - x, 1 + x]; 0: off
    cls_label_noise: float = 0.0  # fraction of classifier labels replaced by random ones
    cls_data: str = "train"  # classifier scenes: train (the segmenter's) | separate (own build)
    cls_scenes: int = 2000  # cls_data=separate: number of classifier scenes
    cls_scene_seed: int = 1  # cls_data=separate: their generator seed (differ from scene_seed)
    cls_weight_decay: float | None = None  # classifier optimizer; null = train.weight_decay


@dataclass
class Config:
    """One experiment. ``model`` holds ``arch`` plus that architecture's arguments."""

    name: str = "experiment"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    out_dir: str = "runs"
    model: dict[str, Any] = field(
        default_factory=lambda: {"arch": "deeplabv3plus", "backbone": "resnet18"}
    )
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    joint: JointConfig = field(default_factory=JointConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _check_type(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(value, option, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_check_type(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        _, item = typing.get_args(hint)
        return {str(k): _check_type(v, item, f"{key}.{k}") for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {hint}")  # pragma: no cover


def _build(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown config key {where}{unknown[0]!s}; keys allowed here: {sorted(names)}"
        )
    kwargs = {}
    for name, value in raw.items():
        key = f"{prefix}.{name}" if prefix else name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, key)
        else:
            kwargs[name] = _check_type(value, hint, key)
    return cls(**kwargs)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "model":
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["train.lr=0.02", "model.backbone=resnet50"]`` -> nested dict (YAML values)."""
    nested: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise OverrideError(f"override {pair!r} must look like key.sub=value")
        key, raw = pair.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise OverrideError(f"override {pair!r}: bad key {key!r}")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise OverrideError(f"override {pair!r} conflicts with another override")
        try:
            node[parts[-1]] = yaml_load(raw) if raw else ""
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or "not valid YAML"
            raise OverrideError(f"--set {pair}: value is not valid YAML ({problem})") from err
    return nested


def _set_model_overrides(model: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = dict(model)
    out.update(overrides)
    return out


def config_from_dict(raw: dict[str, Any], overrides: list[str] | None = None) -> Config:
    """Build and validate a :class:`Config` from a plain mapping plus ``--set`` overrides.

    An error that an override brings in is an :class:`OverrideError` naming that
    override, so the user is not sent to look for it in the config file.
    """
    overrides = list(overrides or [])
    try:
        return _config_from_dict(raw, overrides)
    except OverrideError:
        raise
    except ConfigError as err:
        if not overrides:
            raise
        culprit = _culprit_override(raw, overrides, str(err))
        if culprit is None:
            raise
        raise OverrideError(f"--set {culprit}: {err}") from err


def _culprit_override(raw: dict[str, Any], overrides: list[str], final: str) -> str | None:
    """The override from which on the error reads ``final`` (None: the base config's own)."""
    culprit: str | None = overrides[-1]
    for k in range(len(overrides) - 1, -1, -1):
        try:
            _config_from_dict(raw, overrides[:k])
            message = None
        except ConfigError as err:
            message = str(err)
        if message != final:
            return culprit
        culprit = overrides[k - 1] if k else None
    return culprit


def _config_from_dict(raw: dict[str, Any], overrides: list[str]) -> Config:
    raw = dict(raw or {})
    over = parse_overrides(overrides)
    model_over = over.pop("model", None)
    raw = _merge(raw, over)
    if model_over is not None:
        base_model = raw.get("model", Config().model)
        raw["model"] = _set_model_overrides(base_model, model_over)
    cfg = _build(Config, raw, "")
    check_model_section(cfg.model)
    _check_choices(cfg)
    _check_values(cfg)
    return cfg


CHOICES = {
    "train.amp": ("none", "auto", "bf16", "fp16"),
    "train.optimizer": ("sgd", "adamw"),
    "train.schedule": ("iterations", "time"),
    "eval.mode": ("whole", "slide", "center"),
    "train.resume": (False, True, "auto"),
    "data.normalize": ("dataset", "image", "image_channel"),
    "joint.binary_rule": ("argmax", "mass"),
    "joint.cls_label": ("dominant", "count", "area"),
    "joint.cls_data": ("train", "separate"),
}


def _check_choices(cfg: Config) -> None:
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise ConfigError(f"{key}: expected one of {list(allowed)}, got {value!r}")


@dataclass(frozen=True)
class Range:
    """The finite numbers a key allows; ``None`` leaves that side unbounded."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself is not allowed
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"a number in {left}{self.low:g}, {self.high:g}{right}"


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
AT_LEAST_ONE = Range(1)

# Valid ranges of numeric keys, checked at load time so a bad value fails before a run
# starts rather than as a traceback from deep inside it. ``key[]``: each list entry;
# ``key.*``: each mapping value; a null (optional key left unset) is not checked.
RANGES: dict[str, Range] = {
    "seed": NON_NEGATIVE,  # numpy generators refuse negative seeds
    "data.val_ratio": Range(0, 1, low_open=True, high_open=True),
    "data.split_seed": NON_NEGATIVE,
    "data.scene_size": Range(16),  # FashionScenes' smallest canvas
    "data.train_scenes": AT_LEAST_ONE,
    "data.val_scenes": AT_LEAST_ONE,
    "data.scene_seed": NON_NEGATIVE,
    "data.batch_size": AT_LEAST_ONE,
    "data.val_batch_size": AT_LEAST_ONE,
    "data.num_workers": NON_NEGATIVE,
    "data.scale_range[]": POSITIVE,
    "data.scale_set[]": POSITIVE,
    "data.std[]": POSITIVE,  # images are divided by it
    "train.iterations": AT_LEAST_ONE,
    "train.lr": POSITIVE,
    "train.momentum": Range(0, 1, high_open=True),
    "train.weight_decay": NON_NEGATIVE,
    "train.poly_power": NON_NEGATIVE,
    "train.backbone_lr_mult": NON_NEGATIVE,  # 0: frozen backbone
    "train.warmup_iterations": NON_NEGATIVE,
    "train.time_budget_s": NON_NEGATIVE,
    "train.warmup_s": NON_NEGATIVE,
    "train.precise_bn_batches": NON_NEGATIVE,
    "train.ema_decay": Range(0, 1, high_open=True),  # 0: off
    "train.frozen_stages": NON_NEGATIVE,
    "train.aux_weights.*": NON_NEGATIVE,
    "train.val_interval": NON_NEGATIVE,  # 0: validate only at the end
    "train.checkpoint_interval": NON_NEGATIVE,  # 0: checkpoint only at the end
    "train.checkpoint_interval_s": NON_NEGATIVE,
    "train.log_interval": AT_LEAST_ONE,
    "train.max_time_s": NON_NEGATIVE,  # 0: no limit
    "train.ohem_min_kept": NON_NEGATIVE,
    "train.loss.ce.weight": NON_NEGATIVE,
    "train.loss.ce.ohem_min_kept": NON_NEGATIVE,
    "train.loss.ce.label_smoothing": Range(0, 1, high_open=True),
    "train.loss.dice.weight": NON_NEGATIVE,
    "train.loss.dice.smooth": NON_NEGATIVE,
    "train.loss.focal.weight": NON_NEGATIVE,
    "train.loss.focal.gamma": NON_NEGATIVE,
    "train.loss.lovasz.weight": NON_NEGATIVE,
    "train.mutual_weight": NON_NEGATIVE,
    "train.mutual_temperature": POSITIVE,
    "train.teacher_weight": NON_NEGATIVE,
    "train.teacher_temperature": POSITIVE,
    "eval.scales[]": POSITIVE,
    "eval.window_batch": AT_LEAST_ONE,
    "joint.cls_lr_ratio": POSITIVE,
    "joint.cls_batch_ratio": AT_LEAST_ONE,
    "joint.cls_label_noise": Range(0, 1),
    "joint.cls_scenes": AT_LEAST_ONE,
    "joint.cls_scene_seed": NON_NEGATIVE,
    "joint.cls_weight_decay": NON_NEGATIVE,
    "data.random_pad": NON_NEGATIVE,
    "joint.cls_hue": Range(0, 0.5),  # torchvision's ColorJitter range
    "joint.cls_contrast": NON_NEGATIVE,
    "joint.cls_saturation": NON_NEGATIVE,
    "joint.count_classes[]": NON_NEGATIVE,
    "joint.area_edges[]": Range(0, 1, low_open=True, high_open=True),
}


def _ranged_values(cfg: Config, key: str) -> list[tuple[str, Any]]:
    """``(dotted name, value)`` for a :data:`RANGES` key, its entries for ``[]``/``.*``."""
    path = key.removesuffix("[]").removesuffix(".*")
    value: Any = cfg
    for part in path.split("."):
        value = getattr(value, part)
    if value is None:
        return []
    if key.endswith("[]"):
        return [(f"{path}[{i}]", v) for i, v in enumerate(value)]
    if key.endswith(".*"):
        return [(f"{path}.{k}", v) for k, v in value.items()]
    return [(path, value)]


def _check_ranges(cfg: Config) -> None:
    for key, allowed in RANGES.items():
        for name, value in _ranged_values(cfg, key):
            if value not in allowed:
                raise ConfigError(f"{name}: expected {allowed}, got {value!r}")


def _check_pair(value: list[int] | None, key: str) -> None:
    if value is not None and (len(value) != 2 or min(value) < 1):
        raise ConfigError(f"{key}: expected [height, width], both positive, got {value}")


def _check_class_weights(weights: list[float] | None, classes: Any, key: str) -> None:
    if weights is None:
        return
    if classes is not None and len(weights) != classes:
        raise ConfigError(
            f"{key}: expected {classes} weights (model.num_classes), got {len(weights)}"
        )
    if min(weights, default=0.0) < 0 or sum(weights) <= 0:
        raise ConfigError(f"{key}: expected non-negative weights, not all zero, got {weights}")


def _check_loss(t: TrainConfig, classes: Any) -> None:
    """``train.loss`` and the cross-entropy keys before it (``train.class_weights``, …)."""
    ce = t.loss.ce
    for prefix, weights, thresh, kept in (
        ("train", t.class_weights, t.ohem_thresh, t.ohem_min_kept),
        ("train.loss.ce", ce.class_weights, ce.ohem_thresh, ce.ohem_min_kept),
    ):
        _check_class_weights(weights, classes, f"{prefix}.class_weights")
        if thresh is not None and not 0.0 < thresh <= 1.0:
            raise ConfigError(
                f"{prefix}.ohem_thresh: expected a probability in (0, 1], got {thresh}"
            )
        if kept < 0:
            raise ConfigError(f"{prefix}.ohem_min_kept: expected >= 0, got {kept}")
        if kept and thresh is None:
            raise ConfigError(
                f"{prefix}.ohem_min_kept is set but {prefix}.ohem_thresh is not (OHEM is off)"
            )
    old = [k for k in ("class_weights", "ohem_thresh") if getattr(t, k) is not None]
    old += ["ohem_min_kept"] if t.ohem_min_kept else []
    new = [k for k in ("class_weights", "ohem_thresh") if getattr(ce, k) is not None]
    new += ["ohem_min_kept"] if ce.ohem_min_kept else []
    if old and new:
        raise ConfigError(
            f"train.{old[0]} and train.loss.ce.{new[0]} are both set: the train.class_weights "
            "and train.ohem_* keys are the old names of train.loss.ce's; use one set"
        )
    _check_class_weights(t.loss.focal.class_weights, classes, "train.loss.focal.class_weights")
    weights = {name: getattr(t.loss, name).weight for name in ("ce", "dice", "focal", "lovasz")}
    if not any(weights.values()):
        raise ConfigError(f"train.loss: every term's weight is 0, nothing to train on: {weights}")
    uses_ce = t.class_weights is not None or t.ohem_thresh is not None
    uses_ce = uses_ce or ce.class_weights is not None or ce.ohem_thresh is not None
    if not ce.weight and (uses_ce or ce.label_smoothing):
        raise ConfigError(
            "train.loss.ce.weight is 0 but cross-entropy options are set (class_weights, "
            "ohem_*, label_smoothing); they would do nothing"
        )


def model_bands(model: dict[str, Any]) -> int:
    """The image channels a model section reads (``in_chans``; a cooperative model's
    members all read the same image)."""
    if "in_chans" in model:
        return int(model["in_chans"])
    members = model.get("members") if model.get("arch") == "cooperative" else None
    if isinstance(members, list) and members and isinstance(members[0], dict):
        return int(members[0].get("in_chans", 3))
    return 3


def _check_bands(cfg: Config) -> None:
    d = cfg.data
    bands = model_bands(cfg.model)
    for key, values in (("data.mean", d.mean), ("data.std", d.std)):
        if len(values) != bands:
            raise ConfigError(
                f"{key}: expected {bands} values, one per band the model reads "
                f"(model.in_chans {bands}), got {values}"
            )
    if bands != 3 and d.dataset != "folder":
        raise ConfigError(
            f"model.in_chans: {bands} bands; images with other than 3 bands are read by "
            f"the folder data set only (data.dataset: folder), not {d.dataset}"
        )
    if d.rgb_bands is not None and (
        len(d.rgb_bands) != 3 or not all(0 <= b < bands for b in d.rgb_bands)
    ):
        raise ConfigError(
            f"data.rgb_bands: expected 3 band indices in [0, {bands}), got {d.rgb_bands}"
        )


def _check_values(cfg: Config) -> None:
    """Ranges and lengths the type check cannot see; each error names its key."""
    t, e, d = cfg.train, cfg.eval, cfg.data
    _check_ranges(cfg)
    if isinstance(d.crop_size, str):
        if d.crop_size != "auto":
            raise ConfigError(
                f"data.crop_size: expected [height, width] or auto, got {d.crop_size!r}"
            )
        if e.mode != "whole" and e.crop_size is None:
            raise ConfigError(
                f"eval.crop_size: eval.mode {e.mode} needs it when data.crop_size is auto "
                "(known only once the images are read)"
            )
    else:
        _check_pair(d.crop_size, "data.crop_size")
    if len(d.scale_range) != 2 or d.scale_range[0] > d.scale_range[1]:
        raise ConfigError(
            f"data.scale_range: expected [low, high] with 0 < low <= high, got {d.scale_range}"
        )
    if d.scale_set is not None and not d.scale_set:
        raise ConfigError("data.scale_set: expected a non-empty list of factors, or null")
    _check_bands(cfg)
    _check_schedule(t)
    if cfg.model.get("arch") == "jointseg" and (t.ema_decay or t.precise_bn_batches):
        key = "ema_decay" if t.ema_decay else "precise_bn_batches"
        raise ConfigError(f"train.{key}: not supported for model.arch jointseg (two agents)")
    if t.nesterov and (t.optimizer != "sgd" or t.momentum == 0):
        raise ConfigError(
            f"train.nesterov: needs train.optimizer sgd with train.momentum > 0, "
            f"got {t.optimizer} with momentum {t.momentum}"
        )
    _check_loss(t, cfg.model.get("num_classes"))
    _check_pair(e.crop_size, "eval.crop_size")
    _check_pair(e.stride, "eval.stride")
    if e.stride is not None and not (e.crop_size is None and isinstance(d.crop_size, str)):
        crop = e.crop_size or cfg.data.crop_size
        if any(s > c for s, c in zip(e.stride, crop, strict=False)):
            raise ConfigError(
                f"eval.stride {e.stride} is larger than the window {crop} "
                "(eval.crop_size, default data.crop_size): pixels would be skipped"
            )


def _check_schedule(t: TrainConfig) -> None:
    """The time schedule needs its budget (the iteration schedule ignores the time keys,
    and the time schedule train.iterations, so one --set switches a config between them)."""
    if t.schedule == "time":
        if t.time_budget_s <= 0:
            raise ConfigError("train.schedule is time but train.time_budget_s is not set (> 0)")
        if t.warmup_iterations:
            raise ConfigError(
                "train.warmup_iterations: the time schedule warms up by time; "
                "use train.warmup_s instead"
            )
        if t.warmup_s >= t.time_budget_s:
            raise ConfigError(
                f"train.warmup_s={t.warmup_s:g} is not below train.time_budget_s="
                f"{t.time_budget_s:g}"
            )


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file's mapping with its ``base:`` chain merged underneath it.

    ``base`` names another YAML (relative to this file, or a packaged config's name);
    this file's keys override the base's, section by section. The ``model`` section
    merges key by key too, unless this file names a different ``model.arch``.
    """
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    if path.resolve() in chain:
        names = " -> ".join(str(p) for p in (*chain, path.resolve()))
        raise ConfigError(f"{path}: 'base' chain loops: {names}")
    try:
        raw = yaml_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if raw is None:
        raise ConfigError(
            f"{path}: the file is empty (no config keys); write the keys to change, or "
            "'base: <config>' to start from another config (e.g. base: demo)"
        )
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base: expected a file name, got {base!r}")
    candidates = [path.parent / base]
    if not Path(base).suffix:
        candidates += [path.parent / f"{base}.yaml", PACKAGED_CONFIGS / f"{base}.yaml"]
    base_path = next((c for c in candidates if c.is_file()), None)
    if base_path is None:
        raise ConfigError(
            f"{path}: base: config {base!r} not found (looked for {[str(c) for c in candidates]})"
        )
    parent = _read_yaml(base_path, (*chain, path.resolve()))
    model = raw.get("model")
    parent_model = parent.get("model")
    same_arch = isinstance(model, dict) and isinstance(parent_model, dict)
    if same_arch and model.get("arch", parent_model.get("arch")) == parent_model.get("arch"):
        raw["model"] = {**parent_model, **model}
    return _merge(parent, raw)


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (and its ``base:`` chain); errors name the file and the key."""
    path = Path(path)
    raw = _read_yaml(path)
    try:
        return config_from_dict(raw, overrides)
    except OverrideError:
        raise  # names its --set override; the file is not at fault
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err


def check_model_section(model: dict[str, Any], prefix: str = "model") -> None:
    """The ``model`` keys must be arguments of the architecture's constructor; a
    cooperative model's members are checked the same way, each against its own."""
    from .models import ARCHITECTURES
    from .models.cooperative import check_cooperative_section

    arch = model.get("arch")
    if arch not in ARCHITECTURES:
        raise ConfigError(
            f"{prefix}.arch: unknown architecture {arch!r}; one of {sorted(ARCHITECTURES)}"
        )
    params = inspect.signature(ARCHITECTURES[arch].__init__).parameters
    allowed = {n for n in params if n != "self"} | {"arch", "freeze_bn"}
    unknown = sorted(set(model) - allowed)
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}.{unknown[0]} for architecture {arch}; "
            f"allowed: {sorted(allowed)}"
        )
    if arch == "cooperative":
        try:
            check_cooperative_section(model, check_model_section)
        except ValueError as err:
            if isinstance(err, ConfigError):
                raise
            raise ConfigError(str(err)) from None


def model_kwargs(model: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Split the model section into ``(arch, kwargs for create_model)``."""
    kwargs = dict(model)
    return kwargs.pop("arch"), kwargs
