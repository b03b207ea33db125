"""Data sets behind one interface (:class:`SegmentationDataset`) and their pipelines."""

from __future__ import annotations

from pathlib import Path

from ..config import ConfigError, DataConfig
from .base import IGNORE_INDEX, DataError, SegmentationDataset, Transform, check_pair
from .fashionscenes import FashionScenes, build_fashionscenes
from .files import resolve_root
from .transforms import SeededAugmentation, data_transform, eval_transform, train_transform

DATASETS = ("fashionscenes", "cityscapes", "voc", "folder")


def open_dataset(
    cfg: DataConfig, split: str, transform: Transform | None = None, strict: bool = True
) -> SegmentationDataset:
    """Split ``split`` (a name such as ``train_aug``) of a file data set, untransformed
    unless ``transform`` is given.

    Opening lists the files and resolves split lists (no image is read): with
    ``strict`` a broken layout raises one :class:`DataError` naming the files.
    """
    if cfg.dataset == "cityscapes":
        from .cityscapes import ENV_VAR, Cityscapes

        root, _ = resolve_root(cfg.root, "cityscapes", ENV_VAR)
        return Cityscapes(root, split, transform, strict=strict)
    if cfg.dataset == "voc":
        from .voc import VOCSegmentation

        root, _ = resolve_root(cfg.root, "voc")
        return VOCSegmentation(root, split, transform, cfg.voc_sbd_root, strict=strict)
    if cfg.dataset == "folder":
        from .folder import FolderDataset

        root, _ = resolve_root(cfg.root, "folder")
        dataset = FolderDataset(
            root, split, transform, cfg.classes_file, cfg.val_ratio, cfg.split_seed, strict
        )
        dataset.bands = len(cfg.mean)  # N-band images: .npy / .tif, data.mean per band
        return dataset
    raise ConfigError(f"data.dataset: unknown data set {cfg.dataset!r}; one of {list(DATASETS)}")


def build_dataset(cfg: DataConfig, split: str) -> SegmentationDataset:
    """One split: ``"train"`` (augmented; ``data.train_split``) or ``"val"`` (full-size
    images, normalised only; ``data.val_split``)."""
    transform = data_transform(cfg, split)  # every data.* augmentation and normalisation
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
    return open_dataset(cfg, cfg.train_split if split == "train" else cfg.val_split, transform)


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
    "open_dataset",
    "train_transform",
]
