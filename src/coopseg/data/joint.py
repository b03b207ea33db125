"""Image-level labels for JointSeg's classifier agent, derived from FashionScenes.

The classifier agent needs (image, class label) samples and no masks. FashionScenes
stores per-scene ``dominant`` (class with most labelled pixels) and ``count`` (visible
objects, 0..4), so either becomes a label: ``dominant`` (11 classes, background = 0 for
an empty scene) or ``count`` (a 0..4 "severity grade", like the paper's diabetic
retinopathy levels). A binary label (normal vs abnormal) groups labels: those listed in
``binary_normal`` are normal, every other label abnormal.

Partial random labels (the paper's Section II-C): :func:`noisy_labels` replaces exactly
``round(n * p)`` labels by uniformly drawn ones (which may equal the true label by
chance, as random labels do), chosen and drawn from the seed alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .fashionscenes import MAX_OBJECTS, NUM_CLASSES, FashionScenes

CLS_LABELS = ("dominant", "count")


def num_cls_classes(kind: str) -> int:
    """How many classes a classifier label of ``kind`` has."""
    if kind == "dominant":
        return NUM_CLASSES
    if kind == "count":
        return MAX_OBJECTS + 1
    raise ValueError(f"cls_label must be one of {list(CLS_LABELS)}, got {kind!r}")


def scene_class_labels(scenes: FashionScenes, kind: str) -> np.ndarray:
    """One int64 label per scene: its dominant class, or its object count."""
    num_cls_classes(kind)  # validates kind
    values = scenes.dominant if kind == "dominant" else scenes.count
    return np.asarray(values, dtype=np.int64)


def binary_labels(labels: np.ndarray | torch.Tensor, normal: Sequence[int]) -> np.ndarray:
    """1 for abnormal, 0 for normal (labels listed in ``normal``)."""
    arr = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    return (~np.isin(arr, list(normal))).astype(np.int64)


def noisy_labels(
    labels: np.ndarray, fraction: float, num_classes: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(labels with round(n * fraction) of them replaced by random labels, replaced
    indices sorted)``; a pure function of its arguments."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"cls_label_noise must be in [0, 1], got {fraction}")
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    k = round(n * fraction)
    rng = np.random.default_rng([seed, 0x4A53])  # "JS": a stream of its own
    chosen = np.sort(rng.permutation(n)[:k])
    out = labels.copy()
    out[chosen] = rng.integers(0, num_classes, size=k)
    return out, chosen


class ClassificationScenes(Dataset):
    """(image, label) samples: a scene set's images (transformed, mask dropped) and labels."""

    def __init__(self, scenes: FashionScenes, labels: np.ndarray) -> None:
        if len(labels) != len(scenes):
            raise ValueError(f"{len(labels)} labels for {len(scenes)} scenes")
        self.scenes = scenes
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, _ = self.scenes[index]
        return image, self.labels[index]
