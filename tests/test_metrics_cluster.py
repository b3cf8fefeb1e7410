"""Pseudo labels (DBSCAN), cluster centres, the hybrid's blended distance and clustering scores, against loops."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from marreid.errors import ConfigError, DatasetError
from marreid.losses.multilabel import pair_agreements
from marreid.metrics.cluster import (
    agreement_distance,
    blend_cutoff,
    blended_distance,
    cluster_centres,
    clustering_scores,
    pseudo_labels,
)
from marreid.metrics.rerank import k_reciprocal_jaccard


def distances_from(groups: dict[tuple[int, int], float], n: int) -> np.ndarray:
    """An [n, n] float32 matrix of 1.0 with the listed symmetric pairs set and a zero diagonal."""
    d = np.ones((n, n), np.float32)
    np.fill_diagonal(d, 0.0)
    for (i, j), value in groups.items():
        d[i, j] = d[j, i] = value
    return d


def hand_example() -> tuple[np.ndarray, np.ndarray]:
    """Point 0 is a border point of cluster {4, 5, 6} (close to 4 only); {1, 2, 3} is a cluster; 7 is alone.

    With eps 0.5 and min_samples 3 the cores are 1..6 (3 neighbours each, themselves included;
    4 has 4) and 0 has 2. DBSCAN meets core 1 before core 4, so its own numbering is
    [1, 0, 0, 0, 1, 1, 1, -1]; by first appearance the cluster of point 0 is 0.
    """
    pairs = {(1, 2): 0.2, (1, 3): 0.3, (2, 3): 0.4, (4, 5): 0.1, (4, 6): 0.5, (5, 6): 0.45, (0, 4): 0.5, (0, 5): 0.7}
    return distances_from(pairs, 8), np.array([0, 1, 1, 1, 0, 0, 0, -1])


def test_pseudo_labels_on_a_hand_example_dense_and_sparse():
    dense, expected = hand_example()
    labels = pseudo_labels(dense, eps=0.5, min_samples=3)
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(labels, expected)
    # Sparse: only the pairs within eps, no diagonal stored.
    kept = np.where((dense <= 0.5) & ~np.eye(8, dtype=bool), dense, 0.0)
    sparse = sp.csr_matrix(kept)
    assert sparse.diagonal().sum() == 0 and sparse.nnz == 14
    np.testing.assert_array_equal(pseudo_labels(sparse, eps=0.5, min_samples=3), expected)
    assert sparse.nnz == 14  # the input is left alone


def test_sparse_explicit_zero_off_the_diagonal_is_a_neighbour():
    # Points 0, 1, 2 coincide (distance 0, stored explicitly); 3 is alone.
    rows, cols = np.array([0, 1, 0, 2, 1, 2]), np.array([1, 0, 2, 0, 2, 1])
    sparse = sp.csr_matrix((np.zeros(6, np.float32), (rows, cols)), shape=(4, 4))
    assert sparse.nnz == 6
    np.testing.assert_array_equal(pseudo_labels(sparse, eps=0.1, min_samples=3), [0, 0, 0, -1])


@pytest.mark.parametrize("seed", range(4))
def test_sparse_with_the_pairs_within_eps_equals_dense(seed):
    rng = np.random.default_rng(seed)
    points = rng.normal(size=(40, 2)) + rng.integers(0, 4, 40)[:, None] * 3.0
    dense = np.sqrt(((points[:, None] - points[None]) ** 2).sum(-1)).astype(np.float32)
    eps = 0.9
    rows, cols = np.nonzero(dense <= eps)
    sparse = sp.csr_matrix((dense[rows, cols], (rows, cols)), shape=dense.shape)
    expected = pseudo_labels(dense, eps, 4)
    assert expected.max() >= 1 and (expected == -1).any()
    np.testing.assert_array_equal(pseudo_labels(sparse, eps, 4), expected)


def test_pseudo_labels_validation():
    with pytest.raises(DatasetError, match="square"):
        pseudo_labels(np.zeros((3, 4)))
    with pytest.raises(ConfigError, match="eps"):
        pseudo_labels(np.zeros((3, 3)), eps=0.0)
    with pytest.raises(ConfigError, match="min_samples"):
        pseudo_labels(np.zeros((3, 3)), min_samples=0)
    assert pseudo_labels(np.zeros((0, 0))).shape == (0,)


def test_cluster_centres_are_normalised_means():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(10, 6)).astype(np.float32)
    labels = np.array([1, 0, -1, 1, 2, 0, 2, -1, 1, 0])
    got = cluster_centres(features, labels)
    assert got.dtype == torch.float32 and got.shape == (3, 6)
    for k in range(3):
        mean = np.mean([features[i].astype(np.float64) for i in range(10) if labels[i] == k], axis=0)
        np.testing.assert_allclose(got[k].numpy(), mean / np.linalg.norm(mean), rtol=1e-6)
    torch.testing.assert_close(cluster_centres(torch.from_numpy(features), torch.from_numpy(labels)), got)
    with pytest.raises(DatasetError, match="non-empty"):
        cluster_centres(features, np.array([0, 2, 2, 0, 0, 0, 0, 0, 0, 0]))
    with pytest.raises(DatasetError, match="every point is an outlier"):
        cluster_centres(features, np.full(10, -1))


def soft(rng: np.random.Generator, n: int, k: int, scale: float = 3.0) -> np.ndarray:
    logits = scale * rng.normal(size=(n, k))
    y = np.exp(logits - logits.max(1, keepdims=True))
    return (y / y.sum(1, keepdims=True)).astype(np.float32)


def test_agreement_distance_is_one_minus_pair_agreements():
    y = soft(np.random.default_rng(1), 9, 7)
    rows, cols = np.triu_indices(9, 1)
    expected = 1.0 - pair_agreements(torch.from_numpy(y).double()).numpy()
    got = agreement_distance(y, rows, cols)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-6)
    # Eq. 2 as written, sum_k min(y_i^k, y_j^k), on a few pairs in any order.
    for i, j in [(0, 0), (3, 1), (8, 2)]:
        assert agreement_distance(y, [i], [j])[0] == pytest.approx(1.0 - np.minimum(y[i], y[j]).sum(), abs=1e-6)


def test_agreement_distance_validation():
    y = soft(np.random.default_rng(2), 4, 3)
    with pytest.raises(DatasetError, match="outside"):
        agreement_distance(y, [0], [4])
    with pytest.raises(DatasetError, match="equal-length"):
        agreement_distance(y, [0, 1], [2])
    with pytest.raises(DatasetError, match="sum to 1"):
        agreement_distance(2 * y, [0], [1])


def naive_blend(jaccard: np.ndarray, y: np.ndarray, w: float, eps: float) -> np.ndarray:
    """(1 - w) d_J + w (1 - sum_k min(y_i^k, y_j^k)) where d_J <= eps / (1 - w), else d_J, pair by pair."""
    n = len(jaccard)
    out = np.array(jaccard, np.float64)
    for i in range(n):
        for j in range(n):
            if jaccard[i, j] <= eps / (1 - w):
                out[i, j] = (1 - w) * jaccard[i, j] + w * (1.0 - np.minimum(y[i], y[j]).sum())
    return out


@pytest.fixture
def jaccard_problem():
    rng = np.random.default_rng(3)
    features = rng.normal(size=(24, 8)) + np.repeat(rng.normal(size=(4, 8)) * 1.5, 6, axis=0)
    jaccard = k_reciprocal_jaccard(features, k1=6, k2=2)
    # Pairs on both sides of every cutoff eps / (1 - w) tried below (0.6 .. 0.98), and pairs sharing nothing.
    assert (jaccard == 1.0).mean() > 0.3 and ((jaccard > 0.6) & (jaccard < 0.86)).sum() > 50
    assert ((jaccard > 0.98) & (jaccard < 1.0)).any()
    return features, jaccard, soft(rng, 24, 5)


@pytest.mark.parametrize("weight, eps", [(0.0, 0.6), (0.25, 0.6), (0.39, 0.6), (0.2, 0.5)])
def test_blended_distance_matches_a_double_loop(jaccard_problem, weight, eps):
    features, jaccard, y = jaccard_problem
    got = blended_distance(jaccard, y, weight, eps=eps)
    assert got.dtype == np.float32 and got.shape == jaccard.shape
    np.testing.assert_allclose(got, naive_blend(jaccard, y, weight, eps), atol=1e-6)
    if weight == 0.0:
        np.testing.assert_array_equal(got, jaccard)
    # Sparse: the pairs with d_J <= eps / (1 - w) stored, blended; the others stay missing.
    cutoff = blend_cutoff(weight, eps)
    assert cutoff == pytest.approx(eps / (1 - weight))
    sparse = blended_distance(k_reciprocal_jaccard(features, 6, 2, max_distance=cutoff), y, weight, eps=eps)
    stored = jaccard <= cutoff
    assert sp.issparse(sparse) and sparse.nnz == int(stored.sum())
    np.testing.assert_allclose(sparse.toarray()[stored], got[stored], atol=1e-6)


@pytest.mark.parametrize("min_samples", [2, 4])
def test_blended_neighbourhoods_equal_the_exact_blend(jaccard_problem, min_samples):
    features, jaccard, y = jaccard_problem
    # The exact blend takes the agreement of every pair.
    rows, cols = np.indices(jaccard.shape).reshape(2, -1)
    agree = agreement_distance(y, rows, cols).reshape(jaccard.shape)
    changed = False
    for weight in (0.1, 0.3, 0.39):
        exact = pseudo_labels(((1 - weight) * jaccard + weight * agree).astype(np.float32), 0.6, min_samples)
        np.testing.assert_array_equal(pseudo_labels(blended_distance(jaccard, y, weight), 0.6, min_samples), exact)
        sparse = k_reciprocal_jaccard(features, 6, 2, max_distance=blend_cutoff(weight))
        np.testing.assert_array_equal(pseudo_labels(blended_distance(sparse, y, weight), 0.6, min_samples), exact)
        changed |= not np.array_equal(exact, pseudo_labels(jaccard, 0.6, min_samples))
    assert changed


def test_blend_weight_must_stay_below_one_minus_eps(jaccard_problem):
    _, jaccard, y = jaccard_problem
    for weight, eps in ((0.4, 0.6), (0.5, 0.5), (-0.1, 0.6)):
        with pytest.raises(ConfigError, match=r"must be in \[0, 1 - eps\)") as info:
            blended_distance(jaccard, y, weight, eps=eps)
        assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="eps"):
        blend_cutoff(0.1, eps=1.0)
    with pytest.raises(DatasetError, match=r"\[24, K\]"):
        blended_distance(jaccard, y[:5], 0.1)


def naive_pair_scores(pred, truth):
    together = same = both = 0
    for i in range(len(pred)):
        for j in range(i + 1, len(pred)):
            joined = pred[i] != -1 and pred[i] == pred[j]
            together += joined
            same += truth[i] == truth[j]
            both += joined and truth[i] == truth[j]
    return both / together, both / same


def test_clustering_scores_against_a_double_loop():
    rng = np.random.default_rng(4)
    truth = rng.integers(0, 5, 40)
    pred = np.where(rng.random(40) < 0.2, -1, (truth + (rng.random(40) < 0.3)) % 5)
    scores = clustering_scores(pred, truth)
    precision, recall = naive_pair_scores(pred.tolist(), truth.tolist())
    assert scores["pair_precision"] == pytest.approx(precision, abs=1e-12)
    assert scores["pair_recall"] == pytest.approx(recall, abs=1e-12)
    assert scores["pair_f"] == pytest.approx(2 * precision * recall / (precision + recall), abs=1e-12)
    singletons = pred.copy()
    singletons[pred == -1] = 100 + np.arange((pred == -1).sum())
    assert scores["ari"] == pytest.approx(adjusted_rand_score(truth, singletons))
    assert scores["nmi"] == pytest.approx(normalized_mutual_info_score(truth, singletons))
    assert scores["clusters"] == len(set(pred[pred >= 0].tolist()))
    assert scores["identities"] == 5
    assert scores["outlier_share"] == pytest.approx((pred == -1).mean())


def test_clustering_scores_extremes():
    truth = np.array([7, 7, 3, 3, 3])
    perfect = clustering_scores(np.array([1, 1, 0, 0, 0]), truth)
    assert perfect["pair_f"] == perfect["ari"] == perfect["nmi"] == pytest.approx(1.0)
    nothing = clustering_scores(np.full(5, -1), truth)
    assert nothing["pair_precision"] == nothing["pair_f"] == 0.0 and nothing["outlier_share"] == 1.0
    assert nothing["clusters"] == 0
    # Outliers pair with nothing: two outliers of one identity are no predicted pair.
    assert clustering_scores(np.array([-1, -1, 0, 0, 0]), truth)["pair_precision"] == 1.0
