"""Beyond one process: two torchrun "nodes" on localhost (c10d rendezvous, gloo), and a
worker killed with SIGKILL under ``torchrun --max-restarts 1`` that resumes by itself.

Both end equal to one uninterrupted process to the DDP tolerance of tests/test_ddp.py
(rtol 1e-4, atol 1e-5): gloo sums the two ranks' gradients in another order than one
process sums the batch, so the last bits differ; resume itself is bit-exact
(tests/test_train.py, tests/test_faults.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, torch
    from pathlib import Path
    from coopseg.config import load_config
    from coopseg.engine.train import Trainer

    cfg = load_config(sys.argv[1])
    out, kill_at = Path(sys.argv[2]), int(sys.argv[3])
    trainer = Trainer(cfg, show_progress=False)  # train.resume: auto
    (out / f"start-rank{trainer.dist.rank}-it{trainer.iteration}").touch()
    real_step = trainer.step

    def step(images, masks):  # the first time through: rank 1 dies mid-run
        values = real_step(images, masks)
        marker = out / "killed"
        if trainer.iteration == kill_at and trainer.dist.rank == 1 and not marker.exists():
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return values

    trainer.step = step
    trainer.train()
    torch.save(trainer.model.state_dict(), out / f"rank{trainer.dist.rank}.pt")
    """
)
TRAIN = {"iterations": 6, "val_interval": 0, "checkpoint_interval": 2, "resume": "auto"}
MODEL = {"freeze_bn": True, "dropout": 0.0}


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _check(proc: subprocess.CompletedProcess | subprocess.Popen, out: str = "") -> None:
    assert proc.returncode == 0, out[-4000:]


@pytest.fixture(scope="module")
def reference(tiny_scenes, tmp_path_factory) -> dict[str, torch.Tensor]:
    """One process, never interrupted."""
    from .conftest import tiny_config

    tmp = tmp_path_factory.mktemp("reference")
    cfg = tiny_config(tiny_scenes, tmp / "runs", name="one", model=MODEL, train=TRAIN)
    (tmp / "one.yaml").write_text(cfg.to_yaml())
    (tmp / "run.py").write_text(SCRIPT)
    proc = subprocess.run(
        [sys.executable, "run.py", "one.yaml", str(tmp), "0"],
        cwd=tmp,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    _check(proc, proc.stdout + proc.stderr)
    return torch.load(tmp / "rank0.pt", weights_only=True)


def _assert_matches(path: Path, reference: dict[str, torch.Tensor]) -> None:
    weights = torch.load(path, weights_only=True)
    for key, value in reference.items():
        torch.testing.assert_close(weights[key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_two_nodes_on_localhost_equal_one_process(tmp_path, make_config, reference) -> None:
    cfg = make_config(name="two-nodes", model=MODEL, train=TRAIN)
    (tmp_path / "cfg.yaml").write_text(cfg.to_yaml())
    (tmp_path / "run.py").write_text(SCRIPT)
    endpoint = f"127.0.0.1:{_free_port()}"
    node = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "2",
        "--nproc-per-node",
        "1",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        endpoint,
        "--rdzv-id",
        "coopseg-test",
        "run.py",
        "cfg.yaml",
        str(tmp_path),
        "0",
    ]
    nodes = [
        subprocess.Popen(
            node,
            cwd=tmp_path,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    for proc in nodes:
        out, _ = proc.communicate(timeout=300)
        _check(proc, out)
    _assert_matches(tmp_path / "rank0.pt", reference)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert all(torch.equal(v, r1[k]) for k, v in r0.items())


def test_sigkilled_worker_restarts_and_resumes(tmp_path, make_config, reference) -> None:
    cfg = make_config(name="killed", model=MODEL, train=TRAIN)
    (tmp_path / "cfg.yaml").write_text(cfg.to_yaml())
    (tmp_path / "run.py").write_text(SCRIPT)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "--max-restarts",
            "1",
            "run.py",
            "cfg.yaml",
            str(tmp_path),
            "3",
        ],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=400,
    )
    _check(proc, proc.stdout + proc.stderr)
    assert (tmp_path / "killed").exists()  # the fault happened
    # First attempt from scratch; after the restart both ranks resumed at iteration 2
    # (the last checkpoint before rank 1 died at iteration 3).
    starts = sorted(p.name for p in tmp_path.glob("start-*"))
    assert starts == ["start-rank0-it0", "start-rank0-it2", "start-rank1-it0", "start-rank1-it2"]
    _assert_matches(tmp_path / "rank0.pt", reference)
