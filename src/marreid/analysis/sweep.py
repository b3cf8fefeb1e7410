"""Supplementary Fig. S2: one MAR run per value of a loss parameter (the mining ratio p, beta, ...),
all from one pretrained checkpoint, then rank-1 and mAP against the value.

Each value trains into ``out_dir/<param>_<value>``, and ``engine.stages.plan_stage`` decides
what becomes of it, the whole run configuration being its options: a value whose run finished
under the same configuration is reused, a run that was interrupted resumes from its checkpoint,
so a sweep can be stopped and started again. A folder holding a run of another configuration
is refused, not cleared: ``--out`` is the user's folder, and what is in it may not be the sweep's.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import typing
from collections.abc import Callable, Sequence
from pathlib import Path

from marreid.analysis.plotting import plot_sweep
from marreid.config import Config, MarConfig, config_from_dict, config_to_dict, load_config
from marreid.engine.pretrain import run_pretrain
from marreid.engine.stages import RESTART, RESUME, SKIP, plan_stage, read_json, write_json
from marreid.engine.train import pretrained_path, run_train
from marreid.errors import CheckpointError, ConfigError, TrainingError

RESULT_FILE = "sweep_result.json"
COLUMNS = ("param", "value", "rank1", "rank5", "rank10", "mAP", "ap_rule", "steps", "run_dir")


def sweepable_params() -> tuple[str, ...]:
    """The ``mar`` options a sweep can vary: its float-valued fields (mining_ratio, beta, ...)."""
    hints = typing.get_type_hints(MarConfig)
    return tuple(f.name for f in dataclasses.fields(MarConfig) if hints[f.name] is float)


def check_values(param: str, values: Sequence[float]) -> None:
    """ConfigError naming ``--param`` / ``--values`` for an unknown parameter, no values or a repeat."""
    if param not in sweepable_params():
        raise ConfigError(f"--param {param}: not a sweepable option; choose one of {', '.join(sweepable_params())}")
    if not values:
        raise ConfigError("--values: give at least one value")
    if len(set(values)) != len(values):
        raise ConfigError(f"--values: repeated value in {list(values)}")
    if not all(math.isfinite(v) for v in values):
        raise ConfigError(f"--values: every value must be finite, got {list(values)}")


def run_label(param: str, value: float) -> str:
    """The folder name of one value's run, e.g. ``mining_ratio_0.005``."""
    return f"{param}_{value:g}"


def value_config(cfg: Config, param: str, value: float, run_dir: str | Path, pretrained: str | Path) -> Config:
    """``cfg`` with ``mar.<param> = value``, its own run folder and the shared pretrained checkpoint."""
    data = config_to_dict(cfg)
    data["mar"][param] = float(value)
    data["output"]["run_dir"] = str(run_dir)
    data["train"]["pretrained_checkpoint"] = str(pretrained)
    return config_from_dict(data, where=f"--param {param} --values {value:g}")


def use_log_x(values: Sequence[float]) -> bool:
    """A logarithmic x axis when every value is positive and they span at least a factor of 10."""
    return min(values) > 0 and max(values) / min(values) >= 10


def ensure_pretrained(cfg: Config, report: Callable[[str], None]) -> Path:
    """The checkpoint every value starts from: ``train.pretrained_checkpoint`` or
    ``output.pretrain_dir/last.pt`` when it exists, else one pretraining run into ``output.pretrain_dir``."""
    path = pretrained_path(cfg)
    if path.is_file():
        report(f"every run starts from the pretrained checkpoint {path}")
        return path
    if cfg.train.pretrained_checkpoint:
        raise CheckpointError(f"train.pretrained_checkpoint not found: {path}")
    report(f"pretraining once into {cfg.output.pretrain_dir} (every run starts from it)")
    result = run_pretrain(cfg)
    if result["status"] == "stopped":
        raise TrainingError(f"pretraining stopped before it finished; rerun to resume ({result['checkpoint']})")
    return Path(result["checkpoint"])


def recorded_config(run_dir: Path) -> dict | None:
    """The configuration of the run in ``run_dir`` (its ``config.yaml``), as a dict; None when there is none."""
    saved = run_dir / "config.yaml"
    return config_to_dict(load_config(saved)) if saved.is_file() else None


def value_metrics(run_dir: Path, cfg: Config, label: str, report: Callable[[str], None]) -> tuple[dict, bool]:
    """The metrics of one value's run of ``cfg`` in ``run_dir``, and whether a finished run was reused:
    trained, resumed or reused as ``plan_stage`` decides; ConfigError for a folder of another run."""
    options = config_to_dict(cfg)
    saved = read_json(run_dir / RESULT_FILE)
    plan = plan_stage(run_dir, options, saved.get("config") if saved else None, recorded_config(run_dir))
    if plan.action == SKIP:
        report(f"{label}: reusing the finished run in {run_dir}")
        return saved["metrics"], True
    if plan.action == RESTART:
        raise ConfigError(f"{run_dir} holds a run with another configuration ({plan.changes()}); "
                          f"pass another --out or remove it")
    resume = plan.action == RESUME
    report(f"{label}: {'resuming' if resume else 'training'} in {run_dir}")
    result = run_train(cfg, resume=resume)
    if result["metrics"] is None:
        raise TrainingError(f"{label}: training stopped before evaluation ({result['checkpoint']})")
    write_json(run_dir / RESULT_FILE, {"config": options, "metrics": result["metrics"]})
    return result["metrics"], False


def run_sweep(cfg: Config, param: str, values: Sequence[float], out_dir: str | Path,
              report: Callable[[str], None] = print) -> list[dict]:
    """Train and evaluate one run per value from one pretrained checkpoint; a row per value
    (``COLUMNS`` plus ``reused``), in the order of ``values``."""
    check_values(param, values)
    out_dir = Path(out_dir)
    pretrained = ensure_pretrained(cfg, report)
    rows = []
    for value in values:
        run_dir = out_dir / run_label(param, value)
        run_cfg = value_config(cfg, param, value, run_dir, pretrained)
        metrics, reused = value_metrics(run_dir, run_cfg, f"{param}={value:g}", report)
        rows.append({"param": param, "value": float(value), "rank1": metrics["rank1"], "rank5": metrics["rank5"],
                     "rank10": metrics["rank10"], "mAP": metrics["mAP"], "ap_rule": metrics["ap_rule"],
                     "steps": metrics.get("step"), "run_dir": str(run_dir), "reused": reused})
    return rows


def write_sweep(rows: list[dict], out_dir: str | Path, name: str = "sweep") -> dict[str, Path]:
    """``name``.csv (the ``COLUMNS`` of every row, values ascending) and ``name``.png (rank-1 and
    mAP in % against the value); returns both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ordered = sorted(rows, key=lambda r: r["value"])
    table = out_dir / f"{name}.csv"
    with table.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(COLUMNS)
        writer.writerows([[row[c] for c in COLUMNS] for row in ordered])
    values = [r["value"] for r in ordered]
    png = plot_sweep(ordered[0]["param"], values, [r["rank1"] for r in ordered], [r["mAP"] for r in ordered],
                     out_dir / f"{name}.png", log_x=use_log_x(values))
    return {"png": png, "csv": table}


__all__ = ["sweepable_params", "check_values", "run_label", "value_config", "use_log_x", "ensure_pretrained",
           "recorded_config", "value_metrics", "run_sweep", "write_sweep", "RESULT_FILE", "COLUMNS"]
