"""``coopseg data check``: read every file of a data set once, before training does.

Training only checks the layout up front (pairs exist, split lists resolve) and
each sample's content when it is loaded, so a corrupt file deep in the list would
stop a run hours in. This check reads everything and reports, per split:

* hard errors, each naming its file: ``missing_pair`` (image without mask or the
  reverse, a missing folder), ``missing_class_file`` (folder data set without its
  class file), ``bad_list`` (split list missing or naming absent
  files), ``unreadable`` (corrupt or truncated file), ``bad_format`` (wrong image
  or mask mode), ``size_mismatch`` (mask and image sizes differ), ``bad_label``
  (values outside the class set, unknown colours or label ids);
* the class pixel histogram and how many images contain each class, image sizes
  (in displayed orientation: EXIF applied, as training reads them), the training crop
  against them (what ``data.crop_size: auto`` picks, and a warning when a crop given
  with ``--crop-size`` is mostly padding), band counts (an image whose band count
  differs from ``--bands``, or without it from the most common count, is a
  ``bad_format`` error), and warnings (classes never seen in the split).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from ..config import ConfigError, DataConfig
from .base import DataError, SegmentationDataset, check_pair
from .files import FileDataset, Problem, read_image
from .sizes import auto_crop, crop_report


@dataclass
class SplitReport:
    """What ``coopseg data check`` found in one split."""

    dataset: str
    split: str
    root: str
    samples: int = 0
    class_names: list[str] = field(default_factory=list)
    pixels: list[int] = field(default_factory=list)  # labelled pixels per class
    images: list[int] = field(default_factory=list)  # images containing each class
    ignore_pixels: int = 0
    sizes: dict[str, int] = field(default_factory=dict)  # "WxH" -> number of images
    bands: dict[str, int] = field(default_factory=dict)  # band count -> number of images
    auto_crop: list[int] | None = None  # [height, width] data.crop_size auto would train
    crop_size: list[int] | None = None  # the crop checked against the sizes (--crop-size)
    errors: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict:
        out = asdict(self)
        out["errors"] = [p._asdict() for p in self.errors]
        out["error_counts"] = dict(Counter(p.kind for p in self.errors))
        out["ok"] = self.ok
        return out

    def format(self) -> str:
        """A human-readable report: summary, class table, then every error."""
        head = f"{self.dataset} {self.split} ({self.root}): {self.samples} samples"
        lines = [head, "-" * len(head)]
        if self.class_names:
            total = max(1, sum(self.pixels) + self.ignore_pixels)
            lines.append(f"{'class':<20} {'pixels':>12} {'%':>6} {'images':>7}")
            for name, pix, imgs in zip(self.class_names, self.pixels, self.images, strict=False):
                lines.append(f"{name:<20} {pix:>12} {100 * pix / total:>6.2f} {imgs:>7}")
            ignore_pct = 100 * self.ignore_pixels / total
            lines.append(f"{'(ignore 255)':<20} {self.ignore_pixels:>12} {ignore_pct:>6.2f}")
        if self.sizes:
            common = sorted(self.sizes.items(), key=lambda kv: -kv[1])[:5]
            sizes = ", ".join(f"{s} x{n}" for s, n in common)
            more = f" (+{len(self.sizes) - 5} more)" if len(self.sizes) > 5 else ""
            lines.append(f"image sizes: {sizes}{more}")
        if self.bands:
            counts = ", ".join(f"{b} x{n}" for b, n in sorted(self.bands.items()))
            lines.append(f"bands: {counts}")
        if self.auto_crop:
            line = f"crop: data.crop_size auto trains {self.auto_crop[0]}x{self.auto_crop[1]}"
            if self.crop_size:
                line += f"; --crop-size {self.crop_size[0]}x{self.crop_size[1]} checked"
            lines.append(line)
        lines += [f"warning: {w}" for w in self.warnings]
        if self.errors:
            counts = ", ".join(f"{k} {n}" for k, n in Counter(p.kind for p in self.errors).items())
            lines.append(f"{len(self.errors)} hard error(s): {counts}")
            lines += [f"error [{p.kind}] {p.message}" for p in self.errors]
        else:
            lines.append("no hard errors")
        return "\n".join(lines)


def _read(dataset: SegmentationDataset, index: int) -> tuple[list[DataError], tuple | None]:
    """Read one sample; every file's own problem is collected, not only the first."""
    if not isinstance(dataset, FileDataset):
        try:
            return [], dataset.load(index)
        except DataError as err:
            return [err], None
    errors, image, mask = [], None, None
    try:
        image = read_image(dataset.images[index], None)  # .npy / .tif: every band
    except DataError as err:
        errors.append(err)
    try:
        mask = dataset.read_mask(index)
    except DataError as err:
        errors.append(err)
    return errors, None if errors else (image, mask)


def check_split(
    dataset: SegmentationDataset,
    report: SplitReport,
    bands: int | None = None,
    crop_size: Sequence[int] | None = None,
) -> SplitReport:
    """Read every sample of ``dataset`` and add what was found to ``report``; ``bands``:
    the band count every image must have (default: the most common one); the training
    crop (``crop_size``, and what ``auto`` picks) against the image sizes."""
    k = dataset.num_classes
    report.class_names = list(dataset.class_names)
    pixels = np.zeros(256, dtype=np.int64)
    images = np.zeros(256, dtype=np.int64)
    sizes: Counter[str] = Counter()
    band_counts: dict[str, int] = {}  # sample name -> its band count
    shapes: list[tuple[int, int]] = []
    report.samples = len(dataset)
    for i in range(len(dataset)):
        name = dataset.describe(i)
        errors, pair = _read(dataset, i)
        if pair is not None:
            image, mask = pair
            try:
                band_counts[name] = image.shape[2] if image.ndim == 3 else 1
                check_pair(image, mask, k, dataset.ignore_index, name, band_counts[name])
            except DataError as err:
                errors.append(err)
        if errors:
            report.errors += [Problem(e.kind, name, str(e)) for e in errors]
            continue
        hist = np.bincount(mask.ravel().astype(np.int64), minlength=256)
        pixels += hist
        images += hist > 0
        sizes[f"{image.shape[1]}x{image.shape[0]}"] += 1
        shapes.append(image.shape[:2])
    counted = Counter(band_counts.values())
    report.bands = {str(b): n for b, n in sorted(counted.items())}
    expected = bands or (counted.most_common(1)[0][0] if counted else None)
    for name, count in band_counts.items():
        if count != expected:
            where = "--bands" if bands else "most images"
            report.errors.append(
                Problem("bad_format", name, f"{name}: {count} bands, {where}: {expected}")
            )
    report.pixels = pixels[:k].tolist()
    report.images = images[:k].tolist()
    report.ignore_pixels = int(pixels[dataset.ignore_index])
    report.sizes = dict(sizes)
    if shapes:
        report.auto_crop = auto_crop(shapes)
        if crop_size is not None:
            report.crop_size = [int(c) for c in crop_size]
            warning = crop_report(report.crop_size, shapes, f"the {report.split} images")
            if warning:
                report.warnings.append(warning)
    unseen = [n for n, c in zip(dataset.class_names, report.images, strict=False) if c == 0]
    if unseen and report.samples:
        report.warnings.append(f"classes with no labelled pixel in this split: {unseen}")
    return report


def check_dataset(
    cfg: DataConfig,
    splits: Sequence[str],
    bands: int | None = None,
    crop_size: Sequence[int] | None = None,
) -> list[SplitReport]:
    """One report per split; layout problems and unopenable data sets are hard errors.
    ``bands``: the band count every image must have; ``crop_size``: a training crop to
    check against the image sizes."""
    from . import open_dataset

    reports = []
    for split in splits:
        report = SplitReport(cfg.dataset, split, str(cfg.root))
        try:
            dataset = open_dataset(cfg, split, strict=False)
        except (DataError, ConfigError) as err:
            kind = getattr(err, "kind", "invalid")
            report.errors.append(Problem(kind, str(cfg.root), str(err)))
            reports.append(report)
            continue
        if isinstance(dataset, FileDataset):
            report.errors.extend(dataset.problems)
        reports.append(check_split(dataset, report, bands, crop_size))
    return reports


def reports_json(reports: Sequence[SplitReport]) -> str:
    return json.dumps(
        {"ok": all(r.ok for r in reports), "splits": [r.to_dict() for r in reports]}, indent=2
    )
