"""``coopseg data check``: every kind of hard error named with its file, and the histograms."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from coopseg.cli import main
from coopseg.config import DataConfig
from coopseg.data.check import check_dataset

from .test_datasets import make_cityscapes, make_folder, make_voc


def _check_json(capsys, *args: str) -> tuple[int, dict]:
    code = main(["data", "check", *args, "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_clean_folder_reports_histograms_and_exits_zero(tmp_path: Path, capsys) -> None:
    root = make_folder(tmp_path / "f", n=5)
    code, report = _check_json(capsys, str(root), "--dataset", "folder", "--val-ratio", "0.4")
    assert code == 0 and report["ok"]
    train, val = report["splits"]
    assert (train["split"], train["samples"], val["samples"]) == ("train", 3, 2)
    # the histogram equals a direct count over the colour masks of all five images
    colours = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0]])
    pixels, images = np.zeros(3, int), np.zeros(3, int)
    for path in sorted((root / "masks").glob("*.png")):
        rgb = np.asarray(Image.open(path).convert("RGB"))
        counts = np.array([(rgb == c).all(-1).sum() for c in colours])
        pixels += counts
        images += counts > 0
    assert (np.add(train["pixels"], val["pixels"]) == pixels).all()
    assert (np.add(train["images"], val["images"]) == images).all()
    assert train["ignore_pixels"] + val["ignore_pixels"] + pixels.sum() == 5 * 32 * 64
    assert train["sizes"] == {"64x32": 3}


def test_each_hard_error_is_named_with_its_file(tmp_path: Path, capsys) -> None:
    root = make_folder(tmp_path / "f", n=7)
    masks, images = root / "masks", root / "images"
    (masks / "img0.png").unlink()  # missing_pair
    raw = (masks / "img1.png").read_bytes()
    (masks / "img1.png").write_bytes(raw[:60])  # unreadable (truncated)
    Image.new("RGB", (32, 32)).save(masks / "img2.png")  # size_mismatch
    bad = np.asarray(Image.open(masks / "img3.png")).copy()
    bad[0, 0] = [1, 2, 3]
    Image.fromarray(bad).save(masks / "img3.png")  # bad_label: colour not in the file
    Image.fromarray(np.zeros((32, 64), np.uint16)).save(masks / "img4.png")  # bad_format
    (images / "img5.jpg").write_bytes(b"not a jpeg")  # unreadable image
    (root / "splits").mkdir()
    stems = [f"img{k}" for k in range(7)] + ["ghost"]
    (root / "splits" / "train.txt").write_text("\n".join(stems))  # bad_list: ghost

    code, report = _check_json(capsys, str(root), "--dataset", "folder", "--split", "train")
    assert code == 1 and not report["ok"]
    (split,) = report["splits"]
    found = {(e["kind"], Path(e["path"].split(" ")[0]).name) for e in split["errors"]}
    assert found == {
        ("missing_pair", "img0.jpg"),
        ("unreadable", "img1.jpg"),
        ("size_mismatch", "img2.jpg"),
        ("bad_label", "img3.jpg"),
        ("bad_format", "img4.jpg"),
        ("unreadable", "img5.jpg"),
        ("bad_list", "train.txt"),
    }
    messages = {e["kind"] + e["message"] for e in split["errors"]}
    assert any("img1.png: cannot read mask" in m for m in messages)
    assert any("img4.png" in m and "mode I;16" in m for m in messages)
    assert any("'ghost' has no files" in m for m in messages)
    assert split["samples"] == 6 and split["images"][0] >= 1  # img6 was read and counted

    assert main(["data", "check", str(root), "--dataset", "folder", "--split", "train"]) == 1
    text = capsys.readouterr().out
    assert "7 hard error(s)" in text and "img2.jpg" in text and "differs from image size" in text


def test_cityscapes_check_names_unknown_label_ids(tmp_path: Path, capsys) -> None:
    root = make_cityscapes(tmp_path / "cs", per_city=1)
    gt = next(root.glob("gtFine/val/lindau/*_labelIds.png"))
    labels = np.asarray(Image.open(gt)).copy()
    labels[:2, :2] = 99
    Image.fromarray(labels, "L").save(gt)
    code, report = _check_json(capsys, str(root), "--dataset", "cityscapes")
    train, val = report["splits"]
    assert code == 1 and train["ok"] and not val["ok"]
    assert len(train["pixels"]) == 19 and train["class_names"][0] == "road"
    assert train["ignore_pixels"] > 0 and sum(train["pixels"]) > 0
    (error,) = val["errors"]
    assert error["kind"] == "bad_label" and f"{gt.name}: label ids [99]" in error["message"]


def test_voc_check_and_an_unopenable_root(tmp_path: Path) -> None:
    root = make_voc(tmp_path / "voc")
    cfg = DataConfig(dataset="voc", root=str(root))
    reports = check_dataset(cfg, ["train", "val", "train_aug"])
    assert [r.samples for r in reports] == [3, 2, 7] and all(r.ok for r in reports)
    assert len(reports[1].sizes) == 2  # VOC val mixes image sizes
    (missing,) = check_dataset(DataConfig(dataset="voc", root=str(tmp_path / "nope")), ["val"])
    assert not missing.ok and "no VOC 2012 folder found" in missing.errors[0].message


def test_a_missing_class_file_is_its_own_kind(tmp_path: Path, capsys) -> None:
    root = make_folder(tmp_path / "f", n=3)
    (root / "classes.yaml").unlink()
    code, report = _check_json(capsys, str(root), "--dataset", "folder", "--split", "train")
    assert code == 1 and not report["ok"]
    (error,) = report["splits"][0]["errors"]
    assert error["kind"] == "missing_class_file"
    assert str(root / "classes.yaml") in error["message"]
    # an explicit --classes-file that does not exist names that file
    gone = tmp_path / "gone.yaml"
    args = [str(root), "--dataset", "folder", "--split", "train", "--classes-file", str(gone)]
    code, report = _check_json(capsys, *args)
    (error,) = report["splits"][0]["errors"]
    assert code == 1 and error["kind"] == "missing_class_file"
    assert f"{gone}: class file not found" in error["message"]
