"""FashionScenes: IDX reader, scene builder, cache and dataset class.

Most tests use tiny hand-written IDX files whose train and test halves are told apart by
their labels (train 0..4, test 5..9), so the split rule is checkable and builds take
milliseconds; the real Debian files are used where present.
"""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from coopseg.data import fashionscenes as fs
from coopseg.data.base import IGNORE_INDEX, DataError
from coopseg.data.fashion_mnist import (
    ALL_FILES,
    DEFAULT_SOURCE,
    load_fashion_mnist,
    read_idx,
)
from coopseg.data.fashionscenes import (
    CLASS_NAMES,
    PALETTE,
    FashionScenes,
    build_fashionscenes,
    default_root,
    render_scene,
)

REAL_FILES = all((DEFAULT_SOURCE / name).is_file() for name in ALL_FILES)
TINY = {"size": 64, "train": 40, "val": 10}


def write_idx(path: Path, array: np.ndarray, type_code: int = 0x08, gz: bool = True) -> Path:
    dtype = {0x08: ">u1", 0x0C: ">i4"}[type_code]
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(dtype).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def fake_object(label: int) -> np.ndarray:
    """A uniform 20x20 square: after resizing, its labelled pixels must form a square."""
    img = np.zeros((28, 28), dtype=np.uint8)
    img[4:24, 4:24] = 200 + 5 * label
    return img


def write_fake_source(folder: Path, n_train: int = 30, n_test: int = 20) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    train_labels = np.arange(n_train, dtype=np.uint8) % 5  # classes 1..5 only
    test_labels = 5 + np.arange(n_test, dtype=np.uint8) % 5  # classes 6..10 only
    for prefix, labels in (("train", train_labels), ("t10k", test_labels)):
        images = np.stack([fake_object(int(lab)) for lab in labels])
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return folder


@pytest.fixture(scope="module")
def fake_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fake_source(tmp_path_factory.mktemp("fashion-src"))


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, fake_source: Path) -> Path:
    root = tmp_path_factory.mktemp("scenes") / "s"
    return build_fashionscenes(root, **TINY, seed=0, source=fake_source)


def load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


# --- IDX reader --------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_parses_header_and_payload(tmp_path: Path, gz: bool) -> None:
    data = np.arange(6, dtype=np.uint8).reshape(2, 3)
    assert np.array_equal(read_idx(write_idx(tmp_path / "a.idx", data, gz=gz)), data)
    big = np.array([1, -2, 70000], dtype=np.int32)
    out = read_idx(write_idx(tmp_path / "b.idx", big, type_code=0x0C, gz=gz))
    assert out.dtype == np.int32 and out.dtype.isnative
    assert out.tolist() == [1, -2, 70000]


def test_read_idx_corrupt_files_name_the_file(tmp_path: Path) -> None:
    good = write_idx(tmp_path / "good.gz", np.zeros((3, 4, 4), dtype=np.uint8), gz=False)
    short = tmp_path / "short-images.idx"
    short.write_bytes(good.read_bytes()[:-5])
    bad_magic = tmp_path / "bad-magic.idx"
    bad_magic.write_bytes(b"\x01\x02\x08\x01" + good.read_bytes()[4:])
    broken_gz = tmp_path / "broken.gz"
    broken_gz.write_bytes(gzip.compress(good.read_bytes())[:-12])
    for path, words in (
        (short, "truncated"),
        (bad_magic, "magic"),
        (broken_gz, "corrupt"),
    ):
        with pytest.raises(DataError, match=words) as info:
            read_idx(path)
        assert str(path) in str(info.value)


def test_load_fashion_mnist_checks_images_against_labels(tmp_path: Path) -> None:
    src = write_fake_source(tmp_path / "src", n_train=7, n_test=3)
    images, labels = load_fashion_mnist(src, "test")
    assert images.shape == (3, 28, 28) and images.dtype == np.uint8
    assert labels.dtype == np.uint8 and labels.tolist() == [5, 6, 7]
    write_idx(src / "t10k-labels-idx1-ubyte.gz", np.zeros(4, dtype=np.uint8))
    with pytest.raises(DataError, match=r"3 images but .* 4 labels"):
        load_fashion_mnist(src, "test")


def test_missing_source_says_which_files_and_how_to_get_them(tmp_path: Path) -> None:
    src = tmp_path / "half"
    src.mkdir()
    write_idx(src / "train-images-idx3-ubyte.gz", np.zeros((1, 28, 28), dtype=np.uint8))
    with pytest.raises(DataError) as info:
        build_fashionscenes(tmp_path / "out", **TINY, source=src)
    msg = str(info.value)
    assert str(src) in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "--source" in msg
    missing = msg.split("Install")[0]  # the list of files, before the advice
    assert "train-images-idx3-ubyte.gz" not in missing
    for name in ALL_FILES[1:]:
        assert name in missing
    assert not (tmp_path / "out" / "meta.json").exists()


@pytest.mark.skipif(not REAL_FILES, reason="dataset-fashion-mnist is not installed")
def test_real_debian_files() -> None:
    images, labels = load_fashion_mnist(DEFAULT_SOURCE, "test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [1000] * 10


@pytest.mark.skipif(not REAL_FILES, reason="dataset-fashion-mnist is not installed")
def test_tiny_build_from_real_files(tmp_path: Path) -> None:
    root = build_fashionscenes(tmp_path, size=64, train=6, val=4)
    ds = FashionScenes(root, "val")
    assert len(ds) == 4 and int(ds.count.min()) >= 1
    assert json.loads((root / "meta.json").read_text())["source"] == str(DEFAULT_SOURCE)


# --- scenes ------------------------------------------------------------------------------


def test_same_seed_is_byte_identical_and_other_seed_differs(
    tmp_path: Path, fake_source: Path, built: Path
) -> None:
    again = build_fashionscenes(tmp_path / "again", **TINY, seed=0, source=fake_source)
    other = build_fashionscenes(tmp_path / "other", **TINY, seed=1, source=fake_source)
    for split in ("train", "val"):
        a, b = load_npz(built / f"{split}.npz"), load_npz(again / f"{split}.npz")
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].tobytes() == b[key].tobytes(), (split, key)
        c = load_npz(other / f"{split}.npz")
        assert a["images"].tobytes() != c["images"].tobytes()


def test_scene_i_does_not_depend_on_split_size(fake_source: Path, built: Path) -> None:
    images, labels = load_fashion_mnist(fake_source, "train")
    small, _ = fs.build_split(images, labels, 5, TINY["size"], 0, "train")
    full = load_npz(built / "train.npz")
    assert np.array_equal(small["images"], full["images"][:5])
    assert np.array_equal(small["masks"], full["masks"][:5])


def test_train_uses_train_split_and_val_uses_test_split(built: Path) -> None:
    for split, allowed in (("train", {1, 2, 3, 4, 5}), ("val", {6, 7, 8, 9, 10})):
        data = load_npz(built / f"{split}.npz")
        seen = set(np.unique(data["masks"]).tolist()) - {0, IGNORE_INDEX}
        assert seen and seen <= allowed, split
        assert set(data["objects"][data["objects"] > 0].tolist()) <= allowed


def test_label_values_background_and_border_band(built: Path) -> None:
    masks = load_npz(built / "train.npz")["masks"]
    values = set(np.unique(masks).tolist())
    assert values <= set(range(len(CLASS_NAMES))) | {IGNORE_INDEX}
    assert 0 in values and IGNORE_INDEX in values
    objects = (masks >= 1) & (masks < len(CLASS_NAMES))
    ignore = masks == IGNORE_INDEX
    assert ignore.sum() < 0.5 * objects.sum()  # a thin band, not a region
    near = objects.copy()  # object pixels grown by 3 px (4-neighbourhood)
    for _ in range(3):
        grown = near.copy()
        grown[:, 1:] |= near[:, :-1]
        grown[:, :-1] |= near[:, 1:]
        grown[:, :, 1:] |= near[:, :, :-1]
        grown[:, :, :-1] |= near[:, :, 1:]
        near = grown
    assert not (ignore & ~near).any(), "ignore pixels must lie at object borders"


def test_single_object_pixels_carry_its_class() -> None:
    images = np.stack([fake_object(3)] * 4)
    labels = np.full(4, 3, dtype=np.uint8)
    bands = 0
    for seed in range(8):
        scene = render_scene(np.random.default_rng(seed), images, labels, 64, num_objects=1)
        assert scene.objects == (4,)
        assert scene.image.shape == (64, 64, 3) and scene.image.dtype == np.uint8
        assert set(np.unique(scene.mask).tolist()) <= {0, 4, IGNORE_INDEX}
        ys, xs = np.nonzero(scene.mask == 4)
        assert ys.size > 0
        box = scene.mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
        assert np.isin(box, [4, IGNORE_INDEX]).all(), "a square object labels a solid square"
        assert (box == 4).mean() > 0.95  # only corners may soften into the ignore band
        assert abs(box.shape[0] - box.shape[1]) <= 1
        ring = scene.mask[max(ys.min() - 2, 0) : ys.max() + 3, max(xs.min() - 2, 0) : xs.max() + 3]
        assert ((scene.mask == IGNORE_INDEX).sum()) == (ring == IGNORE_INDEX).sum()
        bands += int((scene.mask == IGNORE_INDEX).any())
        inside = scene.image[ys.min() + 2 : ys.max() - 1, xs.min() + 2 : xs.max() - 1]
        assert inside.reshape(-1, 3).std(axis=0).max() < 1, "a uniform object is one flat tint"
    assert bands >= 4, "resized objects get an ignore band at their border"


def test_metadata_matches_masks(built: Path) -> None:
    meta = json.loads((built / "meta.json").read_text())
    assert meta["params"] == {**TINY, "seed": 0} and meta["class_names"] == list(CLASS_NAMES)
    for split in ("train", "val"):
        d = load_npz(built / f"{split}.npz")
        n = TINY[split]
        assert d["images"].shape == (n, 64, 64, 3) and d["masks"].shape == (n, 64, 64)
        assert d["present"].shape == (n, len(CLASS_NAMES))
        for key in ("images", "masks", "objects", "count", "dominant", "present"):
            assert d[key].dtype == np.uint8, key
        assert meta["counts"][split]["scenes"] == n
        for i in range(n):
            hist = np.bincount(d["masks"][i].ravel(), minlength=256)
            assert d["dominant"][i] == 1 + int(hist[1:11].argmax())
            assert d["present"][i].tolist() == (hist[:11] > 0).astype(int).tolist()
            placed = d["objects"][i][d["objects"][i] > 0]
            assert d["count"][i] == placed.size >= 1
            assert set(placed.tolist()) == set(np.nonzero(hist[1:11])[0] + 1), "all visible"
        assert int(d["count"].max()) <= fs.MAX_OBJECTS


# --- cache -------------------------------------------------------------------------------


def test_cache_is_reused_until_forced_or_params_change(
    tmp_path: Path, fake_source: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = build_fashionscenes(tmp_path, **TINY, source=fake_source)
    stamps = {p.name: p.stat().st_mtime_ns for p in root.iterdir()}
    calls: list[str] = []
    real = fs.build_split

    def counting(*args, **kwargs):
        calls.append(args[-1])
        return real(*args, **kwargs)

    monkeypatch.setattr(fs, "build_split", counting)
    assert build_fashionscenes(tmp_path, **TINY, source=fake_source) == root
    assert build_fashionscenes(tmp_path, **TINY) == root  # source=None accepts any source
    assert calls == []
    assert {p.name: p.stat().st_mtime_ns for p in root.iterdir()} == stamps
    build_fashionscenes(tmp_path, **TINY, source=fake_source, force=True)
    assert calls == ["train", "val"]
    build_fashionscenes(tmp_path, **TINY, seed=3, source=fake_source)
    assert calls == ["train", "val"] * 2
    assert json.loads((root / "meta.json").read_text())["params"]["seed"] == 3
    assert sorted(p.name for p in root.iterdir()) == ["meta.json", "train.npz", "val.npz"]


def test_corrupt_cache_is_reported_not_reused(tmp_path: Path, fake_source: Path) -> None:
    root = build_fashionscenes(tmp_path, **TINY, source=fake_source)
    train = root / "train.npz"
    train.write_bytes(train.read_bytes()[: train.stat().st_size // 2])
    with pytest.raises(DataError, match="force") as info:
        build_fashionscenes(tmp_path, **TINY, source=fake_source)
    assert str(train) in str(info.value)
    with pytest.raises(DataError) as info:
        FashionScenes(root, "train")
    assert str(train) in str(info.value)
    build_fashionscenes(tmp_path, **TINY, source=fake_source, force=True)
    assert len(FashionScenes(root, "train")) == TINY["train"]
    (root / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match=r"meta\.json"):
        build_fashionscenes(tmp_path, **TINY, source=fake_source)


def test_interrupted_write_leaves_no_loadable_half_file(
    tmp_path: Path, fake_source: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_savez = np.savez
    calls: list[int] = []

    def dying_savez(file, **arrays):
        calls.append(1)
        if len(calls) == 2:  # train.npz is written, val.npz dies halfway
            file.write(b"PK\x03\x04 half a zip")
            raise RuntimeError("killed")
        real_savez(file, **arrays)

    monkeypatch.setattr(fs.np, "savez", dying_savez)
    with pytest.raises(RuntimeError, match="killed"):
        build_fashionscenes(tmp_path, **TINY, source=fake_source)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.npz"]  # no temp, no meta
    monkeypatch.setattr(fs.np, "savez", real_savez)
    build_fashionscenes(tmp_path, **TINY, source=fake_source)  # no meta: rebuilds
    assert len(FashionScenes(tmp_path, "val")) == TINY["val"]


def test_default_root_follows_coopseg_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COOPSEG_CACHE", str(tmp_path))
    assert default_root(64, 40, 10, 2) == tmp_path / "fashionscenes" / "s64-n40-10-seed2-v1"


# --- dataset -----------------------------------------------------------------------------


def test_dataset_items(built: Path) -> None:
    ds = FashionScenes(built, "train")
    assert len(ds) == TINY["train"] and ds.num_classes == 11
    image, mask = ds[3]
    assert image.dtype == torch.float32 and image.shape == (3, 64, 64)
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    assert mask.dtype == torch.int64 and mask.shape == (64, 64)
    raw_image, raw_mask = ds.load(3)
    assert torch.equal(mask, torch.from_numpy(raw_mask.astype(np.int64)))
    assert raw_image.shape == (64, 64, 3)
    assert ds.describe(17) == f"{built}/train.npz[scene 17]"
    assert ds.dominant.shape == ds.count.shape == (TINY["train"],)
    assert len(FashionScenes(built, "val")) == TINY["val"]


def test_class_names_and_palette() -> None:
    assert len(CLASS_NAMES) == 11 and CLASS_NAMES[0] == "background"
    assert CLASS_NAMES[1] == "T-shirt/top" and CLASS_NAMES[10] == "Ankle boot"
    assert PALETTE.shape == (11, 3) and PALETTE.dtype == np.uint8
    assert PALETTE[0].tolist() == [0, 0, 0]
    assert len({tuple(c) for c in PALETTE.tolist()}) == 11


def test_missing_split_file_tells_how_to_build(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="coopseg data fashionscenes --out") as info:
        FashionScenes(tmp_path, "val")
    assert str(tmp_path / "val.npz") in str(info.value)
