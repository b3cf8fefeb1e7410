"""Training curves from a run's log.jsonl: per-step series, evaluation series, and their panels.

A resumed run appends to the log and repeats the steps after its checkpoint, so
each step keeps its last record: the one the finished model actually followed.
The loss terms (one panel each, first) are the ones the run's ``start`` record
names (``terms``: the trainer's, i.e. the method's ``term_names``); a log
without them gets every registered method's and pretraining's.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from marreid.analysis.plotting import plot_curves
from marreid.engine.logging import read_log
from marreid.errors import DatasetError

# Per-step keys that are bookkeeping, not curves.
STEP_SKIP = ("kind", "step")
EVAL_KEY = re.compile(r"^(rank\d+|mAP)$")
GROUPS = (
    ("mined pairs", ("mined", "positives", "negatives")),
    ("agreement threshold T", ("threshold",)),
    ("true-pair rates (diagnostic)", ("tp_rate", "mined_tp_rate")),
    ("learning rate", ("lr",)),
    ("images / s", ("images_per_s",)),
)
CML_CAMERA = re.compile(r"^cml_cam\d+$")


def as_number(value: object) -> float | None:
    """A log value as a float: numbers, and the strings "nan" / "inf" / "-inf" the logger
    writes for non-finite floats; None for anything else (booleans, paths, names)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value in ("nan", "inf", "-inf"):
        return float(value)
    return None


def latest_per_step(records: Iterable[dict]) -> list[dict]:
    """The last record of each step, ordered by step (records without a step are dropped)."""
    by_step: dict[int, dict] = {}
    for record in records:
        if isinstance(record.get("step"), int):
            by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


def series_table(records: list[dict], keep: Callable[[str], bool] = lambda key: True
                 ) -> tuple[list[str], list[list[float | None]]]:
    """Columns ``step`` then every numeric key accepted by ``keep`` (in first-seen order), and one
    row per record; a key missing from a record is None."""
    columns: list[str] = []
    for record in records:
        for key, value in record.items():
            if key not in STEP_SKIP and key not in columns and keep(key) and as_number(value) is not None:
                columns.append(key)
    rows = [[float(r["step"])] + [as_number(r.get(key)) for key in columns] for r in records]
    return ["step", *columns], rows


def step_table(records: list[dict]) -> tuple[list[str], list[list[float | None]]]:
    """Every numeric series of the ``step`` records, one row per step (last record wins)."""
    return series_table(latest_per_step(r for r in records if r.get("kind") == "step"))


def eval_table(records: list[dict]) -> tuple[list[str], list[list[float | None]]]:
    """rank-k and mAP of the ``eval`` records, one row per evaluated step (last record wins)."""
    return series_table(latest_per_step(r for r in records if r.get("kind") == "eval"),
                        keep=lambda key: bool(EVAL_KEY.match(key)))


def known_terms() -> tuple[str, ...]:
    """Pretraining's and every registered method's loss terms, for logs that do not name theirs."""
    from marreid.engine.pretrain import Pretrainer
    from marreid.methods.registry import METHODS, method_class

    names = dict.fromkeys(Pretrainer.loss_names)
    for method in METHODS:
        names.update(dict.fromkeys(method_class(method).term_names))
    return tuple(names)


def logged_terms(records: Iterable[dict]) -> tuple[str, ...] | None:
    """The loss terms the last ``start`` record that names them lists, or None."""
    named = [r["terms"] for r in records if r.get("kind") == "start" and isinstance(r.get("terms"), list)]
    return tuple(named[-1]) if named else None


def panel_groups(step_columns: list[str], eval_columns: list[str],
                 terms: Sequence[str] | None = None) -> list[tuple[str, str, list[str]]]:
    """The figure's panels as (title, "step" or "eval", columns): one per loss term (``terms``,
    default ``known_terms()``), the per-camera L_CML shares together, the mining counts
    together, then the rest, evaluation last."""
    terms = known_terms() if terms is None else tuple(terms)
    present = [c for c in step_columns if c not in ("step", "epoch")]
    panels: list[tuple[str, str, list[str]]] = [(term, "step", [term]) for term in terms if term in present]
    cameras = [c for c in present if CML_CAMERA.match(c)]
    if cameras:
        panels.append(("L_CML share per camera", "step", cameras))
    grouped = set(terms) | set(cameras)
    for title, keys in GROUPS:
        found = [k for k in keys if k in present]
        if found:
            panels.append((title, "step", found))
        grouped |= set(keys)
    panels += [(key, "step", [key]) for key in present if key not in grouped]
    metrics = [c for c in eval_columns if c != "step"]
    if metrics:
        panels.append(("evaluation", "eval", metrics))
    return panels


def column(table: tuple[list[str], list[list[float | None]]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one column, skipping rows where it is missing or not finite."""
    columns, rows = table
    at = columns.index(key)
    pairs = [(row[0], row[at]) for row in rows if row[at] is not None and math.isfinite(row[at])]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def read_run_log(path: str | Path) -> list[dict]:
    """Every record of a log.jsonl; DatasetError naming the file when it is missing or not JSON lines."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"no training log at {path} (expected the run folder's log.jsonl)")
    try:
        return read_log(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: not a JSON-lines log ({exc})") from None


def write_table(path: Path, table: tuple[list[str], list[list[float | None]]]) -> Path:
    """A CSV of ``table``; missing values are empty cells, floats written exactly (repr)."""
    columns, rows = table
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        writer.writerows([["" if v is None else repr(v) for v in row] for row in rows])
    return path


def write_curves(log_path: str | Path, out_dir: str | Path) -> dict:
    """``curves.png`` (one panel per loss term, mining counts, ..., evaluation), ``curves_steps.csv``
    and ``curves_eval.csv`` (the plotted values) from a run's log.jsonl.

    Returns ``{"png", "steps_csv", "eval_csv", "panels", "steps", "evals"}``.
    """
    records = read_run_log(log_path)
    steps, evals = step_table(records), eval_table(records)
    if not steps[1] and not evals[1]:
        raise DatasetError(f"{log_path}: no step or eval records to plot")
    tables = {"step": steps, "eval": evals}
    panels = [(title, [(key, *column(tables[source], key)) for key in keys])
              for title, source, keys in panel_groups(steps[0], evals[0], logged_terms(records))]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return {
        "png": plot_curves(panels, out_dir / "curves.png"),
        "steps_csv": write_table(out_dir / "curves_steps.csv", steps),
        "eval_csv": write_table(out_dir / "curves_eval.csv", evals),
        "panels": len(panels), "steps": len(steps[1]), "evals": len(evals[1]),
    }


COMPARED = ("rank1", "rank5", "rank10", "mAP")


def comparison_rows(runs: list[tuple[str, list[dict]]], start: dict | None = None) -> list[list]:
    """Rows ``[run, step, rank1, rank5, rank10, mAP]`` of every evaluation of every run (last record
    of a step wins), in the runs' order then by step. ``start`` (metrics of the checkpoint every
    run began from, e.g. direct transfer) is written as each run's step 0 unless it logged one."""
    rows = []
    for label, records in runs:
        evals = latest_per_step(r for r in records if r.get("kind") == "eval")
        if start is not None and not any(r["step"] == 0 for r in evals):
            evals = [{"step": 0, **start}, *evals]
        rows += [[label, r["step"], *(as_number(r.get(key)) for key in COMPARED)] for r in evals]
    return rows


def write_eval_comparison(runs: list[tuple[str, str | Path]], out_dir: str | Path,
                          start: dict | None = None, name: str = "compare") -> dict:
    """``{name}.csv`` (every evaluation of every run) and ``{name}.png`` (rank-1 and mAP against
    steps, one line per run) from the runs' log.jsonl files, given as (label, path).

    Returns ``{"png", "csv", "rows"}``; DatasetError when a log has no evaluation at all.
    """
    logs = [(label, read_run_log(path)) for label, path in runs]
    for (label, records), (_, path) in zip(logs, runs):
        if not any(r.get("kind") == "eval" for r in records):
            raise DatasetError(f"{path}: no evaluation records (run {label!r} was never evaluated)")
    rows = comparison_rows(logs, start)
    panels = []
    for key, title in (("rank1", "rank-1 (%)"), ("mAP", "mAP (%)")):
        at = 2 + COMPARED.index(key)
        lines = []
        for label, _ in runs:
            points = [(row[1], 100.0 * row[at]) for row in rows if row[0] == label and row[at] is not None]
            lines.append((label, [p[0] for p in points], [p[1] for p in points]))
        panels.append((title, lines))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / f"{name}.csv"
    with csv_path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["run", "step", *COMPARED])
        writer.writerows([[row[0], row[1], *("" if v is None else repr(v) for v in row[2:])] for row in rows])
    return {"png": plot_curves(panels, out_dir / f"{name}.png"), "csv": csv_path, "rows": len(rows)}


__all__ = ["as_number", "latest_per_step", "series_table", "step_table", "eval_table", "known_terms", "logged_terms",
           "panel_groups", "column",
           "read_run_log", "write_table", "write_curves", "comparison_rows", "write_eval_comparison"]
