"""PASCAL VOC 2012 segmentation, optionally augmented with SBD ("train_aug").

Layout (``data.root`` may be the folder holding ``VOCdevkit``, ``VOCdevkit`` itself
or ``VOCdevkit/VOC2012``)::

    VOCdevkit/VOC2012/JPEGImages/<id>.jpg
    VOCdevkit/VOC2012/SegmentationClass/<id>.png          palette PNGs = class indices
    VOCdevkit/VOC2012/ImageSets/Segmentation/{train,val,trainval}.txt
    VOCdevkit/VOC2012/SegmentationClassAug/<id>.png       optional, ready-made aug masks
    benchmark_RELEASE/dataset/cls/<id>.mat                SBD (GTcls.Segmentation)
    benchmark_RELEASE/dataset/{train,val}.txt

SBD is looked for at ``data.voc_sbd_root`` (``benchmark_RELEASE`` or its ``dataset``
folder), else ``benchmark_RELEASE`` beside ``VOCdevkit`` or inside the root.

``train_aug`` = (VOC train ∪ SBD train ∪ SBD val) − VOC val. On the real data SBD
train + val hold 8,498 + 2,857 = 11,355 ids, and SBD ∪ VOC 2012 trainval holds
12,031 distinct ids; VOC train and val are disjoint, so adding VOC train and
removing the 1,449 VOC val ids leaves 12,031 − 1,449 = 10,582 images. SBD
overlaps VOC val, which is why the subtraction matters: training on them would
leak validation images.

Masks of ``train_aug`` come from, in order: VOC ``SegmentationClass`` (ids of the
VOC lists; these have the 255 boundary band), ``SegmentationClassAug/<id>.png``,
SBD ``cls/<id>.mat`` (no boundary band). Images come from ``JPEGImages`` (SBD's
``img/`` folder is the fallback): every SBD image is a VOC 2011 image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import DataError, Transform
from .fashionscenes import _voc_palette
from .files import FileDataset, Problem, read_index_mask, read_list

CLASS_NAMES: tuple[str, ...] = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
PALETTE: np.ndarray = _voc_palette(len(CLASS_NAMES))
SPLITS = ("train", "val", "trainval", "train_aug")


def find_voc2012(root: str | Path) -> Path:
    """``VOCdevkit/VOC2012`` under ``root`` (root may already be one of those folders)."""
    root = Path(root)
    for candidate in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (candidate / "JPEGImages").is_dir() or (candidate / "ImageSets").is_dir():
            return candidate
    raise DataError(
        f"{root}: no VOC 2012 folder found (looked for JPEGImages/ in {root}, {root}/VOC2012 "
        f"and {root}/VOCdevkit/VOC2012)",
        "missing_pair",
    )


def find_sbd(voc: Path, sbd_root: str | Path | None = None) -> Path | None:
    """SBD's ``dataset`` folder (holding ``cls/``), or None if there is none."""
    if sbd_root is not None:
        base = Path(sbd_root)
        for candidate in (base, base / "dataset", base / "benchmark_RELEASE" / "dataset"):
            if (candidate / "cls").is_dir():
                return candidate
        raise DataError(
            f"{base}: data.voc_sbd_root has no SBD cls/ folder (looked in {base}, "
            f"{base}/dataset and {base}/benchmark_RELEASE/dataset)",
            "missing_pair",
        )
    for parent in (voc.parent.parent, voc.parent, voc):
        candidate = parent / "benchmark_RELEASE" / "dataset"
        if (candidate / "cls").is_dir():
            return candidate
    return None


def read_sbd_mat(path: Path) -> np.ndarray:
    """The class segmentation of one SBD ``cls/*.mat`` file, uint8 ``[H, W]``."""
    from scipy.io import loadmat

    try:
        mat = loadmat(str(path), squeeze_me=True, struct_as_record=False)
        seg = mat["GTcls"].Segmentation
    except FileNotFoundError:
        raise DataError(f"{path}: SBD mask file not found", "missing_pair") from None
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as exc:
        raise DataError(
            f"{path}: cannot read SBD GTcls.Segmentation ({exc})", "unreadable"
        ) from exc
    seg = np.asarray(seg)
    if seg.ndim != 2 or seg.size == 0 or seg.min() < 0 or seg.max() > 255:
        raise DataError(f"{path}: GTcls.Segmentation is not a 2-D label image", "bad_format")
    return seg.astype(np.uint8)


def train_aug_ids(
    voc_train: list[str], voc_val: list[str], sbd_train: list[str], sbd_val: list[str]
) -> list[str]:
    """(VOC train ∪ SBD train ∪ SBD val) − VOC val, sorted (10,582 ids on the real data)."""
    return sorted((set(voc_train) | set(sbd_train) | set(sbd_val)) - set(voc_val))


class VOCSegmentation(FileDataset):
    """VOC 2012 ``train``, ``val``, ``trainval`` or SBD-augmented ``train_aug``."""

    class_names = CLASS_NAMES
    palette = PALETTE

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transform: Transform | None = None,
        sbd_root: str | Path | None = None,
        strict: bool = True,
    ) -> None:
        super().__init__(transform)
        if split not in SPLITS:
            raise DataError(f"VOC split must be one of {list(SPLITS)}, got {split!r}", "bad_list")
        self.voc = find_voc2012(root)
        self.split = split
        self.sbd = find_sbd(self.voc, sbd_root)
        lists = self.voc / "ImageSets" / "Segmentation"
        if split == "train_aug":
            ids = self._train_aug_ids(lists)
        else:
            ids = self._read_list(lists / f"{split}.txt")
        self._pair(ids)
        self._finish(strict, f"VOC {split} split in {self.voc}")

    def _read_list(self, path: Path) -> list[str]:
        if not path.is_file():
            self.problems.append(Problem("bad_list", str(path), f"{path}: split list not found"))
            return []
        return read_list(path)

    def _train_aug_ids(self, lists: Path) -> list[str]:
        ready = lists / "train_aug.txt"
        if ready.is_file():
            return read_list(ready)
        if self.sbd is None:
            self.problems.append(
                Problem(
                    "bad_list",
                    str(lists / "train_aug.txt"),
                    f"{lists}/train_aug.txt: not found, and no SBD (benchmark_RELEASE) to build "
                    "it from; set data.voc_sbd_root",
                )
            )
            return []
        return train_aug_ids(
            self._read_list(lists / "train.txt"),
            self._read_list(lists / "val.txt"),
            self._read_list(self.sbd / "train.txt"),
            self._read_list(self.sbd / "val.txt"),
        )

    def _pair(self, ids: list[str]) -> None:
        jpeg, voc_masks = self.voc / "JPEGImages", self.voc / "SegmentationClass"
        aug = self.voc / "SegmentationClassAug"
        for sample in ids:
            image = jpeg / f"{sample}.jpg"
            if not image.is_file() and self.sbd is not None:
                fallback = self.sbd / "img" / f"{sample}.jpg"
                image = fallback if fallback.is_file() else image
            candidates = [voc_masks / f"{sample}.png"]
            if self.split == "train_aug":
                candidates.append(aug / f"{sample}.png")
                if self.sbd is not None:
                    candidates.append(self.sbd / "cls" / f"{sample}.mat")
            mask = next((c for c in candidates if c.is_file()), None)
            if not image.is_file():
                self.problems.append(
                    Problem("missing_pair", str(image), f"{image}: image of id {sample} not found")
                )
            elif mask is None:
                looked = ", ".join(str(c) for c in candidates)
                self.problems.append(
                    Problem("missing_pair", str(image), f"{sample}: no mask found ({looked})")
                )
            else:
                self.images.append(image)
                self.masks.append(mask)

    def read_mask(self, index: int) -> np.ndarray:
        path = self.masks[index]
        return read_sbd_mat(path) if path.suffix == ".mat" else read_index_mask(path)
