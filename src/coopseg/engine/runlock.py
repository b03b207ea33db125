"""One writer per run folder: an OS file lock on ``<run folder>/train.lock``.

A job submitted twice, or a restart started while the first run still trains, would
otherwise write the same ``checkpoints/`` and ``log.jsonl`` side by side. The lock is
a POSIX record lock (``fcntl.lockf``) held by the training process (rank 0 under
torchrun) from the start of a run to its end: the kernel drops it when the process
ends in any way, SIGKILL included, so there is no stale lock to clean up. It works on
local disks and on NFS (through the NFS lock service; a crashed client's lock lasts
until the server's lease runs out, 90 s by default on NFSv4).

The file records who holds it (host, pid, start time), so a second writer is refused
in one line naming them. It stays in the folder after the run: only the OS lock
counts, never the file's presence. A file system without locks (some FUSE mounts)
gets a warning, and the run goes on unlocked.

POSIX locks belong to a process: within one process a second lock on the same folder
shares the first (counted, released with the last) instead of conflicting.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import time
from pathlib import Path
from typing import ClassVar

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = "train.lock"


class RunLockedError(RuntimeError):
    """Another process holds the run folder's lock; the message names it."""


def holder_of(path: Path) -> str:
    """Who the lock file says holds it: ``host H, pid P, since T``."""
    try:
        fields = dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    except OSError:
        fields = {}
    if "pid" not in fields:
        return "another process (it has not written its name yet)"
    since = f", since {fields['started']}" if "started" in fields else ""
    return f"pid {fields['pid']} on host {fields.get('host', '?')}{since}"


class RunLock:
    """The lock of one run folder (``acquire``/``release``; released when collected)."""

    _held: ClassVar[dict[str, list[int]]] = {}  # path -> [fd, users] in this process

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self.key = os.path.abspath(self.path)
        self.locked = False
        self.warning = ""  # set when the file system cannot lock

    def acquire(self) -> RunLock:
        """Take the lock or raise :class:`RunLockedError` naming the holder."""
        if self.locked:
            return self
        held = self._held.get(self.key)
        if held is not None:
            held[1] += 1
            self.locked = True
            return self
        if fcntl is None:  # pragma: no cover - Windows
            self.warning = "no file locks on this platform: a second writer is not refused"
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EACCES, errno.EAGAIN):
                raise RunLockedError(
                    f"{self.path.parent} is being trained by {holder_of(self.path)}; "
                    "wait for it to end or stop it, or choose another name (--set name=...)"
                ) from None
            self.warning = (
                f"cannot lock {self.path} ({os.strerror(err.errno or 0)}): a second job "
                "on this run folder would not be refused"
            )
            return self
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        os.ftruncate(fd, 0)
        who = f"host={socket.gethostname()}\npid={os.getpid()}\nstarted={stamp}\n"
        os.pwrite(fd, who.encode(), 0)
        self._held[self.key] = [fd, 1]
        self.locked = True
        return self

    def release(self) -> None:
        if not self.locked:
            return
        self.locked = False
        held = self._held.get(self.key)
        if held is None:
            return
        held[1] -= 1
        if held[1] == 0:
            del self._held[self.key]
            os.close(held[0])  # closing the file drops the lock

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown
            self.release()
