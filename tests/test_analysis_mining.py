"""The whole-set mining diagnostic against brute-force loops written from its definitions."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from marreid.analysis.mining import closest_pairs, mining_report, rank_auc
from marreid.errors import DatasetError
from marreid.losses.multilabel import top_count


def naive_auc(scores, positive) -> float:
    pos = [s for s, p in zip(scores, positive) if p]
    neg = [s for s, p in zip(scores, positive) if not p]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


def test_rank_auc_matches_the_pair_count_with_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 6, 40).astype(float)  # many ties
    positive = rng.random(40) < 0.3
    assert rank_auc(scores, positive) == pytest.approx(naive_auc(scores, positive))
    assert rank_auc(np.array([3.0, 1.0, 2.0]), np.array([False, True, False])) == 0.0
    assert rank_auc(np.array([1.0, 2.0]), np.array([True, True])) is None


def brute_closest(feat, ratio, camids=None):
    n = len(feat)
    pairs = [(i, j) for i, j in itertools.combinations(range(n), 2) if camids is None or camids[i] != camids[j]]
    d2 = [float(((feat[i] - feat[j]) ** 2).sum()) for i, j in pairs]
    order = sorted(range(len(pairs)), key=lambda t: d2[t])
    return [pairs[t] for t in order[: top_count(len(pairs), ratio)]]


@pytest.mark.parametrize("chunk", [4, 1024])
@pytest.mark.parametrize("cross", [False, True])
def test_closest_pairs_match_brute_force(chunk, cross):
    torch.manual_seed(1)
    feat = torch.randn(23, 5)
    camids = torch.randint(0, 3, (23,))
    got = closest_pairs(feat, 0.07, camids if cross else None, chunk=chunk)
    want = brute_closest(feat.double(), 0.07, camids.tolist() if cross else None)
    assert [tuple(p) for p in got.tolist()] == want


def test_single_camera_has_no_cross_camera_pairs():
    with pytest.raises(DatasetError, match="no pairs"):
        closest_pairs(torch.randn(5, 3), 0.1, torch.zeros(5, dtype=torch.long))


def test_mining_report_by_hand():
    # four images, two people seen by two cameras; image 1 is a near copy of image 0 (same camera),
    # image 2 (same person as 0, other camera) and image 3 lie farther away
    feat = torch.tensor([[0.0, 0.0], [0.1, 0.0], [1.0, 0.0], [3.0, 0.0]])
    y = torch.tensor([[0.8, 0.2], [0.7, 0.3], [0.6, 0.4], [0.1, 0.9]])
    pids, camids = [0, 1, 0, 1], [0, 0, 1, 1]
    report = mining_report(feat, y, pids, camids, ratio=0.5, threshold=0.75)
    assert report["base_rate"] == pytest.approx(2 / 6)
    # all pairs by distance: (0,1) .01, (1,2) .81, (0,2) 1, ...; top ceil(0.5*6) = 3
    mined = report["mined"]
    assert mined["count"] == 3
    assert mined["precision"] == pytest.approx(1 / 3)           # only (0,2) is one person
    assert mined["same_camera"] == pytest.approx(1 / 3)         # (0,1)
    # agreements: (0,1) 0.9, (1,2) 0.9, (0,2) 0.8 -> all above 0.75
    assert mined["positives"] == 3 and mined["positive_precision"] == pytest.approx(1 / 3)
    # agreement ties (0.9, 0.9) for the two false pairs, 0.8 for the true one -> AUC 0
    assert mined["agreement_auc"] == 0.0
    assert mined["feature_auc"] == 0.0                          # the true pair is the farthest of the three
    # cross-camera pairs (0,2) 1, (0,3) 9, (1,2) .81, (1,3) 8.41: top ceil(0.5*4) = 2 -> (1,2), (0,2)
    cross = report["mined_cross_camera"]
    assert cross["count"] == 2 and cross["same_camera"] == 0.0
    assert cross["precision"] == pytest.approx(0.5)


def test_default_threshold_is_the_top_quantile_of_all_agreements():
    torch.manual_seed(2)
    y = torch.softmax(torch.randn(12, 4), 1)
    report = mining_report(torch.randn(12, 3), y, list(range(6)) * 2, [0, 1] * 6, ratio=0.1)
    agreements = sorted((float(1 - (y[i] - y[j]).abs().sum() / 2) for i, j in itertools.combinations(range(12), 2)),
                        reverse=True)
    assert report["threshold"] == pytest.approx(agreements[top_count(66, 0.1) - 1], abs=1e-6)
