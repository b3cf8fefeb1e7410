"""``marreid evaluate --rerank`` on a tiny generated dataset and a one-epoch pretrained checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fakedata import make_market_tree, write_tiny_config
from marreid.cli import main
from marreid.metrics import evaluate_rank_detailed
from marreid.metrics.rerank import rerank


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("rerank_cli")
    make_market_tree(root / "aux", ids=5, cams=2, per_id=4, size=(32, 16), junk=0, distractors=0)
    make_market_tree(root / "tgt", ids=6, cams=3, per_id=4, size=(32, 16), seed=3)
    config = write_tiny_config(root / "tiny.yaml", root / "aux", root / "tgt")
    assert main(["pretrain", str(config), "--run-dir", str(root / "pre")]) == 0
    return root / "pre" / "last.pt"


def _features(checkpoint, tmp_path, split):
    path = tmp_path / f"{split}.npz"
    assert main(["extract", str(checkpoint), "--split", split, "--out", str(path)]) == 0
    with np.load(path) as data:
        return data["feats"], data["pids"], data["camids"]


def test_rerank_reports_both_metric_sets(checkpoint, tmp_path, capsys):
    out = tmp_path / "m.json"
    assert main(["evaluate", str(checkpoint), "--rerank", "--ap-rule", "trapezoid", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "re-ranked (k1 20, k2 6, lambda 0.3)" in printed
    metrics = json.loads(out.read_text())
    assert set(metrics["rerank"]) == {"rank1", "rank5", "rank10", "mAP", "k1", "k2", "lambda"}
    assert (metrics["rerank"]["k1"], metrics["rerank"]["k2"], metrics["rerank"]["lambda"]) == (20, 6, 0.3)
    # The re-ranked numbers are those of the extracted features under the same AP rule.
    qf, q_pids, q_cams = _features(checkpoint, tmp_path, "query")
    gf, g_pids, g_cams = _features(checkpoint, tmp_path, "gallery")
    expected = evaluate_rank_detailed(rerank(qf, gf, 20, 6, 0.3), q_pids, g_pids, q_cams, g_cams,
                                      ap_rule="trapezoid")
    assert metrics["rerank"]["mAP"] == pytest.approx(expected.mAP, abs=1e-9)
    assert metrics["rerank"]["rank1"] == pytest.approx(expected.cmc[0], abs=1e-9)
    assert metrics["ap_rule"] == "trapezoid" and 0.0 <= metrics["mAP"] <= 1.0


def test_lambda_one_reproduces_the_plain_metrics(checkpoint, tmp_path):
    out = tmp_path / "m.json"
    # --lambda alone implies --rerank; lambda = 1 keeps only the original distance's order.
    assert main(["evaluate", str(checkpoint), "--lambda", "1", "--k1", "3", "--k2", "2", "--out", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert (metrics["rerank"]["k1"], metrics["rerank"]["k2"], metrics["rerank"]["lambda"]) == (3, 2, 1.0)
    for key in ("rank1", "rank5", "rank10", "mAP"):
        assert metrics["rerank"][key] == pytest.approx(metrics[key], abs=1e-12)


def test_without_rerank_there_is_no_rerank_entry(checkpoint, tmp_path):
    out = tmp_path / "m.json"
    assert main(["evaluate", str(checkpoint), "--out", str(out)]) == 0
    assert "rerank" not in json.loads(out.read_text())


def test_a_bad_lambda_is_refused(checkpoint, capsys):
    assert main(["evaluate", str(checkpoint), "--lambda", "1.5"]) == 2
    assert "eval.rerank_lambda" in capsys.readouterr().err
