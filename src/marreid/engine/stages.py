"""Skip what is finished, resume what is not, restart what changed: one rule for runs in folders.

A *stage* is one training (and evaluation) in its own folder: a stage of the
pipeline (``engine.pipeline``), one value of a sweep (``analysis.sweep``). Its
*options* are the nested settings that decide what it computes. The folder may
hold a finished result recorded with the options that made it, and a
checkpoint (``LAST``) of a run whose options are recorded next to it.
``plan_stage`` only decides; the caller acts on the plan, and ``clear_stage``
is the one action here that deletes.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from marreid.engine.preflight import lock_run_dir
from marreid.engine.stepped import LAST

SKIP, RESUME, START, RESTART = "skip", "resume", "start", "restart"


@dataclass(frozen=True)
class Plan:
    """What to do with a stage: ``action`` (``SKIP``, ``RESUME``, ``START`` or ``RESTART``) and, for a
    restart, the dotted names of the options that differ from the recorded run (empty: none recorded)."""

    action: str
    changed: tuple[str, ...] = ()

    def changes(self, limit: int = 5) -> str:
        """The first ``limit`` changed options, for a one-line message."""
        return ", ".join(self.changed[:limit]) if self.changed else "unrecorded options"


def plan_stage(folder: Path, options: Any, finished: Any = None, recorded: Any = None,
               run_options: Any = None) -> Plan:
    """Decide what becomes of the stage in ``folder`` whose result ``options`` decide.

    ``finished``: the options recorded with the folder's finished result, when it
    has one that still stands (else None); ``recorded``: the options recorded for
    the run the folder holds (else None); ``run_options``: the options that decide
    the training run (default ``options``; a stage whose evaluation options alone
    changed continues its run to re-evaluate it).

    - ``SKIP``: the finished result was computed from ``options``;
    - ``RESTART``: the folder holds a run of other options, or a checkpoint whose
      options nobody recorded;
    - ``RESUME``: it holds a checkpoint of ``run_options``;
    - ``START``: there is nothing to continue.
    """
    options = _plain(options)
    run_options = options if run_options is None else _plain(run_options)
    if finished is not None and _plain(finished) == options:
        return Plan(SKIP)
    recorded = _plain(recorded)
    if recorded is not None and recorded != run_options:
        changed = tuple(differences(recorded, run_options)) if isinstance(recorded, dict) else ()
        return Plan(RESTART, changed)
    if (folder / LAST).is_file():
        return Plan(RESUME) if recorded is not None else Plan(RESTART)
    return Plan(START)


def clear_stage(folder: Path) -> None:
    """Delete ``folder`` and everything in it, so that its stage starts from nothing; refused
    (ConfigError) while another process's run holds the folder (``lock_run_dir``)."""
    if folder.exists():
        lock_run_dir(folder, "stage folder")
        shutil.rmtree(folder)


def differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted names of the values that differ between two nested dicts."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [prefix.rstrip(".")]


def read_json(path: Path) -> dict | None:
    """The JSON object in ``path``; None when it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_json(path: Path, data: dict) -> None:
    """Write through a temporary file, so a crash never leaves half a result behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def _plain(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), so recorded and current options compare."""
    return json.loads(json.dumps(value))


__all__ = ["RESTART", "RESUME", "SKIP", "START", "Plan", "clear_stage", "differences", "plan_stage", "read_json",
           "write_json"]
