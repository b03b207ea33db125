"""Cityscapes, VOC (+SBD) and folder data sets on tiny trees in their official layouts."""

from __future__ import annotations

import glob
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from coopseg.cli import main
from coopseg.config import config_from_dict
from coopseg.data import DataError, build_dataset
from coopseg.data.cityscapes import (
    Cityscapes,
    class_names,
    label_to_train_id_table,
    prepare_cityscapes,
    to_train_ids,
    train_to_label_id_table,
    write_cityscapes_predictions,
)
from coopseg.data.folder import FolderDataset, load_classes, ratio_split
from coopseg.data.voc import PALETTE, VOCSegmentation, train_aug_ids
from coopseg.engine.metrics import ConfusionMatrix

H, W = 32, 64
# label ids drawn into the fake ground truth: evaluated classes and ignored ids
# (0 unlabeled, 1 ego vehicle, 4 static, 9 parking, 14 guard rail, 29 caravan)
GT_IDS = np.array([0, 1, 4, 9, 14, 29, 7, 8, 11, 17, 21, 23, 24, 26, 33], dtype=np.uint8)
CITIES = {"train": ["aachen", "bremen"], "val": ["frankfurt", "lindau"]}


def _rgb(rng: np.random.Generator, h: int = H, w: int = W) -> np.ndarray:
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path) if mode else Image.fromarray(array).save(path)
    return path


def make_cityscapes(root: Path, per_city: int = 2, seed: int = 0) -> Path:
    """``leftImg8bit`` + ``gtFine`` label-id PNGs, 64x32, blocky labels with ignored ids."""
    rng = np.random.default_rng(seed)
    for split, cities in CITIES.items():
        for city in cities:
            for k in range(per_city):
                stem = f"{city}_{k:06d}_{19 + k:06d}"
                _save(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", _rgb(rng))
                blocks = rng.choice(GT_IDS, (4, 8))
                labels = np.kron(blocks, np.ones((8, 8), dtype=np.uint8)).astype(np.uint8)
                gt = root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png"
                _save(gt, labels, "L")
    return root


@pytest.fixture
def cityscapes(tmp_path: Path) -> Path:
    return make_cityscapes(tmp_path / "cityscapes")


def _data_cfg(**data):
    model = {"arch": "deeplabv3plus", "backbone": "resnet18", "num_classes": 19}
    return config_from_dict({"model": model, "data": data}).data


# ---------------------------------------------------------------- Cityscapes


def test_lookup_table_is_the_official_one() -> None:
    from cityscapesscripts.helpers.labels import id2label, labels

    lut = label_to_train_id_table()
    assert lut.shape == (256,) and lut.dtype == np.uint8
    for label in labels:
        if label.id >= 0:
            want = label.trainId if 0 <= label.trainId < 255 else 255
            assert lut[label.id] == want, label.name
    assert (lut[34:] == 255).all()
    names = class_names()
    assert len(names) == 19 and names[0] == "road" and names[18] == "bicycle"
    assert [id2label[i].trainId for i in (7, 26, 33)] == [0, 13, 18]
    # vectorised mapping of a whole image equals the per-pixel table lookup
    ids = np.array([[7, 0, 26], [33, 9, 24]], dtype=np.uint8)
    assert to_train_ids(ids).tolist() == [[0, 255, 13], [18, 255, 11]]


def test_cityscapes_loader_maps_ids_and_names_unknown_ones(cityscapes: Path) -> None:
    data = Cityscapes(cityscapes, "train")
    assert len(data) == 4 and data.num_classes == 19
    assert data.sample_name(0) == "aachen_000000_000019"
    image, mask = data.load(0)
    assert image.shape == (H, W, 3) and image.dtype == np.uint8
    raw = np.asarray(Image.open(data.masks[0]))
    assert np.array_equal(mask, label_to_train_id_table()[raw])
    assert (raw == 0).any() and (mask == 255).any()
    x, y = data[0]
    assert x.shape == (3, H, W) and set(y.unique().tolist()) <= set(range(19)) | {255}

    bad = data.masks[1]
    labels = np.asarray(Image.open(bad)).copy()
    labels[0, 0] = 40  # not a Cityscapes label id
    _save(bad, labels, "L")
    with pytest.raises(DataError, match=rf"{bad.name}: label ids \[40\] are not in the Cityscapes"):
        data.load(1)


def test_prepare_writes_train_id_files_used_by_the_loader(cityscapes: Path, capsys) -> None:
    before = [Cityscapes(cityscapes, s).load(i)[1] for s in ("train", "val") for i in range(4)]
    assert main(["data", "prepare", "cityscapes", str(cityscapes)]) == 0
    assert "wrote 8 " in capsys.readouterr().out
    cached = sorted(cityscapes.glob("gtFine/*/*/*_gtFine_labelTrainIds.png"))
    assert len(cached) == 8 and not list(cityscapes.glob("gtFine/*/*/.*.tmp"))
    data = Cityscapes(cityscapes, "train")
    assert data.masks[0].name.endswith("_gtFine_labelTrainIds.png") and not any(data.mapped)
    after = [Cityscapes(cityscapes, s).load(i)[1] for s in ("train", "val") for i in range(4)]
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    assert prepare_cityscapes(cityscapes) == (0, 8)  # up to date: skipped
    assert prepare_cityscapes(cityscapes, force=True) == (8, 0)


def test_missing_label_is_refused_when_the_dataset_is_built(cityscapes: Path) -> None:
    gone = next(cityscapes.glob("gtFine/train/bremen/*_labelIds.png"))
    gone.unlink()
    cfg = _data_cfg(dataset="cityscapes", root=str(cityscapes))
    with pytest.raises(DataError, match=rf"(?s)1 problem.*{gone.name}: not found"):
        build_dataset(cfg, "train")
    assert len(build_dataset(cfg, "val")) == 4  # the val split is intact


def test_val_images_are_full_size_and_train_is_cropped(cityscapes: Path) -> None:
    cfg = _data_cfg(dataset="cityscapes", root=str(cityscapes), crop_size=[16, 24])
    x, y = build_dataset(cfg, "val")[0]
    assert x.shape == (3, H, W) and y.shape == (H, W)
    x, y = build_dataset(cfg, "train")[0]
    assert x.shape == (3, 16, 24) and y.shape == (16, 24)


def test_root_precedence(cityscapes: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("CITYSCAPES_DATASET", raising=False)
    monkeypatch.delenv("COOPSEG_DATA_ROOT", raising=False)
    cfg = _data_cfg(dataset="cityscapes")
    with pytest.raises(DataError, match=r"data.root is not set.*CITYSCAPES_DATASET"):
        build_dataset(cfg, "val")
    monkeypatch.setenv("COOPSEG_DATA_ROOT", str(cityscapes.parent))  # .../cityscapes
    assert build_dataset(cfg, "val").root == cityscapes
    monkeypatch.setenv("COOPSEG_DATA_ROOT", str(cityscapes))  # no cityscapes/ inside: itself
    assert build_dataset(cfg, "val").root == cityscapes
    other = make_cityscapes(tmp_path / "elsewhere", per_city=1)
    monkeypatch.setenv("CITYSCAPES_DATASET", str(other))
    assert len(build_dataset(cfg, "val")) == 2  # the data set's own variable wins
    cfg.root = str(cityscapes)
    assert len(build_dataset(cfg, "val")) == 4  # data.root wins over both


def _official_eval(cityscapes: Path, predictions: Path) -> dict:
    """Run cityscapesscripts' pixel-level evaluator in-process on the val split."""
    import cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling as ev

    args = ev.CArgs()
    for key, value in vars(ev.args).items():
        setattr(args, key, value)
    args.cityscapesPath = str(cityscapes)
    args.predictionPath = str(predictions)
    args.predictionWalk = None
    args.groundTruthSearch = str(cityscapes / "gtFine" / "val" / "*" / "*_gtFine_labelIds.png")
    args.evalInstLevelScore = False  # no *_instanceIds.png files needed
    args.evalPixelAccuracy = False
    args.JSONOutput = False
    args.quiet = True
    args.colorized = False
    gts = sorted(Path(p) for p in glob.glob(args.groundTruthSearch))
    preds = [ev.getPrediction(args, str(gt)) for gt in gts]
    return ev.evaluateImgLists(preds, [str(g) for g in gts], args)


def test_official_evaluator_agrees_with_our_miou(cityscapes: Path, tmp_path: Path) -> None:
    data = Cityscapes(cityscapes, "val")
    rng = np.random.default_rng(1)
    cm = ConfusionMatrix(19)
    out = tmp_path / "results"
    preds = []
    for i in range(len(data)):
        _, gt = data.load(i)
        # mostly right, with noise: a prediction that scores neither 0 nor 1
        pred = np.where(rng.random(gt.shape) < 0.6, gt, rng.integers(0, 19, gt.shape))
        pred = np.where(gt == 255, rng.integers(0, 19, gt.shape), pred).astype(np.uint8)
        cm.update(torch.from_numpy(pred).long(), torch.from_numpy(gt).long())
        preds.append((data.images[i], pred))
    written = write_cityscapes_predictions(preds, out)
    assert written[0].name == "frankfurt_000000_000019_pred_labelIds.png"
    assert Image.open(written[0]).mode == "L"
    ours = cm.compute()
    official = _official_eval(cityscapes, out)
    assert 0.05 < ours.miou < 0.95
    assert official["averageScoreClasses"] == pytest.approx(ours.miou, abs=1e-12)
    for trainid, name in enumerate(class_names()):
        theirs, mine = official["classScores"][name], ours.iou[trainid]
        assert (np.isnan(theirs) and np.isnan(mine)) or theirs == pytest.approx(mine)


# ---------------------------------------------------------------- VOC + SBD

VOC_TRAIN, VOC_VAL = ["2007_000032", "2007_000039", "2007_000063"], ["2007_000033", "2007_000042"]
SBD_TRAIN = ["2007_000039", "2007_000033", "2008_000002", "2008_000003"]
SBD_VAL = ["2007_000042", "2008_000007", "2008_000009"]


def make_voc(root: Path, sbd: bool = True, seed: int = 0) -> Path:
    """VOCdevkit/VOC2012 with palette masks (val images of two sizes) and an SBD tree."""
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    voc = root / "VOCdevkit" / "VOC2012"
    lists = voc / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (lists / "train.txt").write_text("\n".join(VOC_TRAIN) + "\n")
    (lists / "val.txt").write_text("\n".join(VOC_VAL) + "\n")
    ids = sorted(set(VOC_TRAIN + VOC_VAL + SBD_TRAIN + SBD_VAL))
    for k, sample in enumerate(ids):
        h, w = (H, W) if k % 3 == 0 else (40, 48)
        _save(voc / "JPEGImages" / f"{sample}.jpg", _rgb(rng, h, w))
        mask = rng.integers(0, 21, (h, w)).astype(np.uint8)
        if sample in VOC_TRAIN + VOC_VAL:
            mask[0, :] = 255  # the boundary band
            img = Image.fromarray(mask, "P")
            img.putpalette(_full_palette())
            (voc / "SegmentationClass").mkdir(exist_ok=True)
            img.save(voc / "SegmentationClass" / f"{sample}.png")
        if sbd and sample in SBD_TRAIN + SBD_VAL:
            cls = root / "benchmark_RELEASE" / "dataset" / "cls"
            cls.mkdir(parents=True, exist_ok=True)
            seg = np.full((h, w), 7 if sample in VOC_TRAIN else 3, dtype=np.uint8)
            seg[:2, :2] = 15
            savemat(cls / f"{sample}.mat", {"GTcls": {"Segmentation": seg, "Boundaries": 0}})
    if sbd:
        dataset = root / "benchmark_RELEASE" / "dataset"
        (dataset / "train.txt").write_text("\n".join(SBD_TRAIN) + "\n")
        (dataset / "val.txt").write_text("\n".join(SBD_VAL) + "\n")
    return root


def _full_palette() -> list[int]:
    from coopseg.data.fashionscenes import _voc_palette

    return _voc_palette(256).ravel().tolist()


def test_train_aug_arithmetic_on_hand_picked_ids(tmp_path: Path) -> None:
    # (VOC train ∪ SBD train ∪ SBD val) − VOC val: 2007_000033 and _000042 are in SBD
    # but are VOC val images, so they must not be trained on.
    want = ["2007_000032", "2007_000039", "2007_000063"]
    want += ["2008_000002", "2008_000003", "2008_000007", "2008_000009"]
    assert train_aug_ids(VOC_TRAIN, VOC_VAL, SBD_TRAIN, SBD_VAL) == want
    root = make_voc(tmp_path)
    data = VOCSegmentation(root, "train_aug")
    assert [p.stem for p in data.images] == want
    sources = {p.stem: p.suffix for p in data.masks}
    assert sources["2007_000039"] == ".png"  # in VOC train and SBD train: VOC mask wins
    assert sources["2008_000002"] == ".mat"
    index = [p.stem for p in data.images].index("2008_000002")
    image, mask = data.load(index)
    assert mask.shape == image.shape[:2] and mask[0, 0] == 15 and mask[5, 5] == 3
    # a ready SegmentationClassAug mask is preferred over the .mat
    aug = root / "VOCdevkit" / "VOC2012" / "SegmentationClassAug"
    _save(aug / "2008_000002.png", np.full(image.shape[:2], 9, dtype=np.uint8), "L")
    data = VOCSegmentation(root, "train_aug")
    assert int(np.unique(data.load(index)[1])[0]) == 9
    # without SBD, train_aug cannot be built, and the error says what to set
    with pytest.raises(DataError, match=r"train_aug.txt: not found.*data.voc_sbd_root"):
        VOCSegmentation(make_voc(tmp_path / "nosbd", sbd=False), "train_aug")


def test_voc_palette_masks_read_as_indices_and_val_sizes_vary(tmp_path: Path) -> None:
    root = make_voc(tmp_path)
    assert PALETTE[1].tolist() == [128, 0, 0] and PALETTE[15].tolist() == [192, 128, 128]
    data = VOCSegmentation(root / "VOCdevkit", "train")  # VOCdevkit itself works too
    _, mask = data.load(0)
    assert Image.open(data.masks[0]).mode == "P"
    assert set(np.unique(mask).tolist()) <= set(range(21)) | {255} and (mask[0] == 255).all()
    assert len(np.unique(mask)) > 5  # indices, not a handful of RGB-derived values
    cfg = _data_cfg(dataset="voc", root=str(root), crop_size=[16, 16])
    val = build_dataset(cfg, "val")
    sizes = {tuple(val[i][0].shape) for i in range(len(val))}
    assert sizes == {(3, H, W), (3, 40, 48)}
    # a mask someone converted to RGB is refused, naming the file
    rgb_mask = data.masks[1]
    Image.open(rgb_mask).convert("RGB").save(rgb_mask)
    with pytest.raises(DataError, match=rf"{rgb_mask.name}: mask must be a one-channel.*mode RGB"):
        data.load(1)


def test_sbd_root_can_be_given_explicitly(tmp_path: Path) -> None:
    root = make_voc(tmp_path / "a")
    moved = tmp_path / "sbd" / "benchmark_RELEASE"
    moved.parent.mkdir()
    (root / "benchmark_RELEASE").rename(moved)
    data = VOCSegmentation(root, "train_aug", sbd_root=moved)
    assert len(data) == 7
    with pytest.raises(DataError, match="data.voc_sbd_root has no SBD cls/ folder"):
        VOCSegmentation(root, "train_aug", sbd_root=tmp_path)


# ---------------------------------------------------------------- folder

COLOURS = {"background": [0, 0, 0], "crack": [255, 0, 0], "rust": [0, 255, 0]}


def make_folder(root: Path, n: int = 6, colour: bool = True, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    table = {**COLOURS, "ignore": [255, 255, 255]} if colour else list(COLOURS)
    root.mkdir(parents=True)
    (root / "classes.yaml").write_text(json.dumps(table))
    palette = np.array([*COLOURS.values(), [255, 255, 255]], dtype=np.uint8)
    for k in range(n):
        _save(root / "images" / f"img{k}.jpg", _rgb(rng))
        index = rng.integers(0, 4, (H, W)).astype(np.uint8)  # 3 = ignore
        if colour:
            _save(root / "masks" / f"img{k}.png", palette[index])
        else:
            _save(root / "masks" / f"img{k}.png", np.where(index == 3, 255, index), "L")
    return root


def test_folder_colour_masks_decode_through_the_class_file(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "f")
    data = FolderDataset(root, "train", val_ratio=0.34)
    assert data.class_names == ("background", "crack", "rust")
    _, mask = data.load(0)
    rgb = np.asarray(Image.open(data.masks[0]).convert("RGB"))
    assert (mask[(rgb == [255, 0, 0]).all(-1)] == 1).all()
    assert (mask[(rgb == [255, 255, 255]).all(-1)] == 255).all()
    assert set(np.unique(mask).tolist()) == {0, 1, 2, 255}
    # an unknown colour names the file and the colour
    bad = rgb.copy()
    bad[3, 3] = [9, 9, 9]
    _save(data.masks[0], bad)
    with pytest.raises(DataError, match=rf"{data.masks[0].name}: mask colours \[\[9, 9, 9\]\]"):
        data.load(0)


def test_folder_index_masks_and_name_list(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "f", colour=False)
    assert load_classes(root / "classes.yaml").has_colours is False
    data = FolderDataset(root, "val", val_ratio=0.34)
    _, mask = data.load(0)
    assert set(np.unique(mask).tolist()) <= {0, 1, 2, 255} and len(data) == 2


def test_ratio_split_is_deterministic_disjoint_and_complete() -> None:
    stems = [f"s{i}" for i in range(20)]
    a = ratio_split(stems, 0.25, seed=3)
    assert a == ratio_split(list(reversed(stems)), 0.25, seed=3)  # order-independent
    assert len(a["val"]) == 5 and sorted(a["train"] + a["val"]) == sorted(stems)
    assert a != ratio_split(stems, 0.25, seed=4)
    assert len(ratio_split(["x", "y"], 0.1, 0)["val"]) == 1  # never an empty val split


def test_folder_split_lists_and_unmatched_files_by_name(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "f")
    (root / "splits").mkdir()
    (root / "splits" / "train.txt").write_text("img0\nimg1\nimg2\n")
    (root / "splits" / "val.txt").write_text("img4\nimg5\n")
    assert [p.stem for p in FolderDataset(root, "val").images] == ["img4", "img5"]
    (root / "masks" / "img5.png").rename(root / "masks" / "img5_typo.png")
    with pytest.raises(DataError) as err:
        FolderDataset(root, "train")
    text = str(err.value)
    assert "img5.jpg: no mask img5.png" in text and "img5_typo.png: no image img5_typo" in text


def test_training_refuses_a_broken_folder_and_names_the_file(tmp_path: Path, capsys) -> None:
    root = make_folder(tmp_path / "f")
    (root / "masks" / "img2.png").unlink()
    config = tmp_path / "cfg.yaml"
    model = {"arch": "deeplabv3plus", "backbone": "resnet18", "num_classes": 3}
    raw = {"model": model, "out_dir": str(tmp_path / "runs"), "device": "cpu"}
    raw["data"] = {"dataset": "folder", "root": str(root)}
    config.write_text(json.dumps(raw))
    assert main(["train", str(config)]) == 2
    assert "img2.jpg: no mask img2.png" in capsys.readouterr().err


# ---------------------------------------------------------------- coopseg eval --save-predictions


def _checkpoint(root: Path, out: Path, dataset: str, classes: int) -> Path:
    """An untrained tiny model saved as a checkpoint: eval only needs some predictions."""
    from coopseg.config import model_kwargs
    from coopseg.engine.checkpoint import save_weights
    from coopseg.models import create_model

    from .conftest import tiny_config

    cfg = tiny_config(
        root,
        out,
        name=dataset,
        model={"num_classes": classes},
        data={"dataset": dataset, "val_ratio": 0.34},
    )
    torch.manual_seed(0)
    arch, kwargs = model_kwargs(cfg.model)
    path = out / "model.safetensors"
    save_weights(path, create_model(arch, **kwargs), cfg)
    return path


def test_eval_saves_official_cityscapes_predictions(cityscapes: Path, tmp_path: Path) -> None:
    ckpt = _checkpoint(cityscapes, tmp_path / "runs", "cityscapes", 19)
    out, metrics = tmp_path / "pred", tmp_path / "eval.json"
    args = ["eval", "--checkpoint", str(ckpt), "--json", str(metrics)]
    assert main([*args, "--save-predictions", str(out)]) == 0
    files = sorted(p.name for p in out.iterdir())
    assert files == [
        f"{city}_{k:06d}_{19 + k:06d}_pred_labelIds.png" for city in CITIES["val"] for k in range(2)
    ]
    ids = np.unique(np.concatenate([np.asarray(Image.open(out / f)).ravel() for f in files]))
    assert set(ids.tolist()) <= set(train_to_label_id_table()[:19].tolist())
    official = _official_eval(cityscapes, out)  # what the benchmark would report
    ours = json.loads(metrics.read_text())
    assert official["averageScoreClasses"] == pytest.approx(ours["miou"], abs=1e-9)


def test_eval_saves_palette_predictions_named_by_stem(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "f", n=6)
    ckpt = _checkpoint(root, tmp_path / "runs", "folder", 3)
    out = tmp_path / "pred"
    assert main(["eval", "--checkpoint", str(ckpt), "--save-predictions", str(out)]) == 0
    val = FolderDataset(root, "val", val_ratio=0.34)
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{p.stem}.png" for p in val.images)
    saved = Image.open(out / f"{val.images[0].stem}.png")
    assert saved.mode == "P" and saved.size == (W, H)
    assert saved.getpalette()[3:6] == [255, 0, 0]  # the class file's colour of class 1
    assert np.asarray(saved).max() < 3
