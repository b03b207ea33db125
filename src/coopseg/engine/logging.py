"""Run logs: a JSONL file for scripts and TensorBoard events for people."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


class RunLogger:
    """Writes only on the main rank; other ranks get a no-op logger."""

    def __init__(self, run_dir: Path, enabled: bool = True) -> None:
        self.enabled = enabled
        self._writer = None
        self._jsonl = None
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(run_dir / "log.jsonl", "a", buffering=1)  # noqa: SIM115
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(run_dir / "tb"))

    def log(self, step: int, kind: str, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), "step": step, "kind": kind, **values}
        self._jsonl.write(json.dumps(record) + "\n")
        for key, value in values.items():
            if isinstance(value, int | float) and value == value:
                self._writer.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._writer.close()
