"""The demo's expected range: what ``marreid demo`` holds its own numbers against.

``demo_expected.json`` (package data) holds, for rank-1 and mAP of direct transfer, MAR and
MAR's gain over direct transfer, the mean and sample standard deviation over seeds of one
``marreid demo --seeds 3`` run of the shipped settings. A seed's exact numbers depend on the
CPU's kernels and on torch's thread count (README, "The demo"), so a run elsewhere is judged
against the spread over seeds, not against one seed's digits.
"""

from __future__ import annotations

import json
import os
import platform
from importlib import resources
from pathlib import Path

import numpy as np

EXPECTED_FILE = "demo_expected.json"
# Rows and metrics compared: the two methods as runs are quoted (rank-1 / mAP), and MAR's gain,
# the point of the demo.
ROWS = {"direct": "direct transfer", "mar": "MAR", "gain": "MAR gain over direct transfer"}
METRICS = {"rank1": "rank-1", "mAP": "mAP"}
# A healthy run lies within mean +- SPREADS sample standard deviations of the reference seeds:
# one deviation would flag about a third of healthy runs, and three seeds estimate it loosely.
SPREADS = 2.0


def load_expected() -> dict:
    """The shipped reference: ``rows`` shaped as :func:`expected_rows` returns them (per-seed
    ``values`` optional), plus the command, machine, AP rule and seeds it was measured with."""
    return json.loads(resources.files("marreid.cli").joinpath(EXPECTED_FILE).read_text())


def _stats(values: list[float]) -> dict:
    array = np.asarray(values, dtype=np.float64)
    std = float(array.std(ddof=1)) if len(array) > 1 else 0.0
    return {"mean": float(array.mean()), "std": std, "values": [float(v) for v in array]}


def expected_rows(summary: dict[str, dict], rule: str) -> dict[str, dict]:
    """``{row: {metric: {"mean", "std", "values"}}}`` in % under ``rule`` from a seeds summary
    (``pipeline.aggregate_seeds``); ``gain`` is MAR minus direct transfer seed by seed. Rows whose
    runs are missing from ``summary`` are left out."""
    values: dict[str, dict[str, list[float]]] = {}
    for row in ("direct", "mar"):
        if row in summary:
            values[row] = {m: [100 * v for v in summary[row][rule][m]["values"]] for m in METRICS}
    if len(values) == 2:
        values["gain"] = {m: [b - a for a, b in zip(values["direct"][m], values["mar"][m])] for m in METRICS}
    return {row: {m: _stats(v) for m, v in metrics.items()} for row, metrics in values.items()}


def compare(own: dict[str, dict], expected: dict) -> list[dict]:
    """One entry per (row, metric) present in both: this run's values, the reference's mean and
    std, the healthy range (mean +- SPREADS std) and which of this run's seeds fall outside it."""
    entries = []
    for row, label in ROWS.items():
        if row not in own or row not in expected["rows"]:
            continue
        for metric, name in METRICS.items():
            ref = expected["rows"][row][metric]
            low, high = ref["mean"] - SPREADS * ref["std"], ref["mean"] + SPREADS * ref["std"]
            values = own[row][metric]["values"]
            outside = [seed for seed, v in enumerate(values) if not low <= v <= high]  # the demo's seeds are 0..N-1
            entries.append({"row": row, "label": label, "metric": name, "values": values,
                            "mean": ref["mean"], "std": ref["std"], "low": low, "high": high,
                            "outside_seeds": outside})
    return entries


def _verdict(entry: dict) -> str:
    if not entry["outside_seeds"]:
        return "yes"
    if len(entry["values"]) == 1:
        return "NO"
    return "NO (seed " + ", ".join(str(s) for s in entry["outside_seeds"]) + ")"


def comparison_markdown(entries: list[dict], expected: dict) -> str:
    """The table printed beside the demo's own: this run, the reference and whether it is inside."""
    head = ["", "this run", "expected (mean ± sd)", f"healthy range (± {SPREADS:g} sd)", "inside"]
    lines = [f"| {' | '.join(head)} |", "|" + "---|" * len(head)]
    for e in entries:
        cells = [f"{e['label']}, {e['metric']}", ", ".join(f"{v:.1f}" for v in e["values"]),
                 f"{e['mean']:.1f} ± {e['std']:.1f}", f"{e['low']:.1f} to {e['high']:.1f}", _verdict(e)]
        lines.append(f"| {' | '.join(cells)} |")
    seeds = ", ".join(str(s) for s in expected["seeds"])
    healthy = all(not e["outside_seeds"] for e in entries)
    note = (f"Expected: `{expected['command']}` of the shipped settings on {expected['measured_on']}, "
            f"seeds {seeds}, % under the {expected['ap_rule']} AP rule. A seed's exact numbers change with "
            f"the CPU and the thread count; a healthy run lands inside the range. "
            + ("Every number of this run is inside." if healthy else
               "Some number of this run is outside: just outside happens (three seeds estimate the spread "
               "loosely); far outside, or no gain from MAR, means something is wrong."))
    return "\n".join(lines) + "\n\n" + note + "\n"


def busy_hint(threads: int, load: float, cpus: int) -> str | None:
    """A suggestion to pass ``--threads 1`` when ``threads`` threads meet a machine whose 1-minute
    load average ``load`` already fills its ``cpus``; None otherwise."""
    if threads <= 1 or load + threads <= cpus + 0.5:
        return None
    return (f"[threads] {threads} torch threads on {cpus} CPUs with a load average of {load:.1f}: threads that "
            f"share busy cores wait on each other and can run several times slower; --threads 1 avoids that")


def machine() -> dict:
    """What a seed's exact digits depend on besides the code and the thread count: the CPU, the
    instruction set torch's kernels use, and the torch build."""
    import torch

    return {"cpu": cpu_name(), "cpus": os.cpu_count(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__}


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what the platform module says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_load() -> tuple[float, int]:
    """(1-minute load average, CPU count); (0, CPU count) where the platform has no load average."""
    cpus = os.cpu_count() or 1
    try:
        return os.getloadavg()[0], cpus
    except (AttributeError, OSError):
        return 0.0, cpus


__all__ = ["SPREADS", "busy_hint", "compare", "comparison_markdown", "expected_rows",
           "load_expected", "machine", "machine_load"]
