"""Confusion-matrix metrics checked against hand-worked examples."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import pytest
import torch

from coopseg.engine.metrics import ConfusionMatrix, SegMetrics, format_table

IGN = 255

# A 3-class 4×4 example. Ground truth (255 = ignore) and prediction:
#
#   target          pred
#   0 0 1 1         0 1 1 1
#   0 0 1 1         0 0 1 2
#   2 2 . .         2 0 0 1
#   2 2 2 .         2 2 1 2
#
# Non-ignored pixels: 13. Rows = ground truth, cols = prediction:
#   gt 0: (0,0)->0 (0,1)->1 (1,0)->0 (1,1)->0            -> [3, 1, 0]
#   gt 1: (0,2)->1 (0,3)->1 (1,2)->1 (1,3)->2            -> [0, 3, 1]
#   gt 2: (2,0)->2 (2,1)->0 (3,0)->2 (3,1)->2 (3,2)->1   -> [1, 1, 3]
# The three ignored pixels predict 0, 1, 2 and must not count anywhere.
# TP = (3, 3, 3); GT = (4, 4, 5); pred = (4, 5, 4); union = GT + pred - TP = (5, 6, 6).
TARGET = torch.tensor(
    [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, IGN, IGN], [2, 2, 2, IGN]], dtype=torch.int64
)
PRED = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 2], [2, 0, 0, 1], [2, 2, 1, 2]], dtype=torch.int64)
MATRIX = [[3, 1, 0], [0, 3, 1], [1, 1, 3]]
IOU = [Fraction(3, 5), Fraction(3, 6), Fraction(3, 6)]
ACC = [Fraction(3, 4), Fraction(3, 4), Fraction(3, 5)]
MIOU = sum(IOU) / 3  # 8/15
MEAN_ACC = sum(ACC) / 3  # 7/10
PIXEL_ACC = Fraction(9, 13)


def approx(x: Fraction) -> object:
    return pytest.approx(float(x), rel=1e-12, abs=0)


def example(num_classes: int = 3) -> ConfusionMatrix:
    cm = ConfusionMatrix(num_classes, ignore_index=IGN)
    cm.update(PRED[None], TARGET[None])
    return cm


def test_hand_computed_example() -> None:
    m = example().compute()
    assert m.matrix == MATRIX
    assert m.pixels == 13
    assert m.iou == [approx(v) for v in IOU]
    assert m.class_acc == [approx(v) for v in ACC]
    assert (Fraction(8, 15), Fraction(7, 10)) == (MIOU, MEAN_ACC)
    assert m.miou == approx(MIOU)
    assert m.mean_acc == approx(MEAN_ACC)
    assert m.pixel_acc == approx(PIXEL_ACC)
    assert m.gt_pixels == [4, 4, 5]
    assert m.pred_pixels == [4, 5, 4]


def test_ignored_pixels_do_not_count() -> None:
    other = PRED.clone()
    other[TARGET == IGN] = torch.tensor([2, 0, 1])  # different predictions there
    cm = ConfusionMatrix(3)
    cm.update(other[None], TARGET[None])
    assert cm.compute().matrix == MATRIX

    empty = ConfusionMatrix(3)
    empty.update(PRED[None], torch.full_like(TARGET, IGN)[None])
    m = empty.compute()
    assert m.pixels == 0
    assert all(math.isnan(v) for v in (*m.iou, m.miou, m.pixel_acc, m.mean_acc))


def test_class_absent_from_gt_and_pred_is_nan_and_excluded() -> None:
    m = example(num_classes=4).compute()
    assert m.matrix == [[*row, 0] for row in MATRIX] + [[0, 0, 0, 0]]
    assert math.isnan(m.iou[3]) and math.isnan(m.class_acc[3])
    assert m.miou == approx(MIOU)
    assert m.mean_acc == approx(MEAN_ACC)
    assert m.pixel_acc == approx(PIXEL_ACC)


def test_class_predicted_but_not_in_gt_counts_as_zero_iou() -> None:
    # One pixel of class 0 predicted as class 1, which has no ground truth.
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([[0, 1]]), torch.tensor([[0, 0]]))
    m = cm.compute()
    assert m.iou == [approx(Fraction(1, 2)), 0.0]
    assert m.miou == approx(Fraction(1, 4))  # zero IoU is included in the mean
    assert m.class_acc[0] == approx(Fraction(1, 2)) and math.isnan(m.class_acc[1])
    assert m.mean_acc == approx(Fraction(1, 2))  # NaN accuracy is not


def test_matches_naive_count_on_random_data() -> None:
    g = torch.Generator().manual_seed(0)
    k = 5
    target = torch.randint(0, k, (2, 7, 9), generator=g)
    target[torch.rand(target.shape, generator=g) < 0.2] = IGN
    pred = torch.randint(0, k, (2, 7, 9), generator=g)
    naive = [[0] * k for _ in range(k)]
    for t, p in zip(target.flatten().tolist(), pred.flatten().tolist(), strict=True):
        if t != IGN:
            naive[t][p] += 1
    cm = ConfusionMatrix(k)
    cm.update(pred, target)
    assert cm.compute().matrix == naive


def test_narrow_integer_dtypes_do_not_overflow() -> None:
    # target * K + pred would wrap in uint8 (19 * 20 + 19 = 399).
    cm = ConfusionMatrix(20)
    cm.update(
        torch.tensor([[19, 0]], dtype=torch.uint8), torch.tensor([[19, 255]], dtype=torch.uint8)
    )
    m = cm.compute()
    assert m.pixels == 1 and m.matrix[19][19] == 1


def test_out_of_range_target_raises_with_values() -> None:
    cm = ConfusionMatrix(3)
    target = TARGET.clone()
    target[0, 0] = 7
    target[0, 1] = -1
    with pytest.raises(ValueError, match=r"\[-1, 7\]"):
        cm.update(PRED[None], target[None])
    assert cm.compute().pixels == 0  # nothing was half-added


def test_out_of_range_pred_raises() -> None:
    cm = ConfusionMatrix(3)
    pred = PRED.clone()
    pred[0, 0] = 3
    with pytest.raises(ValueError, match=r"pred has values \[3\]"):
        cm.update(pred[None], TARGET[None])


def test_shape_mismatch_and_dtype_errors() -> None:
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match=r"\(1, 4, 4\).*\(4, 4\)"):
        cm.update(PRED[None], TARGET)
    with pytest.raises(TypeError, match="integer"):
        cm.update(PRED.float(), TARGET)
    with pytest.raises(ValueError, match="ignore_index"):
        ConfusionMatrix(3, ignore_index=1)


def test_merge_equals_single_update_and_reset() -> None:
    g = torch.Generator().manual_seed(1)
    preds = [torch.randint(0, 4, (2, 5, 5), generator=g) for _ in range(3)]
    targets = [torch.randint(0, 4, (2, 5, 5), generator=g) for _ in range(3)]
    whole = ConfusionMatrix(4)
    whole.update(torch.cat(preds), torch.cat(targets))
    merged = ConfusionMatrix(4)
    for p, t in zip(preds, targets, strict=True):
        part = ConfusionMatrix(4)
        part.update(p, t)
        assert merged.merge(part) is merged
    sequential = ConfusionMatrix(4)
    for p, t in zip(preds, targets, strict=True):
        sequential.update(p, t)
    assert torch.equal(whole.mat, merged.mat) and torch.equal(whole.mat, sequential.mat)
    assert whole.compute() == sequential.compute()
    with pytest.raises(ValueError, match="classes"):
        merged.merge(ConfusionMatrix(5))
    merged.reset()
    assert merged.compute().pixels == 0


def test_all_reduce_without_process_group_is_noop() -> None:
    cm = example()
    cm.all_reduce()
    assert cm.compute().matrix == MATRIX


def test_all_reduce_single_rank_gloo(tmp_path) -> None:
    dist = torch.distributed
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("torch.distributed unavailable or already initialised")
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        cm = example()
        cm.all_reduce()
        assert cm.compute().matrix == MATRIX
    finally:
        dist.destroy_process_group()


def test_to_dict_is_json_friendly() -> None:
    d = example(num_classes=4).compute().to_dict(["sky", "road", "car", "boat"])
    text = json.dumps(d, allow_nan=False)  # raises if a NaN slipped through
    back = json.loads(text)
    assert back["classes"]["boat"] == {"iou": None, "acc": None, "gt_pixels": 0, "pred_pixels": 0}
    assert back["classes"]["sky"]["iou"] == approx(Fraction(3, 5))
    assert back["miou"] == approx(MIOU)
    assert back["pixels"] == 13
    with pytest.raises(ValueError, match="class names"):
        example().compute().to_dict(["a", "b"])


def test_format_table_single() -> None:
    m = example(num_classes=4).compute()
    text = format_table(m, ["sky", "road", "car", "boat"], title="val")
    lines = text.splitlines()
    assert lines[0] == "val"
    for name in ("sky", "road", "car", "boat", "mIoU", "pixel acc", "mean acc"):
        assert name in text
    assert "60.00" in text and "50.00" in text  # IoU of sky, road/car
    assert "75.00" in text  # accuracy of sky and road
    assert "53.33" in text  # mIoU = 8/15
    assert "69.23" in text  # pixel acc = 9/13
    assert "70.00" in text  # mean acc = 7/10
    boat = next(line for line in lines if line.startswith("boat"))
    assert boat.split()[1:] == ["—", "—"]
    header = lines[1]
    sky = next(line for line in lines if line.startswith("sky"))
    assert len(sky) == len(header)  # numbers right-aligned under their headers


def test_format_table_side_by_side() -> None:
    a = example().compute()
    cm = ConfusionMatrix(3)
    cm.update(TARGET.clamp(max=2)[None], TARGET[None])  # perfect prediction
    b = cm.compute()
    text = format_table({"member0": a, "member1": a, "fused": b}, ["sky", "road", "car"])
    lines = text.splitlines()
    assert lines[0].split()[-3:] == ["member0", "member1", "fused"]
    miou = next(line for line in lines if line.startswith("mIoU"))
    assert miou.split()[1:] == ["53.33", "53.33", "100.00"]
    with pytest.raises(ValueError, match="different numbers of classes"):
        format_table({"a": a, "b": example(num_classes=4).compute()})


def test_format_table_default_names() -> None:
    text = format_table(example().compute())
    assert "class0" in text and "class2" in text
    assert isinstance(example().compute(), SegMetrics)
