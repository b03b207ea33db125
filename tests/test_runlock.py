"""One writer per run folder: an OS lock held while training, refused in one line naming the
holder (host, pid), gone with the process that held it (SIGKILL included)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

from coopseg.cli import main
from coopseg.engine.runlock import LOCK_NAME, RunLock
from coopseg.engine.train import Trainer

UNET = {"arch": "unet", "base_channels": 4, "num_classes": 11}

HOLDER = textwrap.dedent(
    """
    import importlib.util, sys, time
    spec = importlib.util.spec_from_file_location("runlock", sys.argv[1])  # no torch: fast
    runlock = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runlock)
    try:
        lock = runlock.RunLock(sys.argv[2]).acquire()
    except runlock.RunLockedError as err:
        print(f"refused: {err}", flush=True)
        sys.exit(1)
    print("locked", flush=True)
    time.sleep(float(sys.argv[3]))
    """
)


def _other_process(tmp_path, run_dir, hold_s: float = 600) -> subprocess.Popen:
    """Another process taking the run folder's lock as a training process does."""
    import coopseg.engine.runlock as module

    run_dir.mkdir(parents=True, exist_ok=True)
    (tmp_path / "holder.py").write_text(HOLDER)
    return subprocess.Popen(
        [sys.executable, str(tmp_path / "holder.py"), module.__file__, str(run_dir), str(hold_s)],
        stdout=subprocess.PIPE,
        text=True,
    )


def test_a_second_writer_is_refused_naming_the_holder_until_it_dies(
    make_config, tmp_path, capsys
) -> None:
    cfg = make_config(name="locked", model=UNET, train={"iterations": 1, "val_interval": 0})
    config = tmp_path / "locked.yaml"
    config.write_text(cfg.to_yaml())
    holder = _other_process(tmp_path, cfg.run_dir)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(["train", str(config), "--resume", "auto"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("coopseg: error: ")
        host = socket.gethostname()
        assert f"{cfg.run_dir} is being trained by pid {holder.pid} on host {host}" in err
        assert "wait for it to end or stop it" in err
        assert not (cfg.run_dir / "checkpoints").exists()  # refused before any work
    finally:
        holder.send_signal(signal.SIGKILL)  # no chance to clean up: no stale lock either
        holder.wait()
    assert main(["train", str(config), "--resume", "auto"]) == 0
    assert (cfg.run_dir / "checkpoints" / "final.safetensors").exists()
    text = (cfg.run_dir / LOCK_NAME).read_text()
    assert text.startswith(f"host={socket.gethostname()}\npid={os.getpid()}\nstarted=")


def test_the_lock_is_held_while_training_and_shared_within_a_process(make_config, tmp_path) -> None:
    cfg = make_config(name="held", model=UNET, train={"iterations": 1, "val_interval": 0})
    trainer = Trainer(cfg, show_progress=False)
    again = RunLock(cfg.run_dir).acquire()  # the same process: shared, not refused
    again.release()
    probe = _other_process(tmp_path, cfg.run_dir, hold_s=0)
    out, _ = probe.communicate(timeout=60)
    assert probe.returncode == 1 and f"refused: {cfg.run_dir} is being trained by pid" in out
    trainer.train()
    assert not trainer.run_lock.locked
    probe = _other_process(tmp_path, cfg.run_dir, hold_s=0)
    assert probe.communicate(timeout=60)[0].strip() == "locked"  # released at the end


def test_an_unwritable_out_dir_is_one_line_before_any_work(make_config, tmp_path, capsys) -> None:
    cfg = make_config(name="nowhere", data={"root": str(tmp_path / "no-data-here")})
    config = tmp_path / "nowhere.yaml"
    config.write_text(cfg.to_yaml())
    started = time.monotonic()
    assert main(["train", str(config), "--set", "out_dir=/proc/nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("coopseg: error: out_dir: ")
    assert "/proc/nope/nowhere" in err and "no-data-here" not in err  # before the data
    assert time.monotonic() - started < 30
