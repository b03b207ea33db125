"""The one interface every segmentation data set implements.

A data set knows how to load raw sample ``i`` (an RGB uint8 image and an integer
label mask) and how to name it in an error message. This base class checks the
pair (sizes agree, labels in range) before any transform runs, so a bad file is
reported by name instead of surfacing later as a silently wrong metric.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from ..fileio import save_index_png

IGNORE_INDEX = 255

Transform = Callable[[tv_tensors.Image, tv_tensors.Mask], tuple[torch.Tensor, torch.Tensor]]


class DataError(ValueError):
    """Bad input data: the message names the file (or sample) and the problem.

    ``kind`` sorts problems for ``coopseg data check``: ``missing_pair``,
    ``missing_class_file``, ``unreadable``, ``bad_format``, ``size_mismatch``,
    ``bad_label``, ``bad_list`` or ``invalid`` (anything else).
    """

    def __init__(self, message: str, kind: str = "invalid") -> None:
        super().__init__(message)
        self.kind = kind


class SegmentationDataset(Dataset):
    """Base class: subclasses set ``class_names``/``palette`` and implement ``load``.

    ``__getitem__`` returns ``(image, mask)``: image float32 ``[3, H, W]`` (after the
    transform; in [0, 1] when there is none), mask int64 ``[H, W]`` with values in
    ``[0, num_classes)`` or ``ignore_index``.
    """

    class_names: Sequence[str] = ()
    palette: np.ndarray = np.zeros((0, 3), dtype=np.uint8)
    ignore_index: int = IGNORE_INDEX
    bands: int = 3  # image channels (len(data.mean)); not 3: float32 images in [0, 1]

    def __init__(self, transform: Transform | None = None) -> None:
        self.transform = transform

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Raw sample: image uint8 ``[H, W, 3]``, mask integer ``[H, W]``."""
        raise NotImplementedError

    def describe(self, index: int) -> str:
        """How to name sample ``index`` in an error message (a file path, usually)."""
        return f"{type(self).__name__} sample {index}"

    def sample_name(self, index: int) -> str:
        """A file-name-safe name of sample ``index`` (its file stem, usually)."""
        return f"{index:06d}"

    def save_prediction(self, index: int, pred: np.ndarray, out_dir: Path) -> Path:
        """Write the predicted class indices of sample ``index`` as a palette PNG.

        Named ``<sample_name>.png`` so predictions line up with the inputs; data sets
        with an official result format (Cityscapes) override this.
        """
        path = Path(out_dir) / f"{self.sample_name(index)}.png"
        save_index_png(path, pred, self.palette)
        return path

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.load(index)
        check_pair(
            image, mask, self.num_classes, self.ignore_index, self.describe(index), self.bands
        )
        img_t = tv_tensors.Image(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1))
        mask_t = tv_tensors.Mask(torch.from_numpy(mask.astype(np.int64, copy=False)))
        if self.transform is not None:
            img_out, mask_out = self.transform(img_t, mask_t)
        else:
            img_out = img_t.float().div_(255.0) if image.dtype == np.uint8 else img_t.float()
            mask_out = mask_t
        return img_out.as_subclass(torch.Tensor), mask_out.as_subclass(torch.Tensor).long()


def check_pair(
    image: np.ndarray,
    mask: np.ndarray,
    num_classes: int,
    ignore_index: int,
    name: str,
    bands: int = 3,
) -> None:
    """Raise :class:`DataError` naming ``name`` if the image/mask pair is unusable."""
    if image.ndim != 3 or image.shape[2] != bands:
        if bands == 3:
            raise DataError(
                f"{name}: image must be RGB (H, W, 3), got shape {tuple(image.shape)}",
                "bad_format",
            )
        got = image.shape[2] if image.ndim == 3 else 1
        raise DataError(
            f"{name}: image has {got} bands, the config expects {bands} "
            "(len(data.mean), model.in_chans)",
            "bad_format",
        )
    if mask.ndim != 2:
        raise DataError(
            f"{name}: mask must be one channel (H, W), got shape {tuple(mask.shape)}", "bad_format"
        )
    if image.shape[:2] != mask.shape:
        raise DataError(
            f"{name}: mask size {mask.shape[1]}x{mask.shape[0]} differs from image size "
            f"{image.shape[1]}x{image.shape[0]} (width x height)",
            "size_mismatch",
        )
    values = np.unique(mask)
    bad = values[(values < 0) | ((values >= num_classes) & (values != ignore_index))]
    if bad.size:
        raise DataError(
            f"{name}: label values {bad.tolist()[:10]} are outside [0, {num_classes}) "
            f"and not the ignore index {ignore_index}",
            "bad_label",
        )


class PredictionWriter:
    """Saves predictions of ``dataset[indices[0]], dataset[indices[1]], ...`` in that order.

    Called with each predicted batch (``[B, H, W]`` class indices) of an evaluation
    loop that visits ``indices`` in order; each mask goes through
    :meth:`SegmentationDataset.save_prediction`, so a data set with an official
    result format (Cityscapes label ids) writes that format.
    """

    def __init__(self, dataset: SegmentationDataset, indices: Sequence[int], out_dir: Path):
        self.dataset = dataset
        self.indices = list(indices)
        self.out_dir = Path(out_dir)
        self.written: list[Path] = []

    def __call__(self, preds: torch.Tensor) -> None:
        for pred in preds.to("cpu", torch.uint8).numpy():
            if len(self.written) >= len(self.indices):
                raise RuntimeError("more predictions than samples to name them by")
            index = self.indices[len(self.written)]
            self.written.append(self.dataset.save_prediction(index, pred, self.out_dir))
