"""``marreid analyze cluster-weights``: the hybrid's weight chosen on held-out target training identities."""

from __future__ import annotations

import json

import pytest

from fakedata import make_market_tree, write_tiny_config
from marreid.analysis.clusterval import pick_weight, validate_cluster_weights
from marreid.cli import main
from marreid.config import load_config
from marreid.data.split import split_identities
from marreid.engine.checkpoint import load_checkpoint
from marreid.engine.extract import eval_transform, load_target, model_from_checkpoint, model_outputs
from marreid.losses.multilabel import log_soft_multilabel


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster_weights")
    make_market_tree(root / "aux", ids=5, cams=2, per_id=4, size=(32, 16), junk=0, distractors=0)
    make_market_tree(root / "tgt", ids=10, cams=3, per_id=6, size=(32, 16), seed=3)
    config = write_tiny_config(root / "tiny.yaml", root / "aux", root / "tgt")
    assert main(["pretrain", str(config), "--run-dir", str(root / "pre")]) == 0
    return root / "pre" / "last.pt"


def test_rows_are_the_validation_split_clustered_per_weight(checkpoint, tmp_path, capsys):
    args = ["analyze", "cluster-weights", str(checkpoint), "--weights", "0", "0.2", "--fraction", "0.5",
            "--set", "cc.k1=4", "--set", "cc.k2=2", "--set", "cc.min_samples=2", "--out", str(tmp_path)]
    assert main(args) == 0
    report = json.loads((tmp_path / "cluster_weights.json").read_text())

    cfg = load_config(checkpoint.parent / "config.yaml", ["cc.k1=4", "cc.k2=2", "cc.min_samples=2"])
    target = load_target(cfg)
    train, validation = split_identities(target.train, 0.5, cfg.train.seed)
    assert {s.pid for s in train}.isdisjoint({s.pid for s in validation})
    model = model_from_checkpoint(load_checkpoint(checkpoint), str(checkpoint), cfg)
    feats, logits = model_outputs(model, target.train, eval_transform(cfg), 64, 0, "cpu")
    index = [i for i, s in enumerate(target.train) if s in validation]
    expected = validate_cluster_weights(feats.numpy(), log_soft_multilabel(logits).exp().numpy(), index,
                                        [target.train[i].pid for i in index], [0.0, 0.2], k1=4, k2=2,
                                        eps=cfg.cc.eps, min_samples=2)
    assert report["images"] == len(validation) and report["identities"] == 5
    assert report["clustered_images"] == len(target.train)
    assert [r["weight"] for r in report["rows"]] == [0.0, 0.2]
    for got, want in zip(report["rows"], expected):
        for key in ("eps", "pair_precision", "pair_recall", "pair_f", "ari", "clusters", "outlier_share"):
            assert got[key] == pytest.approx(want[key], abs=1e-9), key
    assert report["best"]["weight"] == pick_weight(expected)
    assert f"cc.agreement_weight={report['best']['weight']:g}" in capsys.readouterr().out


def test_a_weight_at_or_above_one_minus_eps_is_refused(checkpoint, tmp_path, capsys):
    assert main(["analyze", "cluster-weights", str(checkpoint), "--weights", "0.4", "--out", str(tmp_path)]) != 0
    assert not (tmp_path / "cluster_weights.json").exists()
    err = capsys.readouterr().err
    assert "0.4" in err and len(err.strip().splitlines()) == 1
