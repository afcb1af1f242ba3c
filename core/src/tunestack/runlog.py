"""The run's JSONL event log (and TensorBoard scalars when tensorboard is installed)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


class RunLog:
    def __init__(self, path: Path | None, enabled: bool = True) -> None:
        self.path = path
        self.enabled = enabled and path is not None
        self._writer: Any = None
        if self.enabled and path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = _tensorboard(path.parent / "tensorboard")

    def event(self, kind: str, **fields: Any) -> None:
        if not self.enabled or self.path is None:
            return
        record = {"time": round(time.time(), 3), "event": kind, **fields}
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, default=str) + "\n")
        if self._writer is not None and kind == "train":
            step = int(fields.get("step", 0))
            for key, value in fields.items():
                if isinstance(value, int | float) and key not in {"step", "epoch"}:
                    self._writer.add_scalar(f"{fields.get('stage', 'train')}/{key}", value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def _tensorboard(folder: Path) -> Any:
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(folder))
