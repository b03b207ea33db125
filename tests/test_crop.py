"""The training crop against the data: ``data.crop_size: auto`` (the folder recipes' value)
follows the images, and a crop far larger than them is said at start and in data check."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from coopseg.cli import main, resolve_config_path
from coopseg.config import ConfigError, DataConfig, config_from_dict, load_config
from coopseg.data.sizes import auto_crop, crop_report, fit_crop, padding_fraction

from .conftest import tiny_config


def small_folder(root: Path, sizes=((96, 128), (96, 128), (80, 120)), n_classes: int = 2) -> Path:
    """A folder data set of small images (height, width) with index masks."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.yaml").write_text(json.dumps([f"c{i}" for i in range(n_classes)]))
    for i, (h, w) in enumerate(sizes * 2):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
            root / "images" / f"x{i}.png"
        )
        label = rng.integers(0, n_classes, (h, w), dtype=np.uint8)
        Image.fromarray(label, "L").save(root / "masks" / f"x{i}.png")
    (root / "splits").mkdir()
    (root / "splits" / "train.txt").write_text("\n".join(f"x{i}" for i in range(2 * len(sizes))))
    (root / "splits" / "val.txt").write_text("x0\nx2\n")
    return root


def test_padding_and_auto_arithmetic() -> None:
    assert padding_fraction([512, 512], (128, 128)) == pytest.approx(0.9375)  # the 94 %
    assert padding_fraction([64, 64], (128, 128)) == 0.0
    assert auto_crop([(96, 128), (96, 128), (80, 120)]) == [96, 128]
    assert auto_crop([(2000, 3000)] * 3) == [512, 512]  # at most 512x512
    assert crop_report([513, 513], [(375, 500)]) == ""  # VOC: some padding, no warning
    line = crop_report([512, 512], [(128, 128)])
    assert "512x512 is larger than the training images (median 128x128" in line
    assert "about 94 % of every crop is padding" in line and "[128, 128]" in line


def test_the_folder_recipes_follow_the_data_unless_a_crop_is_set(tmp_path) -> None:
    root = small_folder(tmp_path / "mine")
    for name in ("finetune-lite0-folder", "finetune-lite1-folder", "finetune-lite2-folder"):
        cfg = load_config(resolve_config_path(name), [f"data.root={root}"])
        assert cfg.data.crop_size == "auto"
    data = load_config(resolve_config_path("finetune-lite0-folder"), [f"data.root={root}"]).data
    (line,) = fit_crop(data)
    assert data.crop_size == [96, 128]
    assert (
        line
        == "data.crop_size auto: 96x128 (the training images' median size 96x128, at most 512x512)"
    )
    mine = load_config(
        resolve_config_path("finetune-lite0-folder"),
        [f"data.root={root}", "data.crop_size=[64, 64]"],
    ).data
    assert fit_crop(mine) == [] and mine.crop_size == [64, 64]  # the user's crop is kept
    big = DataConfig(dataset="folder", root=str(root), crop_size=[512, 512])
    (warning,) = fit_crop(big)
    assert warning.startswith("warning: data.crop_size 512x512 is larger than the training")
    assert big.crop_size == [512, 512]


def test_training_says_so_at_start_and_records_the_crop(tmp_path, capsys) -> None:
    from coopseg.engine.train import Trainer

    root = small_folder(tmp_path / "mine")
    model = {"arch": "unet", "base_channels": 4, "num_classes": 2}
    data = {"dataset": "folder", "root": str(root), "crop_size": [512, 512]}
    train = {"iterations": 1, "val_interval": 0}
    data["batch_size"] = 2
    raw = {"name": "big", "out_dir": str(tmp_path / "runs"), "device": "cpu", "model": model}
    Trainer(config_from_dict({**raw, "data": data, "train": train}), show_progress=False)
    assert "[big] warning: data.crop_size 512x512 is larger than" in capsys.readouterr().out
    auto = {**data, "crop_size": "auto"}
    cfg = config_from_dict({**raw, "name": "auto", "data": auto, "train": train})
    trainer = Trainer(cfg, show_progress=False)
    assert "[auto] data.crop_size auto: 96x128" in capsys.readouterr().out
    assert trainer.cfg.data.crop_size == [96, 128]  # what config.yaml and checkpoints record
    image, _ = trainer.train_set[0]
    assert tuple(image.shape[-2:]) == (96, 128)  # the crop it trains


def test_profile_costs_an_auto_crop_at_its_largest() -> None:
    from coopseg.engine.profile import config_input_size

    cfg = load_config(resolve_config_path("finetune-lite0-folder"))
    assert config_input_size(cfg) == ((512, 512), "data.crop_size auto (its largest)")


def test_data_check_reports_the_crop_against_the_sizes(tmp_path, capsys) -> None:
    root = small_folder(tmp_path / "mine")
    argv = ["data", "check", str(root), "--dataset", "folder", "--split", "train"]
    assert main([*argv, "--crop-size", "512", "512"]) == 0  # a warning, not an error
    out = capsys.readouterr().out
    assert "crop: data.crop_size auto trains 96x128" in out
    assert "warning: data.crop_size 512x512 is larger than the train images" in out
    assert main([*argv, "--json"]) == 0
    (split,) = json.loads(capsys.readouterr().out)["splits"]
    assert split["auto_crop"] == [96, 128] and split["warnings"] == []


def test_crop_size_values_are_checked(tiny_scenes, tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"data.crop_size: expected \[height, width\] or auto"):
        tiny_config(tiny_scenes, tmp_path, data={"crop_size": "big"})
    with pytest.raises(ConfigError, match="eval.crop_size: eval.mode slide needs it"):
        tiny_config(tiny_scenes, tmp_path, data={"crop_size": "auto"}, eval={"mode": "slide"})
    cfg = tiny_config(tiny_scenes, tmp_path, data={"crop_size": "auto"})
    assert fit_crop(cfg.data) and cfg.data.crop_size == [64, 64]  # FashionScenes: its size
