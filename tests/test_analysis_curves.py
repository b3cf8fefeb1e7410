"""Training curves: the CSVs must hold exactly the log's values (last record of a repeated step)."""

from __future__ import annotations

import csv
import math

import pytest
from PIL import Image

from marreid.analysis.curves import as_number, latest_per_step, panel_groups, write_curves
from marreid.analysis.plotting import curves_size
from marreid.cli import main
from marreid.engine.logging import RunLogger
from marreid.errors import DatasetError


def write_log(run_dir) -> list[tuple[str, dict, int]]:
    """A run that stopped after step 3, resumed from step 2's checkpoint and ran to step 4."""
    entries = [("start", {"run": "mar", "aux_images": 10}, None)]
    for step in range(4):
        entries.append(("step", {"epoch": 0, "lr": 0.01, "loss": 1.0 + step, "al": 0.5 * step, "mined": 3,
                                 "positives": 1, "negatives": 2, "threshold": 0.9, "cml_cam0": 0.25 * step}, step))
    entries.append(("eval", {"rank1": 0.5, "rank5": 0.75, "mAP": 0.4, "ap_rule": "plain", "num_query": 5}, 3))
    for step in (2, 3, 4):  # the resumed run: its records replace the first run's
        entries.append(("step", {"epoch": 1, "lr": 0.001, "loss": 10.0 + step, "al": float("nan"), "mined": 4,
                                 "positives": 2, "negatives": 2, "threshold": 0.95, "cml_cam0": 1.0}, step))
    entries.append(("eval", {"rank1": 0.6, "rank5": 0.8, "mAP": 0.45, "ap_rule": "plain", "num_query": 5}, 5))
    with RunLogger(run_dir, enabled=False, tensorboard=False) as logger:
        for kind, record, step in entries:
            logger.log(kind, record, step=step)
    return entries


def read_csv(path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_as_number_and_latest_per_step() -> None:
    assert as_number(3) == 3.0 and as_number(True) is None and as_number("plain") is None
    assert math.isnan(as_number("nan")) and as_number("-inf") == -math.inf
    records = [{"step": 1, "v": 1}, {"step": 0, "v": 2}, {"step": 1, "v": 3}, {"v": 4}]
    assert latest_per_step(records) == [{"step": 0, "v": 2}, {"step": 1, "v": 3}]


def test_panel_groups_hand_worked() -> None:
    steps = ["step", "epoch", "lr", "loss", "mdl", "cml_cam1", "cml_cam0", "mined", "negatives", "odd"]
    panels = panel_groups(steps, ["step", "rank1", "mAP"])
    assert panels == [
        ("loss", "step", ["loss"]),
        ("mdl", "step", ["mdl"]),
        ("L_CML share per camera", "step", ["cml_cam1", "cml_cam0"]),
        ("mined pairs", "step", ["mined", "negatives"]),
        ("learning rate", "step", ["lr"]),
        ("odd", "step", ["odd"]),
        ("evaluation", "eval", ["rank1", "mAP"]),
    ]


def test_curves_csv_equals_the_log(tmp_path) -> None:
    entries = write_log(tmp_path)
    want: dict[int, dict] = {}
    for kind, record, step in entries:
        if kind == "step":
            want[step] = record
    result = write_curves(tmp_path / "log.jsonl", tmp_path / "out")
    rows = read_csv(result["steps_csv"])
    assert [int(float(r["step"])) for r in rows] == [0, 1, 2, 3, 4]
    for row in rows:
        record = want[int(float(row["step"]))]
        assert set(row) == {"step", *record}
        for key, value in record.items():
            got = float(row[key])
            assert (math.isnan(got) and math.isnan(value)) or got == value, (row["step"], key)
    evals = read_csv(result["eval_csv"])
    assert evals == [{"step": "3.0", "rank1": "0.5", "rank5": "0.75", "mAP": "0.4"},
                     {"step": "5.0", "rank1": "0.6", "rank5": "0.8", "mAP": "0.45"}]
    # loss, al, L_CML per camera, mined pairs, threshold, learning rate, evaluation
    assert result["panels"] == 7 and result["steps"] == 5 and result["evals"] == 2
    with Image.open(result["png"]) as img:
        height, width = curves_size(7)
        assert img.size == (width, height) == (1200, 3 * 280)


def test_missing_values_stay_empty(tmp_path) -> None:
    with RunLogger(tmp_path, enabled=False, tensorboard=False) as logger:
        logger.log("step", {"loss": 1.0}, step=0)
        logger.log("step", {"loss": 2.0, "mdl": 0.5}, step=1)
    result = write_curves(tmp_path / "log.jsonl", tmp_path)
    assert read_csv(result["steps_csv"]) == [{"step": "0.0", "loss": "1.0", "mdl": ""},
                                             {"step": "1.0", "loss": "2.0", "mdl": "0.5"}]
    assert read_csv(result["eval_csv"]) == []


def test_cli_writes_into_the_run_folder(tmp_path, capsys) -> None:
    write_log(tmp_path)
    assert main(["visualize", "curves", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "curves.png") in out
    for name in ("curves.png", "curves_steps.csv", "curves_eval.csv"):
        assert (tmp_path / name).stat().st_size > 0


def test_missing_or_empty_log(tmp_path, capsys) -> None:
    assert main(["visualize", "curves", str(tmp_path / "nope")]) == 2
    assert "no training log" in capsys.readouterr().err
    (tmp_path / "log.jsonl").write_text('{"kind": "start"}\n')
    with pytest.raises(DatasetError, match="no step or eval records"):
        write_curves(tmp_path / "log.jsonl", tmp_path)


def write_evals(run_dir, evals: list[tuple[int, float, float]]) -> None:
    """A log with a start record, one step record and evaluations (step, rank1, mAP)."""
    with RunLogger(run_dir, enabled=False, tensorboard=False) as logger:
        logger.log("start", {"run": "mar"})
        logger.log("step", {"loss": 1.0}, step=0)
        for step, rank1, mAP in evals:
            logger.log("eval", {"rank1": rank1, "rank5": rank1 + 0.1, "rank10": rank1 + 0.2, "mAP": mAP,
                                "ap_rule": "plain"}, step=step)


def test_compare_writes_every_evaluation_of_every_run_with_the_common_start(tmp_path, capsys) -> None:
    write_evals(tmp_path / "mar", [(3, 0.30, 0.12), (6, 0.35, 0.15), (6, 0.36, 0.16)])  # step 6 repeated: last wins
    write_evals(tmp_path / "control", [(3, 0.29, 0.11)])
    start = tmp_path / "dt.json"
    start.write_text('{"rank1": 0.25, "rank5": 0.4, "rank10": 0.5, "mAP": 0.1, "ap_rule": "plain"}')
    assert main(["visualize", "compare", str(tmp_path / "mar"), str(tmp_path / "control"), "--label", "MAR",
                 "--label", "L_AL only", "--start", str(start), "--out", str(tmp_path / "out")]) == 0
    rows = read_csv(tmp_path / "out" / "compare.csv")
    assert [(r["run"], int(r["step"]), float(r["rank1"]), float(r["mAP"])) for r in rows] == [
        ("MAR", 0, 0.25, 0.1), ("MAR", 3, 0.30, 0.12), ("MAR", 6, 0.36, 0.16),
        ("L_AL only", 0, 0.25, 0.1), ("L_AL only", 3, 0.29, 0.11)]
    with Image.open(tmp_path / "out" / "compare.png") as img:
        assert img.width > 200 and img.height > 100
    assert "5 evaluations of 2 runs" in capsys.readouterr().out


def test_compare_refuses_mismatched_labels_and_runs_without_evaluations(tmp_path, capsys) -> None:
    write_evals(tmp_path / "a", [])
    write_evals(tmp_path / "b", [(3, 0.3, 0.1)])
    assert main(["visualize", "compare", str(tmp_path / "b"), "--label", "x", "--label", "y",
                 "--out", str(tmp_path / "o")]) == 2
    assert "--label: 2 names for 1 runs" in capsys.readouterr().err
    assert main(["visualize", "compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "o")]) == 2
    assert "no evaluation records" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    assert main(["visualize", "compare", str(tmp_path / "b"), "--start", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "--start" in capsys.readouterr().err
