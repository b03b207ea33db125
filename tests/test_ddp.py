"""DDP on CPU (gloo): ranks stay identical and match one process on the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from .conftest import tiny_cooperative

SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from coopseg.config import load_config
    from coopseg.engine.train import Trainer

    cfg = load_config(sys.argv[1])
    trainer = Trainer(cfg, show_progress=False)
    result = trainer.train()
    torch.save(
        {"weights": trainer.model.state_dict(), "miou": result.last_metrics.miou,
         "pixels": result.last_metrics.pixels},
        f"{sys.argv[2]}/rank{trainer.dist.rank}-of-{trainer.dist.world_size}.pt",
    )
    """
)


def _run(args: list[str], tmp_path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.parametrize("cooperative", [False, True], ids=["single", "cross-pair"])
def test_ddp_two_processes_equal_single_process(tmp_path, make_config, cooperative) -> None:
    script = tmp_path / "train_and_dump.py"
    script.write_text(SCRIPT)
    model = {"freeze_bn": True, "dropout": 0.0}
    if cooperative:  # members with their own dropout 0 and frozen BN, linked both ways
        model = tiny_cooperative("cross", freeze_bn=True)
        for member in model["members"]:
            member["dropout"] = 0.0
    common = {
        "model": model,
        # Frozen random-init BN does not normalise: the wider cross pair needs a lower lr.
        "train": {
            "iterations": 4,
            "val_interval": 0,
            "checkpoint_interval": 0,
            "lr": 0.005 if cooperative else 0.05,
        },
    }
    single = make_config(name="single", **common)
    double = make_config(name="ddp", **common)
    (tmp_path / "single.yaml").write_text(single.to_yaml())
    (tmp_path / "ddp.yaml").write_text(double.to_yaml())

    _run([sys.executable, str(script), "single.yaml", str(tmp_path)], tmp_path)
    _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(script),
            "ddp.yaml",
            str(tmp_path),
        ],
        tmp_path,
    )
    one = torch.load(tmp_path / "rank0-of-1.pt", weights_only=False)
    r0 = torch.load(tmp_path / "rank0-of-2.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1-of-2.pt", weights_only=False)

    for key, value in r0["weights"].items():
        assert torch.equal(value, r1["weights"][key]), f"ranks diverged at {key}"
    changed = 0
    for key, value in one["weights"].items():
        torch.testing.assert_close(r0["weights"][key], value, rtol=1e-4, atol=1e-5, msg=key)
        changed += int(value.is_floating_point())
    assert changed > 0
    # Validation is sharded across ranks and reduced: the same pixels, the same metric.
    assert r0["pixels"] == r1["pixels"] == one["pixels"]
    # The weights agree to ~1e-5, so a pixel at a near tie may flip its argmax: ~1e-5 mIoU.
    assert abs(r0["miou"] - one["miou"]) < 1e-4
