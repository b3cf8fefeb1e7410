"""k-reciprocal Jaccard distance and re-ranking against loops written from Zhong et al. (CVPR 2017)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from marreid.errors import ConfigError, DatasetError
from marreid.metrics import evaluate_rank
from marreid.metrics.rerank import k_reciprocal_jaccard, rerank


def naive_encoding(x, k1, k2, normalise_rows):
    """V after query expansion, one point at a time, straight from Eq. 2-5, 8 and 11.

    Returns the list of V rows and how many candidate sets R(q, k1/2) were accepted and added
    a point that R(p, k1) lacked (so a test can check that Eq. 5 did something).
    """
    x = [[v / math.sqrt(sum(u * u for u in row)) for v in row] for row in np.asarray(x, dtype=np.float64).tolist()]
    n = len(x)
    d = [[sum((a - b) ** 2 for a, b in zip(x[p], x[g])) for g in range(n)] for p in range(n)]
    if normalise_rows:
        d = [[v / max(row) for v in row] for row in d]
    ranking = [sorted(range(n), key=lambda g, p=p: (g != p, d[p][g], g)) for p in range(n)]

    def nearest(p, k):  # N(p, k): p and the k points after it
        return set(ranking[p][: k + 1])

    def reciprocal(p, k):  # R(p, k), Eq. 4
        return {g for g in nearest(p, k) if p in nearest(g, k)}

    half = round(k1 / 2)  # Python's round is half to even, like np.around
    rows, added = [], 0
    for p in range(n):
        r = reciprocal(p, k1)
        r_star = set(r)
        for q in r:
            candidate = reciprocal(q, half)
            if len(candidate & r) > 2 / 3 * len(candidate):
                added += bool(candidate - r_star)
                r_star |= candidate
        weights = {g: math.exp(-d[p][g]) for g in r_star}
        total = sum(weights.values())
        rows.append([weights.get(g, 0.0) / total for g in range(n)])
    expanded = []
    for p in range(n):
        members = ranking[p][:k2]
        expanded.append([sum(rows[g][j] for g in members) / len(members) for j in range(n)])
    return expanded, d, added


def naive_jaccard(vp, vg):
    """Eq. 10 for two vectors."""
    return 1.0 - sum(min(a, b) for a, b in zip(vp, vg)) / sum(max(a, b) for a, b in zip(vp, vg))


def clustered(n, dim, centres, seed, spread=0.6):
    """Points around a few centres, so reciprocal neighbourhoods are neither empty nor everything."""
    rng = np.random.default_rng(seed)
    mids = rng.standard_normal((centres, dim))
    return mids[rng.integers(0, centres, n)] + spread * rng.standard_normal((n, dim))


@pytest.mark.parametrize("n, k1, k2, seed", [(16, 4, 3, 0), (18, 5, 1, 1), (20, 6, 4, 2), (12, 7, 2, 3)])
def test_jaccard_equals_the_paper_loop(n, k1, k2, seed):
    x = clustered(n, 5, 3, seed)
    expanded, _, _ = naive_encoding(x, k1, k2, normalise_rows=False)
    expected = np.array([[naive_jaccard(expanded[p], expanded[g]) for g in range(n)] for p in range(n)])
    got = k_reciprocal_jaccard(x, k1, k2)
    assert got.shape == (n, n) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)
    # The oracle's distances are not all 1 or 0: the test compares real overlaps.
    assert ((expected > 0.05) & (expected < 0.95)).sum() > n


def test_the_candidate_expansion_is_exercised():
    x = clustered(20, 5, 3, 2)
    _, _, added = naive_encoding(x, 6, 4, normalise_rows=False)
    assert added > 0


def test_float32_features_agree_with_the_loop():
    x = clustered(16, 5, 3, 4).astype(np.float32)
    expanded, _, _ = naive_encoding(x, 5, 3, normalise_rows=False)
    expected = np.array([[naive_jaccard(a, b) for b in expanded] for a in expanded])
    np.testing.assert_allclose(k_reciprocal_jaccard(torch.from_numpy(x), 5, 3), expected, atol=1e-5, rtol=0)


def test_jaccard_properties():
    x = clustered(60, 8, 4, 5)
    d = k_reciprocal_jaccard(x, 8, 3)
    assert np.all(np.diag(d) == 0.0)
    np.testing.assert_allclose(d, d.T, atol=1e-7, rtol=0)
    assert d.min() >= 0.0 and d.max() == 1.0  # 1 exactly for pairs whose vectors share no point
    # Normalising the rows first changes nothing: the distance reads only directions.
    np.testing.assert_allclose(d, k_reciprocal_jaccard(3.0 * x, 8, 3), atol=1e-7, rtol=0)


def test_two_far_groups_are_at_distance_one():
    rng = np.random.default_rng(6)
    a = np.array([1.0, 0.0, 0.0]) + 0.05 * rng.standard_normal((8, 3))
    b = np.array([0.0, 0.0, 1.0]) + 0.05 * rng.standard_normal((8, 3))
    d = k_reciprocal_jaccard(np.concatenate([a, b]), k1=4, k2=2)
    assert np.all(d[:8, 8:] == 1.0) and np.all(d[:8, :8] < 1.0) and np.all(d[8:, 8:] < 1.0)


@pytest.mark.parametrize("chunk_size", [1, 2, 7])
def test_chunked_equals_unchunked(chunk_size):
    x = clustered(40, 6, 4, 7)
    np.testing.assert_allclose(k_reciprocal_jaccard(x, 6, 3, chunk_size=chunk_size),
                               k_reciprocal_jaccard(x, 6, 3), atol=1e-7, rtol=0)
    q, g = x[:9], x[9:]
    np.testing.assert_allclose(rerank(q, g, 6, 3, 0.3, chunk_size=chunk_size), rerank(q, g, 6, 3, 0.3),
                               atol=1e-7, rtol=0)


def test_sparse_output_holds_exactly_the_close_pairs():
    x = clustered(50, 6, 4, 8)
    dense = k_reciprocal_jaccard(x, 6, 3)
    close = k_reciprocal_jaccard(x, 6, 3, max_distance=0.6, chunk_size=5)
    assert sp.issparse(close) and close.shape == dense.shape
    assert close.nnz == int((dense <= 0.6).sum())  # the diagonal's zeros are stored too
    kept = np.zeros(dense.shape, bool)
    kept[close.tocoo().row, close.tocoo().col] = True
    np.testing.assert_array_equal(kept, dense <= 0.6)
    np.testing.assert_array_equal(close.toarray()[kept], dense[kept])


def test_dbscan_clusters_the_same_on_dense_and_sparse():
    cluster = pytest.importorskip("sklearn.cluster")
    x = clustered(80, 6, 5, 9, spread=0.3)
    dense = k_reciprocal_jaccard(x, 8, 3)
    close = k_reciprocal_jaccard(x, 8, 3, max_distance=0.6)
    on_dense = cluster.DBSCAN(eps=0.6, min_samples=4, metric="precomputed").fit_predict(dense)
    on_sparse = cluster.DBSCAN(eps=0.6, min_samples=4, metric="precomputed").fit_predict(close)
    np.testing.assert_array_equal(on_dense, on_sparse)
    assert on_dense.max() >= 1  # more than one cluster found


@pytest.mark.parametrize("lambda_value", [0.0, 0.3, 1.0])
def test_rerank_equals_the_paper_loop(lambda_value):
    x = clustered(18, 5, 3, 10)
    num_q = 5
    expanded, d, _ = naive_encoding(x, 6, 3, normalise_rows=True)
    expected = np.array([
        [(1 - lambda_value) * naive_jaccard(expanded[p], expanded[g]) + lambda_value * d[p][g]
         for g in range(num_q, len(x))]
        for p in range(num_q)
    ])
    got = rerank(x[:num_q], x[num_q:], k1=6, k2=3, lambda_value=lambda_value)
    assert got.shape == (num_q, len(x) - num_q) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("k2", [1, 6])
def test_rerank_moves_a_true_match_up(k2):
    """In a plane tangent to the sphere: the query at 0, identity A's four images around
    (-1.2, 0), one image of identity B at (1, 0), just nearer the query than any of A's, and
    B's eight others around (1.6, 0). The query is among the 5 nearest of A's images, so they
    are its k-reciprocal neighbours; the B image's 5 nearest are B's, so it is not, its vector
    shares nothing with the query's and re-ranking puts A's images first."""
    rng = np.random.default_rng(11)

    def lift(plane):
        out = np.zeros((len(plane), 8))
        out[:, 0], out[:, 1:3] = 1.0, 0.1 * np.asarray(plane)
        return out

    group_a = np.array([-1.2, 0.0]) + 0.15 * rng.standard_normal((4, 2))
    group_b = np.array([1.6, 0.0]) + 0.2 * rng.standard_normal((8, 2))
    q = lift([[0.0, 0.0]])
    gallery = lift(np.concatenate([group_a, [[1.0, 0.0]], group_b]))
    g_pids = np.array([0] * 4 + [1] * 9)
    g_cams = np.ones(13, np.int64)
    plain = ((q - gallery) ** 2).sum(1)[None, :]
    assert np.argmin(plain[0]) == 4  # B's image wins on the plain distance
    reranked = rerank(q, gallery, k1=5, k2=k2, lambda_value=0.3)
    assert reranked[0, 4] > reranked[0, :4].max()  # after re-ranking, behind all of A's
    cmc_plain, map_plain = evaluate_rank(plain, [0], g_pids, [0], g_cams, max_rank=5)
    cmc_rerank, map_rerank = evaluate_rank(reranked, [0], g_pids, [0], g_cams, max_rank=5)
    assert cmc_plain[0] == 0.0 and cmc_rerank[0] == 1.0 and map_rerank == 1.0 > map_plain


def test_lambda_one_ranks_as_the_plain_distance():
    x = clustered(30, 6, 3, 12)
    q, g = x[:6], x[6:]
    qn, gn = (v / np.linalg.norm(v, axis=1, keepdims=True) for v in (q, g))
    plain_order = np.argsort(1.0 - qn @ gn.T, axis=1, kind="stable")
    np.testing.assert_array_equal(np.argsort(rerank(q, g, 6, 3, 1.0), axis=1, kind="stable"), plain_order)


def test_bad_arguments_are_refused():
    x = clustered(10, 4, 2, 13)
    with pytest.raises(ConfigError):
        rerank(x[:3], x[3:], lambda_value=1.5)
    with pytest.raises(ConfigError):
        k_reciprocal_jaccard(x, k1=0)
    with pytest.raises(ConfigError):
        k_reciprocal_jaccard(x, max_distance=-0.1)
    with pytest.raises(DatasetError):
        rerank(x[:0], x)
    with pytest.raises(DatasetError):
        k_reciprocal_jaccard(np.full((4, 3), np.nan))


def test_more_neighbours_than_points():
    x = clustered(6, 4, 2, 14)
    expanded, _, _ = naive_encoding(x, 20, 10, normalise_rows=False)
    expected = np.array([[naive_jaccard(a, b) for b in expanded] for a in expanded])
    np.testing.assert_allclose(k_reciprocal_jaccard(x, 20, 10), expected, atol=1e-6, rtol=0)
