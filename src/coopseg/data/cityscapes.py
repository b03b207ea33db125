"""Cityscapes (fine annotations) in the official folder layout.

::

    ROOT/leftImg8bit/{train,val,test}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    ROOT/gtFine/{train,val,test}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png

Label ids (0..33) become the 19 train ids (255 = ignore) through the official
table in ``cityscapesscripts.helpers.labels``, applied as one 256-entry lookup
table. ``coopseg data prepare cityscapes ROOT`` can write the mapped masks once as
``*_gtFine_labelTrainIds.png`` beside the originals; the loader then reads those
(when they are newer than the label-id file) and skips the mapping.

Predictions go back to label ids for the official evaluator
(:func:`write_cityscapes_predictions`), named ``<city>_<seq>_<frame>_pred_labelIds.png``
so that ``evalPixelLevelSemanticLabeling`` matches them to the ground truth.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..fileio import save_index_png
from .base import DataError, Transform
from .files import FileDataset, Problem, read_index_mask

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"
TRAIN_ID_SUFFIX = "_gtFine_labelTrainIds.png"
PREDICTION_SUFFIX = "_pred_labelIds.png"
ENV_VAR = "CITYSCAPES_DATASET"  # the official scripts' variable for the data set folder


def _labels() -> list:
    try:
        from cityscapesscripts.helpers.labels import labels
    except ImportError as exc:  # pragma: no cover - installed with coopseg[datasets]
        raise DataError(
            "Cityscapes needs the official label table from cityscapesscripts: "
            "pip install 'coopseg[datasets]' (or cityscapesscripts==2.3.0)"
        ) from exc
    return list(labels)


@lru_cache(maxsize=1)
def _tables() -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[str, ...], np.ndarray]:
    labels = _labels()
    to_train = np.full(256, 255, dtype=np.uint8)
    known = np.zeros(256, dtype=bool)
    to_label = np.zeros(256, dtype=np.uint8)  # train id -> label id; ignore -> 0 (unlabeled)
    names: dict[int, str] = {}
    colours: dict[int, tuple[int, int, int]] = {}
    for label in labels:
        if not 0 <= label.id < 256:
            continue  # the license plate (-1) never appears in label images
        known[label.id] = True
        if 0 <= label.trainId < 255:
            to_train[label.id] = label.trainId
            to_label[label.trainId] = label.id
            names[label.trainId] = label.name
            colours[label.trainId] = tuple(label.color)
    order = sorted(names)
    if order != list(range(len(order))):  # pragma: no cover - a broken table
        raise DataError(f"cityscapesscripts label table has gaps in its train ids: {order}")
    palette = np.array([colours[t] for t in order], dtype=np.uint8)
    return to_train, known, to_label, tuple(names[t] for t in order), palette


def label_to_train_id_table() -> np.ndarray:
    """uint8 ``[256]``: label id -> train id (0..18), 255 for ignored or unknown ids."""
    return _tables()[0]


def train_to_label_id_table() -> np.ndarray:
    """uint8 ``[256]``: train id -> label id (0..33); anything else -> 0 (unlabeled)."""
    return _tables()[2]


def class_names() -> tuple[str, ...]:
    """The 19 evaluated classes, in train-id order."""
    return _tables()[3]


def to_train_ids(label_ids: np.ndarray, name: str | Path = "label image") -> np.ndarray:
    """Map a label-id mask to train ids; ids missing from the official table are an error."""
    to_train, known = _tables()[0], _tables()[1]
    label_ids = np.asarray(label_ids)
    if label_ids.dtype != np.uint8:
        if label_ids.size and (label_ids.min() < 0 or label_ids.max() > 255):
            raise DataError(f"{name}: label ids outside 0..255", "bad_label")
        label_ids = label_ids.astype(np.uint8)
    if not known[label_ids].all():
        bad = np.unique(label_ids[~known[label_ids]])
        raise DataError(
            f"{name}: label ids {bad.tolist()[:10]} are not in the Cityscapes label table "
            "(cityscapesscripts.helpers.labels)",
            "bad_label",
        )
    return to_train[label_ids]


def to_label_ids(train_ids: np.ndarray) -> np.ndarray:
    """Map predicted train ids (0..18) back to label ids for the official evaluator."""
    train_ids = np.asarray(train_ids)
    if train_ids.size and (train_ids.min() < 0 or train_ids.max() >= len(class_names())):
        raise ValueError(
            f"predicted train ids must be in 0..{len(class_names()) - 1}, got "
            f"{int(train_ids.min())}..{int(train_ids.max())}"
        )
    return train_to_label_id_table()[train_ids.astype(np.uint8)]


def frame_name(path: str | Path) -> str:
    """``<city>_<seq>_<frame>`` of any Cityscapes file name (image, label or prediction)."""
    parts = Path(path).name.split("_")
    if len(parts) < 4:
        raise DataError(
            f"{path}: not a Cityscapes file name (<city>_<seq>_<frame>_<type>.png)", "bad_list"
        )
    return "_".join(parts[:3])


def write_cityscapes_predictions(
    predictions: Iterable[tuple[str | Path, np.ndarray]], out_dir: str | Path
) -> list[Path]:
    """Write ``(image or label path, train-id mask)`` pairs as official result files.

    Each mask is mapped to label ids and written as a one-channel PNG named
    ``<city>_<seq>_<frame>_pred_labelIds.png`` in ``out_dir``: the pattern
    ``<city>_<seq>_<frame>*.png`` by which ``evalPixelLevelSemanticLabeling`` finds
    the prediction of each ground-truth file (and the benchmark server's format).
    """
    out = Path(out_dir)
    written = []
    for source, mask in predictions:
        path = out / f"{frame_name(source)}{PREDICTION_SUFFIX}"
        save_index_png(path, to_label_ids(mask))
        written.append(path)
    return written


def prepare_cityscapes(root: str | Path, force: bool = False) -> tuple[int, int]:
    """Write ``*_gtFine_labelTrainIds.png`` beside every label-id file, atomically.

    Returns ``(written, skipped)``; an up-to-date file is skipped unless ``force``.
    """
    root = Path(root)
    sources = sorted((root / "gtFine").glob(f"*/*/*{LABEL_SUFFIX}"))
    if not sources:
        raise DataError(f"{root}/gtFine: no *{LABEL_SUFFIX} files found", "missing_pair")
    written = skipped = 0
    for src in sources:
        dst = src.with_name(src.name[: -len(LABEL_SUFFIX)] + TRAIN_ID_SUFFIX)
        if not force and _fresh(dst, src):
            skipped += 1
            continue
        save_index_png(dst, to_train_ids(read_index_mask(src), src))
        written += 1
    return written, skipped


def _fresh(cached: Path, source: Path) -> bool:
    try:
        return cached.stat().st_mtime >= source.stat().st_mtime
    except FileNotFoundError:
        return False


class Cityscapes(FileDataset):
    """One split (``train``, ``val`` or ``test``) of Cityscapes with gtFine labels."""

    ignore_index = 255

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transform: Transform | None = None,
        strict: bool = True,
    ) -> None:
        super().__init__(transform)
        self.root = Path(root)
        self.split = split
        self.class_names = class_names()
        self.palette = _tables()[4]
        self.mapped: list[bool] = []  # True: the mask holds label ids still to be mapped
        image_dir = self.root / "leftImg8bit" / split
        label_dir = self.root / "gtFine" / split
        for folder in (image_dir, label_dir):
            if not folder.is_dir():
                self.problems.append(
                    Problem("missing_pair", str(folder), f"{folder}: folder not found")
                )
        if not self.problems:
            self._scan(image_dir, label_dir)
        self._finish(strict, f"Cityscapes {split} split in {self.root}")

    def _scan(self, image_dir: Path, label_dir: Path) -> None:
        images = {p.name[: -len(IMAGE_SUFFIX)]: p for p in image_dir.glob(f"*/*{IMAGE_SUFFIX}")}
        labels = {p.name[: -len(LABEL_SUFFIX)]: p for p in label_dir.glob(f"*/*{LABEL_SUFFIX}")}
        for stem in sorted(images.keys() | labels.keys()):
            image, label = images.get(stem), labels.get(stem)
            if label is None:
                want = label_dir / image.parent.name / f"{stem}{LABEL_SUFFIX}"
                self.problems.append(Problem("missing_pair", str(image), f"{want}: not found"))
                continue
            if image is None:
                want = image_dir / label.parent.name / f"{stem}{IMAGE_SUFFIX}"
                self.problems.append(Problem("missing_pair", str(label), f"{want}: not found"))
                continue
            cached = label.with_name(f"{stem}{TRAIN_ID_SUFFIX}")
            use_cache = _fresh(cached, label)
            self.images.append(image)
            self.masks.append(cached if use_cache else label)
            self.mapped.append(not use_cache)

    def read_mask(self, index: int) -> np.ndarray:
        mask = read_index_mask(self.masks[index])
        return to_train_ids(mask, self.masks[index]) if self.mapped[index] else mask

    def sample_name(self, index: int) -> str:
        return frame_name(self.images[index])

    def save_prediction(self, index: int, pred: np.ndarray, out_dir: Path) -> Path:
        """Official result format: label ids, ``<city>_<seq>_<frame>_pred_labelIds.png``."""
        return write_cityscapes_predictions([(self.images[index], pred)], out_dir)[0]
