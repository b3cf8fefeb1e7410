"""Run logging: tqdm progress bars, a JSONL record per step / evaluation, optional TensorBoard.

``run_dir/log.jsonl`` gets one JSON object per line with a ``kind`` field
("step", "epoch", "eval", ...); a resumed run appends to it. TensorBoard event
files are written under ``run_dir/tb`` only when ``torch.utils.tensorboard``
(and the ``tensorboard`` package) import; otherwise that sink is silently off.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Iterable

from tqdm import tqdm


def _jsonable(value: Any) -> Any:
    """Floats that JSON cannot hold (nan, inf) become strings, so every line stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _open_tensorboard(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(folder))


class RunLogger:
    """Progress bars, ``log.jsonl`` and TensorBoard for one run directory.

    ``enabled=False`` hides the progress bars; the files are always written.
    """

    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.enabled = enabled
        self.path = self.run_dir / "log.jsonl"
        self._file = self.path.open("a", encoding="utf-8")
        self._tb = _open_tensorboard(self.run_dir / "tb") if tensorboard else None

    def progress(self, iterable: Iterable | None = None, *, total: int | None = None,
                 desc: str = "", initial: int = 0, unit: str = "it") -> tqdm:
        """A tqdm bar (ETA included); ``bar.set_postfix`` shows live loss terms."""
        return tqdm(iterable, total=total, desc=desc, initial=initial, unit=unit,
                    disable=not self.enabled, file=sys.stderr, dynamic_ncols=True, leave=False)

    def log(self, kind: str, record: dict, step: int | None = None) -> None:
        """Append ``{"kind": kind, **record}`` to log.jsonl; numbers also go to TensorBoard."""
        line = {"kind": kind, **({"step": step} if step is not None else {}), **record}
        self._file.write(json.dumps(_jsonable(line)) + "\n")
        self._file.flush()
        if self._tb is not None and step is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(f"{kind}/{key}", value, step)

    def write(self, message: str) -> None:
        """A message that does not break an open progress bar."""
        if self.enabled:
            tqdm.write(message, file=sys.stderr)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_log(path: str | Path, kind: str | None = None) -> list[dict]:
    """The records of a log.jsonl, optionally only those of one ``kind``."""
    records = []
    with Path(path).open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                rec = json.loads(line)
                if kind is None or rec.get("kind") == kind:
                    records.append(rec)
    return records


__all__ = ["RunLogger", "read_log"]
