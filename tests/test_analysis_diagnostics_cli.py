"""``marreid analyze mining`` and ``analyze gradients`` end to end on tiny generated data."""

from __future__ import annotations

import json

import pytest
import torch

from fakedata import make_training_trees
from marreid.analysis.mining import closest_pairs
from marreid.cli import main
from marreid.config import load_config, save_config
from marreid.data import load_dataset
from marreid.engine.checkpoint import load_checkpoint
from marreid.engine.extract import load_target
from marreid.engine.logging import RunLogger
from marreid.engine.pretrain import load_auxiliary
from marreid.engine.train import MARTrainer


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A MAR checkpoint at step 0 (loss state initialised) of a tiny model, and its configuration file."""
    root = tmp_path_factory.mktemp("diagnostics")
    make_training_trees(root)
    cfg = load_config(None, [
        f"data.aux_root={root / 'aux'}", "data.aux_format=market1501",
        f"data.target_root={root / 'tgt'}", "data.target_format=market1501",
        "data.height=32", "data.width=16", "data.pad=2", "data.num_workers=0", "model.arch=tiny",
        "train.aux_batch=8", "train.target_batch=8", "mar.mining_ratio=0.1", "train.device=cpu",
        "train.progress=false", f"output.run_dir={root / 'mar'}",
    ])
    trainer = MARTrainer(cfg, load_auxiliary(cfg), load_target(cfg), cfg.output.run_dir,
                         logger=RunLogger(cfg.output.run_dir, enabled=False))
    trainer.initialize()
    checkpoint = trainer.save()
    save_config(cfg, root / "config.yaml")
    return {"root": root, "checkpoint": checkpoint, "config": root / "config.yaml", "cfg": cfg}


def test_mining_report_uses_the_checkpoint_threshold_and_every_training_image(run, tmp_path, capsys):
    assert main(["analyze", "mining", str(run["checkpoint"]), "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "mining.json").read_text())
    state = load_checkpoint(run["checkpoint"])
    assert report["threshold"] == pytest.approx(float(state["loss"]["threshold.threshold"]))
    train = load_dataset("market1501", run["root"] / "tgt").train
    assert report["images"] == len(train)
    n = len(train)
    assert report["mined"]["count"] == closest_pairs(torch.zeros(n, 1), 0.1).shape[0]
    assert report["mined_cross_camera"]["same_camera"] == 0.0
    assert "mined_cross_camera" in capsys.readouterr().out


def test_gradient_shares_are_written_per_batch_and_sum_to_one(run, tmp_path, capsys):
    assert main(["analyze", "gradients", str(run["checkpoint"]), "--batches", "2", "--out", str(tmp_path)]) == 0
    saved = json.loads((tmp_path / "gradients.json").read_text())
    assert len(saved["batches"]) == 2
    for batch in saved["batches"]:
        assert set(batch) == {"mdl", "cml", "al", "rj"}
        assert sum(term["along_total"] for term in batch.values()) == pytest.approx(1.0)
    assert "along total" in capsys.readouterr().out


def test_gradients_refuse_zero_batches(run, capsys):
    assert main(["analyze", "gradients", str(run["checkpoint"]), "--batches", "0"]) != 0
    assert "--batches" in capsys.readouterr().err
