"""Inference protocols: sliding windows, multi-scale + flip, mixed-size evaluation."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from coopseg.cli import build_parser, main
from coopseg.config import ConfigError, config_from_dict, model_kwargs
from coopseg.data.base import IGNORE_INDEX
from coopseg.engine.checkpoint import save_weights
from coopseg.engine.distributed import init_distributed
from coopseg.engine.evaluate import collate_by_size, evaluate
from coopseg.engine.inference import (
    SlideWindow,
    predict_probs,
    slide_probs,
    slide_window,
    window_starts,
)
from coopseg.engine.metrics import ConfusionMatrix
from coopseg.models import create_model


class ConvModel(nn.Module):
    """Output depends on a ``kernel`` x ``kernel`` neighbourhood only (zero padding)."""

    def __init__(self, classes: int = 4, kernel: int = 3, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, classes, kernel, padding=kernel // 2)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.conv(x)}


class WindowPositionModel(nn.Module):
    """Reads the window's origin from a coordinate image (channel 0: column, 1: row).

    Every pixel of a window gets softmax ``[(x0 + 1), (y0 + 1)] / (x0 + y0 + 2)``,
    so the averaged output shows which windows covered each pixel.
    """

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[int] = []

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.batches.append(x.shape[0])
        x0, y0 = x[:, 0, 0, 0], x[:, 1, 0, 0]
        logits = torch.stack([(x0 + 1).log(), (y0 + 1).log()], 1)
        return {"out": logits[:, :, None, None].expand(-1, -1, *x.shape[-2:])}


def coordinates(batch: int, h: int, w: int) -> torch.Tensor:
    rows = torch.arange(h, dtype=torch.float32)[:, None].expand(h, w)
    cols = torch.arange(w, dtype=torch.float32)[None, :].expand(h, w)
    return torch.stack([cols, rows, torch.zeros(h, w)])[None].repeat(batch, 1, 1, 1)


def test_window_starts_cover_the_side_and_end_at_the_border() -> None:
    assert window_starts(11, 4, 3) == [0, 3, 6, 7]
    assert window_starts(10, 4, 3) == [0, 3, 6]
    assert window_starts(7, 4, 2) == [0, 2, 3]
    assert window_starts(4, 4, 2) == [0]
    assert window_starts(3, 4, 2) == [0]  # smaller than the crop: one padded window


def test_overlapping_windows_are_averaged_by_the_count_map() -> None:
    model = WindowPositionModel()
    images = coordinates(2, 7, 11)
    window = SlideWindow((4, 4), (2, 3), batch=5)
    probs = slide_probs(model, images, window)
    assert probs.shape == (2, 2, 7, 11)
    ys, xs = [0, 2, 3], [0, 3, 6, 7]  # by hand: last windows flush with the border
    expected = torch.zeros(2, 7, 11)
    count = torch.zeros(7, 11)
    for y0 in ys:
        for x0 in xs:
            q = torch.tensor([x0 + 1.0, y0 + 1.0]) / (x0 + y0 + 2)
            expected[:, y0 : y0 + 4, x0 : x0 + 4] += q[:, None, None]
            count[y0 : y0 + 4, x0 : x0 + 4] += 1
    assert count.min() >= 1
    torch.testing.assert_close(probs, (expected / count).expand(2, -1, -1, -1))
    # by hand: (0, 0) is only in window (0, 0); (1, 3) in (0, 0) and (0, 3);
    # (6, 7) in (3, 6) and (3, 7)
    assert probs[0, 0, 0, 0].item() == pytest.approx(0.5)
    assert probs[0, 0, 1, 3].item() == pytest.approx((1 / 2 + 4 / 5) / 2)
    assert probs[1, 0, 6, 7].item() == pytest.approx((7 / 11 + 8 / 12) / 2)
    # 2 images x 12 windows in groups of at most 5, and the grouping changes nothing
    assert model.batches == [5, 5, 5, 5, 4]
    model.batches.clear()
    one_by_one = slide_probs(model, images, SlideWindow((4, 4), (2, 3), batch=1))
    assert model.batches == [1] * 24
    torch.testing.assert_close(one_by_one, probs, rtol=0, atol=0)


def test_pad_region_is_excluded_when_image_is_smaller_than_crop() -> None:
    model = ConvModel(kernel=3)
    images = torch.randn(2, 3, 13, 9)
    with torch.no_grad():
        whole = model(images)["out"].softmax(1)
    for crop in [(13, 9), (16, 12), (20, 9)]:
        window = SlideWindow(crop, crop)
        torch.testing.assert_close(slide_probs(model, images, window), whole)
        torch.testing.assert_close(predict_probs(model, images, slide=window), whole)


def test_sliding_equals_whole_for_a_pointwise_model() -> None:
    model = ConvModel(kernel=1)
    images = torch.randn(2, 3, 19, 23)
    window = SlideWindow.create((8, 8), (5, 3), batch=7)
    with torch.no_grad():
        whole = model(images)["out"].softmax(1)
    torch.testing.assert_close(predict_probs(model, images, slide=window), whole)
    # padded in height, sliding in width
    window = SlideWindow.create((24, 8), (24, 5))
    torch.testing.assert_close(predict_probs(model, images, slide=window), whole)
    flipped = predict_probs(model, images, flip=True, slide=window)
    torch.testing.assert_close(flipped, whole)


def test_sliding_with_multiscale_and_flip_keeps_the_input_size() -> None:
    model = ConvModel(classes=5)
    images = torch.randn(2, 3, 13, 17)
    window = SlideWindow.create((8, 8), (5, 5))
    probs = predict_probs(model, images, scales=[0.5, 1.0, 1.5], flip=True, slide=window)
    assert probs.shape == (2, 5, 13, 17)
    torch.testing.assert_close(probs.sum(1), torch.ones(2, 13, 17))
    assert probs.min() >= 0


def test_default_stride_is_two_thirds_of_the_crop() -> None:
    assert SlideWindow.create((512, 1024)).stride == (341, 683)
    cfg = config_from_dict({"eval": {"mode": "slide"}, "data": {"crop_size": [96, 64]}})
    assert slide_window(cfg.eval, cfg.data.crop_size) == SlideWindow((96, 64), (64, 43), 4)
    assert slide_window(config_from_dict({}).eval, [64, 64]) is None


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"mode": "sliding"}, r"eval.mode: expected one of \['whole', 'slide'.*got 'sliding'"),
        ({"crop_size": [512]}, r"eval.crop_size: expected \[height, width\]"),
        ({"crop_size": [0, 512]}, r"eval.crop_size: expected \[height, width\]"),
        ({"stride": [-1, 4]}, r"eval.stride: expected \[height, width\]"),
        ({"crop_size": [64, 64], "stride": [64, 65]}, r"eval.stride \[64, 65\] is larger"),
        ({"stride": [200, 100]}, r"eval.stride \[200, 100\] is larger .* data.crop_size"),
        ({"window_batch": 0}, r"eval.window_batch: expected >= 1, got 0"),
        ({"strides": [8, 8]}, r"unknown config key eval.strides"),
    ],
)
def test_invalid_eval_keys_are_named(section, message) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"eval": section})


def test_slide_window_checks_its_geometry() -> None:
    with pytest.raises(ConfigError, match="eval.stride"):
        SlideWindow((8, 8), (9, 4))
    with pytest.raises(ConfigError, match="eval.crop_size"):
        SlideWindow((8, 0), (4, 4))


class MixedSizes(Dataset):
    """Images of several sizes in one data set, as in Pascal VOC."""

    sizes = ((20, 24), (20, 24), (16, 30), (20, 24), (33, 17), (16, 30), (9, 9))

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(i)
        h, w = self.sizes[i]
        mask = torch.randint(0, 4, (h, w), generator=g)
        mask[torch.rand(h, w, generator=g) < 0.1] = IGNORE_INDEX
        return torch.randn(3, h, w, generator=g), mask


def test_collate_by_size_keeps_sample_order() -> None:
    data = MixedSizes()
    samples = [data[i] for i in range(len(data))]
    groups = collate_by_size(samples)
    assert [len(images) for images, _ in groups] == [2, 1, 1, 1, 1, 1]
    images = [img for batch, _ in groups for img in batch]
    assert all(torch.equal(a, b) for a, (b, _) in zip(images, samples, strict=True))


@pytest.mark.parametrize("slide", [None, SlideWindow((12, 12), (8, 8), batch=3)])
def test_mixed_sizes_evaluate_like_one_image_at_a_time(slide) -> None:
    model = ConvModel().eval()
    data = MixedSizes()
    reference = ConfusionMatrix(4)
    for i in range(len(data)):
        image, mask = data[i]
        reference.update(predict_probs(model, image[None], slide=slide).argmax(1), mask[None])
    dist = init_distributed("cpu")
    metrics = evaluate(model, data, 4, dist=dist, batch_size=4, slide=slide)
    expected = reference.compute()
    assert metrics.matrix == expected.matrix
    labelled = sum(int((data[i][1] != IGNORE_INDEX).sum()) for i in range(len(data)))
    assert metrics.pixels == labelled


@pytest.fixture(scope="module")
def deeplab() -> nn.Module:
    torch.manual_seed(0)
    return create_model("deeplabv3plus", backbone="resnet18", num_classes=3).eval()


def test_single_scale_without_flip_is_plain_inference(deeplab) -> None:
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = deeplab(x)["out"]
    scores = predict_probs(deeplab, x, scales=[1.0], flip=False)
    assert torch.equal(scores.argmax(1), plain.argmax(1))
    torch.testing.assert_close(scores.softmax(1), plain.softmax(1))
    averaged = predict_probs(deeplab, x, scales=[1.0, 1.0], flip=False)  # the averaging path
    torch.testing.assert_close(averaged, plain.softmax(1))


def test_flip_averaging_of_a_symmetric_input_is_symmetric(deeplab) -> None:
    half = torch.randn(1, 3, 64, 32, generator=torch.Generator().manual_seed(2))
    x = torch.cat([half, half.flip(-1)], -1)
    assert torch.equal(x, x.flip(-1))
    with torch.no_grad():
        plain = deeplab(x)["out"].softmax(1)
    assert not torch.allclose(plain, plain.flip(-1), atol=1e-4)  # the model alone is not
    probs = predict_probs(deeplab, x, flip=True)
    torch.testing.assert_close(probs, probs.flip(-1))
    multi = predict_probs(deeplab, x, scales=[0.75, 1.0], flip=True)
    torch.testing.assert_close(multi, multi.flip(-1), rtol=1e-4, atol=1e-5)
    slid = predict_probs(deeplab, x, flip=True, slide=SlideWindow.create((64, 48), (64, 16)))
    torch.testing.assert_close(slid, slid.flip(-1), rtol=1e-4, atol=1e-5)


def test_cli_slide_flags(make_config, tmp_path, capsys) -> None:
    args = build_parser().parse_args(
        ["predict", "a.png", "--checkpoint", "c", "--out", "o", "--slide", "32", "48"]
    )
    assert args.slide == [32, 48] and args.stride is None
    stray = ["predict", "a.png", "--checkpoint", "c", "--out", "o", "--stride", "8", "8"]
    assert main(stray) == 2
    assert "--stride needs --slide" in capsys.readouterr().err

    cfg = make_config(model={"aspp_channels": 8, "decoder_channels": 8})
    ckpt = tmp_path / "w.safetensors"
    arch, kwargs = model_kwargs(cfg.model)
    save_weights(ckpt, create_model(arch, **kwargs), cfg)
    out = tmp_path / "eval.json"
    argv = ["eval", "--checkpoint", str(ckpt), "--json", str(out), "--slide", "64", "64"]
    assert main([*argv, "--stride", "32", "40"]) == 0  # 64x64 images: one window
    report = json.loads(out.read_text())
    assert (report["mode"], report["crop_size"], report["stride"]) == ("slide", [64, 64], [32, 40])
    assert main([*argv, "--stride", "64", "65"]) == 2
    assert "eval.stride [64, 65] is larger" in capsys.readouterr().err


# -- coopseg predict: backends, output choice, unreadable inputs, output names ------------


def _save_images(folder, sizes: dict[str, tuple[int, int]], seed: int = 0) -> list:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for name, (h, w) in sizes.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def predict_setup(tmp_path_factory):
    """A tiny initialised DeepLabv3+ checkpoint, its dynamic and fixed ONNX graphs, images."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from coopseg.engine.export import export_checkpoint

    from .conftest import TINY_MEMBER

    folder = tmp_path_factory.mktemp("predict")
    cfg = config_from_dict(
        {"model": {**TINY_MEMBER, "num_classes": 11}, "data": {"crop_size": [32, 48]}}
    )
    arch, kwargs = model_kwargs(cfg.model)
    torch.manual_seed(0)
    palette = [[i * 20, 255 - i * 20, 9 * i] for i in range(11)]
    ckpt = folder / "w.safetensors"
    save_weights(ckpt, create_model(arch, **kwargs), cfg, {"palette": palette})
    dynamic, fixed = folder / "dynamic.onnx", folder / "fixed.onnx"
    export_checkpoint(ckpt, dynamic, dynamic=True)
    export_checkpoint(ckpt, fixed)  # 1 x 3 x 32 x 48, the config's crop
    images = _save_images(folder / "images", {"a.png": (37, 91), "b.jpg": (64, 64)})
    return ckpt, dynamic, fixed, images


def _outputs(folder) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.slow
@pytest.mark.parametrize(
    "options", [[], ["--scales", "0.75", "1", "--flip"], ["--slide", "32", "48", "--flip"]]
)
def test_onnxruntime_predicts_the_same_masks_as_pytorch(predict_setup, tmp_path, options) -> None:
    ckpt, dynamic, _, images = predict_setup
    files = [str(p) for p in images]
    torch_out, ort_out = tmp_path / "torch", tmp_path / "ort"
    reference = ["predict", *files, "--checkpoint", str(ckpt), "--out", str(torch_out)]
    assert main([*reference, *options]) == 0
    argv = ["predict", *files, "--backend", "onnxruntime", "--model", str(dynamic)]
    assert main([*argv, "--out", str(ort_out), *options]) == 0
    expected = _outputs(torch_out)
    assert sorted(expected) == ["a_mask.png", "a_overlay.png", "b_mask.png", "b_overlay.png"]
    assert _outputs(ort_out) == expected  # masks and overlays, byte for byte


@pytest.mark.slow
def test_fixed_size_graph_predicts_through_windows_of_its_size(
    predict_setup, tmp_path, capsys
) -> None:
    """A fixed 32x48 graph predicts 37x91 and 64x64 images through 32x48 windows, said
    once, with the masks (and overlays) the PyTorch path writes with --slide 32 48."""
    ckpt, _, fixed, images = predict_setup
    files = [str(p) for p in images]
    ort = ["predict", *files, "--model", str(fixed)]
    reference = ["predict", *files, "--checkpoint", str(ckpt)]
    for options in ([], ["--scales", "0.5", "1"], ["--flip"]):  # 0.5 x 37x91: padded
        assert main([*ort, "--out", str(tmp_path / "ort"), *options]) == 0
        out = capsys.readouterr().out
        assert out.count("sliding windows") == 1  # once, not per image
        assert f"{fixed} is a fixed 32x48 graph" in out and "stride 21x32" in out
        window = ["--slide", "32", "48", *options]
        assert main([*reference, "--out", str(tmp_path / "pt"), *window]) == 0
        assert _outputs(tmp_path / "ort") == _outputs(tmp_path / "pt")
        capsys.readouterr()
    assert main([*ort, "--out", str(tmp_path / "o"), "--slide", "40", "40"]) == 2
    err = capsys.readouterr().err
    assert "--slide 40 40" in err and "takes 32x48 images only" in err and "--dynamic" in err
    explicit = ["--slide", "32", "48", "--stride", "16", "24"]  # the user's own stride
    assert main([*ort, "--out", str(tmp_path / "ort2"), *explicit]) == 0
    assert "sliding windows" not in capsys.readouterr().out
    assert main([*reference, "--out", str(tmp_path / "pt2"), *explicit]) == 0
    assert _outputs(tmp_path / "ort2") == _outputs(tmp_path / "pt2")


def test_predict_output_chooses_a_cooperative_member(make_config, tmp_path, capsys) -> None:
    import numpy as np
    from PIL import Image

    from .conftest import tiny_cooperative

    cfg = make_config(name="coop-out", model=tiny_cooperative("cross"))
    arch, kwargs = model_kwargs(cfg.model)
    torch.manual_seed(0)
    model = create_model(arch, **kwargs).eval()
    ckpt = tmp_path / "pair.safetensors"
    save_weights(ckpt, model, cfg, {"palette": [[i * 20, 0, 0] for i in range(11)]})
    (path,) = _save_images(tmp_path, {"photo.png": (40, 56)})
    rgb = np.array(Image.open(path))
    mean = torch.tensor(cfg.data.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.data.std).view(1, 3, 1, 1)
    x = (torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255 - mean) / std
    with torch.no_grad():
        outputs = model(x)
    for name in ("bottom", "fused"):
        out = tmp_path / name
        argv = ["predict", str(path), "--checkpoint", str(ckpt), "--out", str(out)]
        assert main([*argv, "--output", name]) == 0
        mask = np.asarray(Image.open(out / "photo_mask.png"))
        assert np.array_equal(mask, outputs[f"{name}.out"].argmax(1)[0].numpy())
    argv = ["predict", str(path), "--checkpoint", str(ckpt), "--out", str(tmp_path / "x")]
    assert main([*argv, "--output", "left"]) == 2
    err = capsys.readouterr().err
    assert "unknown output 'left'" in err and "bottom" in err


@pytest.fixture(scope="module")
def plain_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plain")
    cfg = config_from_dict({"model": {"arch": "unet", "base_channels": 4, "num_classes": 3}})
    arch, kwargs = model_kwargs(cfg.model)
    torch.manual_seed(0)
    path = folder / "unet.safetensors"
    save_weights(path, create_model(arch, **kwargs), cfg, {"palette": [[0, 0, 0]] * 3})
    return path


def test_predict_goes_on_past_unreadable_inputs_and_exits_1(
    plain_checkpoint, tmp_path, capsys
) -> None:
    bad = tmp_path / "in" / "broken.png"
    bad.parent.mkdir()
    bad.write_bytes(b"\x89PNG not really")
    (good,) = _save_images(tmp_path / "in", {"good.png": (20, 24)})
    missing = tmp_path / "in" / "gone.jpg"
    out = tmp_path / "out"
    argv = ["predict", str(bad), str(missing), str(good), "--checkpoint", str(plain_checkpoint)]
    assert main([*argv, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "broken.png: cannot read image" in err and "gone.jpg: no such file" in err
    assert sorted(p.name for p in out.iterdir()) == ["good_mask.png", "good_overlay.png"]


def test_inputs_sharing_a_stem_get_distinct_outputs(plain_checkpoint, tmp_path) -> None:
    from PIL import Image

    sizes = {"a/x.png": (20, 24), "b/x.jpg": (16, 12), "c/y.png": (8, 8), "c/y.jpg": (9, 9)}
    paths = _save_images(tmp_path / "in", sizes)
    out = tmp_path / "out"
    argv = ["predict", *map(str, paths), "--checkpoint", str(plain_checkpoint), "--out", str(out)]
    assert main(argv) == 0
    masks = {p.name: Image.open(p).size for p in out.iterdir() if p.name.endswith("_mask.png")}
    assert masks == {
        "a_x_mask.png": (24, 20),
        "b_x_mask.png": (12, 16),
        "y_png_mask.png": (8, 8),
        "y_jpg_mask.png": (9, 9),
    }


def test_output_stems_are_unique_and_keep_plain_stems(tmp_path) -> None:
    from coopseg.engine.predict import output_stems

    files = [
        tmp_path / "a" / "x.png",
        tmp_path / "b" / "x.png",
        tmp_path / "p" / "q" / "x.png",
        tmp_path / "z.png",
        tmp_path / "a_x.png",  # its own stem is what the first one would be named
    ]
    names = output_stems(files)
    assert len(set(names.values())) == len(files)
    assert names[files[3]] == "z"
    assert names[files[2]] == "p_q_x"
    assert {names[files[0]], names[files[4]]} == {"a_x", "a_x-2"}
