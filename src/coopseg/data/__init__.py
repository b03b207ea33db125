"""Data sets behind one interface (:class:`SegmentationDataset`) and their pipelines."""

from __future__ import annotations

from pathlib import Path

from ..config import ConfigError, DataConfig
from .base import IGNORE_INDEX, DataError, SegmentationDataset, check_pair
from .fashionscenes import FashionScenes, build_fashionscenes
from .transforms import SeededAugmentation, eval_transform, train_transform

DATASETS = ("fashionscenes",)


def build_dataset(cfg: DataConfig, split: str) -> SegmentationDataset:
    """One split: ``"train"`` (augmented) or ``"val"`` (normalised only)."""
    if split == "train":
        transform = train_transform(cfg.crop_size, cfg.scale_range, cfg.hflip, cfg.mean, cfg.std)
    elif split == "val":
        transform = eval_transform(cfg.mean, cfg.std)
    else:
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if cfg.dataset == "fashionscenes":
        root = build_fashionscenes(
            Path(cfg.root) if cfg.root else None,
            size=cfg.scene_size,
            train=cfg.train_scenes,
            val=cfg.val_scenes,
            seed=cfg.scene_seed,
            source=Path(cfg.source) if cfg.source else None,
        )
        return FashionScenes(root, split, transform)
    raise ConfigError(f"data.dataset: unknown data set {cfg.dataset!r}; one of {list(DATASETS)}")


def build_datasets(cfg: DataConfig) -> tuple[SegmentationDataset, SegmentationDataset]:
    """The training and validation sets."""
    return build_dataset(cfg, "train"), build_dataset(cfg, "val")


__all__ = [
    "DATASETS",
    "IGNORE_INDEX",
    "DataError",
    "FashionScenes",
    "SeededAugmentation",
    "SegmentationDataset",
    "build_dataset",
    "build_datasets",
    "build_fashionscenes",
    "check_pair",
    "eval_transform",
    "train_transform",
]
