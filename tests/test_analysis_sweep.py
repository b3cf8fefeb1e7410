"""``marreid analyze sweep``: one pretraining, one MAR run per value, the table equal to the runs' metrics."""

from __future__ import annotations

import csv
import json

import pytest
import yaml
from PIL import Image

from fakedata import make_market_tree, write_tiny_config
from marreid.analysis.sweep import check_values, run_label, sweepable_params, use_log_x, value_config
from marreid.cli import main
from marreid.config import Config, load_config
from marreid.engine.logging import read_log
from marreid.errors import ConfigError


def test_value_config_and_checks(tmp_path) -> None:
    cfg = value_config(Config(), "beta", 0.05, tmp_path / "b", tmp_path / "pre.pt")
    assert cfg.mar.beta == 0.05 and cfg.mar.mining_ratio == Config().mar.mining_ratio
    assert cfg.output.run_dir == str(tmp_path / "b") and cfg.train.pretrained_checkpoint == str(tmp_path / "pre.pt")
    with pytest.raises(ConfigError, match="mar.mining_ratio"):
        value_config(Config(), "mining_ratio", 2.0, tmp_path, tmp_path / "pre.pt")
    assert {"mining_ratio", "beta"} <= set(sweepable_params()) and "use_cml" not in sweepable_params()
    with pytest.raises(ConfigError, match="--param use_cml"):
        check_values("use_cml", [1.0])
    with pytest.raises(ConfigError, match="repeated"):
        check_values("beta", [0.1, 0.1])
    assert run_label("mining_ratio", 0.005) == "mining_ratio_0.005"
    assert use_log_x([0.001, 0.01]) and not use_log_x([0.1, 0.5]) and not use_log_x([0.0, 1.0])


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    make_market_tree(root / "aux", ids=4, cams=2, per_id=4, size=(32, 16), junk=0, distractors=0)
    make_market_tree(root / "tgt", ids=4, cams=3, per_id=4, size=(32, 16), seed=2)
    runs = root / "runs"
    config = write_tiny_config(root / "tiny.yaml", root / "aux", root / "tgt", mar={"mdl_start_epoch": 0},
                               output={"run_dir": str(runs / "mar"), "pretrain_dir": str(runs / "pre")})
    argv = ["analyze", "sweep", str(config), "--param", "beta", "--values", "0.5", "0.1"]
    assert main(argv) == 0
    return {"root": root, "config": config, "argv": argv, "out": root / "runs" / "sweep_beta"}


def test_one_pretraining_shared_by_every_value(sweep) -> None:
    # 16 auxiliary images in batches of 8 for one epoch: a second pretraining would append 2 more steps
    assert len(read_log(sweep["root"] / "runs" / "pre" / "log.jsonl", "step")) == 2
    for value in (0.1, 0.5):
        cfg = load_config(sweep["out"] / f"beta_{value:g}" / "config.yaml")
        assert cfg.mar.beta == value and cfg.mar.mining_ratio == 0.1
        assert cfg.train.pretrained_checkpoint == str(sweep["root"] / "runs" / "pre" / "last.pt")


def test_table_equals_each_runs_metrics(sweep) -> None:
    with (sweep["out"] / "sweep.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [float(r["value"]) for r in rows] == [0.1, 0.5]
    for row in rows:
        metrics = json.loads((sweep["out"] / f"beta_{float(row['value']):g}" / "metrics.json").read_text())
        for key in ("rank1", "rank5", "rank10", "mAP"):
            assert float(row[key]) == metrics[key]
        assert row["ap_rule"] == metrics["ap_rule"] == "plain" and row["param"] == "beta"
    with Image.open(sweep["out"] / "sweep.png") as img:
        assert img.size == (700, 450)


def test_rerun_reuses_finished_runs(sweep, capsys) -> None:
    log = sweep["out"] / "beta_0.1" / "log.jsonl"
    lines = log.read_text()
    assert main(sweep["argv"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("reusing the finished run") == 2 and "every run starts from" in printed
    assert log.read_text() == lines


def test_curves_of_a_real_run_equal_its_log(sweep) -> None:
    run = sweep["out"] / "beta_0.5"
    assert main(["visualize", "curves", str(run)]) == 0
    steps = read_log(run / "log.jsonl", "step")
    with (run / "curves_steps.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(steps) == 2
    for row, record in zip(rows, steps):
        for key in ("loss", "al", "rj", "cml", "mdl", "mined", "threshold", "lr"):
            assert float(row[key]) == record[key], key
    with (run / "curves_eval.csv").open(newline="") as fh:
        evals = list(csv.DictReader(fh))
    metrics = json.loads((run / "metrics.json").read_text())
    assert len(evals) == 1 and float(evals[0]["mAP"]) == metrics["mAP"]


def test_a_foreign_run_folder_is_not_overwritten(sweep, tmp_path, capsys) -> None:
    out = tmp_path / "sweep"
    (out / "beta_0.3").mkdir(parents=True)
    (out / "beta_0.3" / "config.yaml").write_text(yaml.safe_dump({"mar": {"beta": 0.9}}))
    assert main([*sweep["argv"][:5], "--values", "0.3", "--out", str(out)]) == 2
    assert "another configuration" in capsys.readouterr().err
