"""Image-level labels for JointSeg's classifier agent, derived from FashionScenes.

The classifier agent needs (image, class label) samples and no masks. FashionScenes
stores per scene its mask, its ``dominant`` class (most labelled pixels) and the class of
every visible object, so each becomes a label: ``dominant`` (11 classes, background = 0
for an empty scene), or a 0..4 "severity grade" standing in for the paper's diabetic
retinopathy levels (0 "no DR" ... 4 "proliferative DR"), ``area`` or ``count``.

The paper's DR grade is defined by the very lesions its segmenter segments, so what the
classifier learns is what the segmenter needs. ``area`` (ours, the bench's label) keeps
that: the grade bins the share of the scene's pixels that belong to an object of any of
the 10 classes (the mask's labels 1..10; the ignored border band does not count) at
``area_edges`` (4 increasing fractions; grade g when edges[g-1] <= share < edges[g]).
Objects keep their pixel size up to 128-px canvases, so the share depends on the scene
size: the default edges (0.24, 0.29, 0.34, 0.41) are the 40/55/70/85 % quantiles of the
64-px 2000-scene build (grades 40, 15, 15, 15, 15 %: grade 0 the most frequent, as in
EyePACS, and the binary test balanced-ish); at 128 px (0.09, 0.12, 0.15, 0.19) give
the same shares.

``count`` (the previous default) is the number of objects whose class is in
``count_classes``. Every scene holds 1..4 objects, so counting all of them would leave
grade 0 empty; the default counts footwear (sandal 6, sneaker 8, ankle boot 10), which
leaves seven of the segmenter's classes invisible to the grade. A binary label (normal vs
abnormal) groups labels: those listed in ``binary_normal`` are normal (paper: level 0),
every other label abnormal.

Partial random labels (the paper's Section II-C): :func:`noisy_labels` replaces exactly
``round(n * p)`` labels by uniformly drawn ones (which may equal the true label by
chance, as random labels do), chosen and drawn from the seed alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import numpy as np
import torch
from torch.utils.data import Dataset

from ..config import DataConfig
from .fashionscenes import MAX_OBJECTS, NUM_CLASSES, FashionScenes

CLS_LABELS = ("dominant", "count", "area")
BINARY_RULES = ("argmax", "mass")
FOOTWEAR = (6, 8, 10)  # sandal, sneaker, ankle boot: the count grade's default classes
# area grade: the 40/55/70/85 % quantiles of the object-pixel share, 64-px build of 2000
AREA_EDGES = (0.24, 0.29, 0.34, 0.41)


def num_cls_classes(kind: str) -> int:
    """How many classes a classifier label of ``kind`` has."""
    if kind == "dominant":
        return NUM_CLASSES
    if kind == "count":
        return MAX_OBJECTS + 1
    if kind == "area":
        return len(AREA_EDGES) + 1
    raise ValueError(f"cls_label must be one of {list(CLS_LABELS)}, got {kind!r}")


def check_area_edges(edges: Sequence[float]) -> None:
    """Four strictly increasing fractions in (0, 1): the area grade's bin edges."""
    values = list(edges)
    ok = len(values) == len(AREA_EDGES) and all(0 < v < 1 for v in values)
    if not ok or any(a >= b for a, b in pairwise(values)):
        raise ValueError(
            f"area_edges: expected {len(AREA_EDGES)} increasing fractions in (0, 1), got {values}"
        )


def object_share(masks: np.ndarray) -> np.ndarray:
    """Per mask [N, H, W], the share of its pixels labelled with an object class (1..10)."""
    masks = np.asarray(masks)
    return ((masks >= 1) & (masks < NUM_CLASSES)).mean(axis=(1, 2))


def scene_class_labels(
    scenes: FashionScenes,
    kind: str,
    count_classes: Sequence[int] = FOOTWEAR,
    area_edges: Sequence[float] = AREA_EDGES,
) -> np.ndarray:
    """One int64 label per scene: its dominant class, or its grade (``area``: the bin of
    its object-pixel share at ``area_edges``; ``count``: the number of its objects whose
    class is in ``count_classes``)."""
    num_cls_classes(kind)  # validates kind
    if kind == "dominant":
        return np.asarray(scenes.dominant, dtype=np.int64)
    if kind == "area":
        check_area_edges(area_edges)
        share = object_share(scenes.masks)
        return np.searchsorted(np.asarray(area_edges), share, side="right").astype(np.int64)
    bad = [c for c in count_classes if not 1 <= c < NUM_CLASSES]
    if bad or not count_classes:
        raise ValueError(
            f"count_classes: expected object classes in 1..{NUM_CLASSES - 1}, "
            f"got {list(count_classes)}"
        )
    objects = np.asarray(scenes.objects)  # class ids, 0-padded
    return np.isin(objects, list(count_classes)).sum(1).astype(np.int64)


def binary_labels(labels: np.ndarray | torch.Tensor, normal: Sequence[int]) -> np.ndarray:
    """1 for abnormal, 0 for normal (labels listed in ``normal``)."""
    arr = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    return (~np.isin(arr, list(normal))).astype(np.int64)


def predicted_abnormal(logits: torch.Tensor, normal: Sequence[int], rule: str) -> torch.Tensor:
    """1 where the classifier calls a sample abnormal. ``argmax``: its top-1 label is not
    in ``normal`` (the predicted level, grouped as the labels are); ``mass``: the softmax
    mass on the ``normal`` labels is below one half."""
    if rule not in BINARY_RULES:
        raise ValueError(f"binary_rule must be one of {list(BINARY_RULES)}, got {rule!r}")
    is_normal = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
    is_normal[[c for c in normal if 0 <= c < logits.shape[1]]] = True
    if rule == "argmax":
        return (~is_normal[logits.argmax(1)]).long()
    return (logits.softmax(1)[:, is_normal].sum(1) < 0.5).long()


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


def joint_scenes(cfg: DataConfig, split: str) -> FashionScenes:
    """A FashionScenes split with the pipeline of every ``data.*`` option
    (:func:`coopseg.data.transforms.data_transform`: flips, random padding, per-image
    standardisation), for both agents and their evaluation."""
    from . import build_dataset  # the package's builder; it does not import this module

    if cfg.dataset != "fashionscenes":
        raise ValueError(f"joint scenes come from FashionScenes, not {cfg.dataset!r}")
    return build_dataset(cfg, split)  # type: ignore[return-value]
