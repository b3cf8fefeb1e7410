from __future__ import annotations

import numpy as np
import pytest
import torch

from marreid.errors import ConfigError, DatasetError
from marreid.metrics import (
    AP_RULES,
    compute_distance_matrix,
    evaluate_features,
    evaluate_rank,
    evaluate_rank_detailed,
)


def naive_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank, ap_rule):
    """One query at a time, straight from the protocol and the three AP definitions."""
    cmc_rows, aps = [], []
    for i in range(len(q_pids)):
        kept = [
            j
            for j in range(len(g_pids))
            if g_pids[j] != -1 and not (g_pids[j] == q_pids[i] and g_cams[j] == q_cams[i])
        ]
        kept.sort(key=lambda j: (dist[i][j], j))
        hit_ranks = [r for r, j in enumerate(kept, start=1) if g_pids[j] == q_pids[i]]
        if not hit_ranks:
            aps.append(float("nan"))
            continue
        cmc_rows.append([1.0 if hit_ranks[0] <= k else 0.0 for k in range(1, max_rank + 1)])
        total = 0.0
        for p, r in enumerate(hit_ranks, start=1):
            precision = p / r
            if ap_rule == "plain":
                total += precision
                continue
            if p == 1:
                before = 1.0 if (ap_rule == "mar-release" or r == 1) else 0.0
            else:
                before = (p - 1) / (r - 1)
            total += (before + precision) / 2
        aps.append(total / len(hit_ranks))
    aps = np.array(aps)
    return np.mean(cmc_rows, axis=0), float(np.nanmean(aps)), aps


def random_problem(seed: int, ties: bool, dtype=np.float64):
    rng = np.random.default_rng(seed)
    num_q, num_g = int(rng.integers(3, 25)), int(rng.integers(5, 70))
    if ties:
        dist = rng.integers(0, 4, (num_q, num_g)).astype(dtype)
    else:
        dist = rng.random((num_q, num_g)).astype(dtype)
    g_pids = rng.integers(-1, 6, num_g)
    q_pids = rng.integers(0, 7, num_q)
    g_cams, q_cams = rng.integers(0, 3, num_g), rng.integers(0, 3, num_q)
    return dist, q_pids, g_pids, q_cams, g_cams


@pytest.mark.parametrize("ap_rule", AP_RULES)
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matches_naive_loop_on_random_problems(ap_rule: str, ties: bool, dtype) -> None:
    compared = 0
    for seed in range(12):
        dist, q_pids, g_pids, q_cams, g_cams = random_problem(seed, ties, dtype)
        want_cmc, want_map, want_ap = naive_rank(dist, q_pids, g_pids, q_cams, g_cams, 10, ap_rule)
        if np.isnan(want_ap).all():
            continue
        got = evaluate_rank_detailed(
            dist, q_pids, g_pids, q_cams, g_cams, max_rank=10, ap_rule=ap_rule, chunk_size=seed % 4 + 1
        )
        np.testing.assert_allclose(got.cmc, want_cmc, atol=1e-12)
        assert got.mAP == pytest.approx(want_map, abs=1e-12)
        np.testing.assert_allclose(got.per_query_ap, want_ap, atol=1e-12)
        assert got.num_skipped_queries == int(np.isnan(want_ap).sum())
        assert got.num_valid_queries + got.num_skipped_queries == len(q_pids)
        assert got.ap_rule == ap_rule
        compared += 1
    assert compared >= 10


@pytest.mark.parametrize("ap_rule", AP_RULES)
def test_many_hits_per_query_match_naive_loop(ap_rule: str) -> None:
    # Over 128 hits per query takes the binary-search bucketing instead of comparison passes.
    rng = np.random.default_rng(7)
    dist = rng.integers(0, 30, (4, 400)).astype(np.float32)
    g_pids, q_pids = rng.integers(0, 2, 400), np.array([0, 1, 0, 1])
    g_cams, q_cams = rng.integers(0, 3, 400), np.array([0, 1, 2, 0])
    want_cmc, want_map, want_ap = naive_rank(dist, q_pids, g_pids, q_cams, g_cams, 50, ap_rule)
    got = evaluate_rank_detailed(dist, q_pids, g_pids, q_cams, g_cams, max_rank=50, ap_rule=ap_rule)
    np.testing.assert_allclose(got.cmc, want_cmc, atol=1e-12)
    np.testing.assert_allclose(got.per_query_ap, want_ap, atol=1e-12)


def first_hit_at_rank_three():
    # Query identity 1, camera 0. Ranked: 9 (d .1), 8 (d .2), 1 (d .3, hit), 7 (d .4), 1 (d .5, hit).
    dist = np.array([[0.3, 0.1, 0.5, 0.2, 0.4]])
    return dist, [1], [1, 9, 1, 8, 7], [0], [1, 1, 2, 1, 1]


def test_three_ap_rules_differ_when_first_hit_is_not_at_rank_one() -> None:
    # Hits at ranks 3 and 5.
    # plain:       (1/3 + 2/5) / 2                           = 11/30
    # trapezoid:   ((0 + 1/3)/2 + (1/4 + 2/5)/2) / 2          = 59/240
    # mar-release: ((1 + 1/3)/2 + (1/4 + 2/5)/2) / 2          = 119/240
    expected = {"plain": 11 / 30, "trapezoid": 59 / 240, "mar-release": 119 / 240}
    for ap_rule, want in expected.items():
        cmc, mAP = evaluate_rank(*first_hit_at_rank_three(), max_rank=5, ap_rule=ap_rule)
        assert mAP == pytest.approx(want, abs=1e-12), ap_rule
        np.testing.assert_array_equal(cmc, [0, 0, 1, 1, 1])


def test_trapezoid_and_release_agree_when_first_hit_is_at_rank_one() -> None:
    # Hits at ranks 1 and 3. plain (1 + 2/3)/2 = 5/6; both others ((1+1)/2 + (1/2 + 2/3)/2)/2 = 19/24.
    dist = np.array([[0.1, 0.2, 0.3]])
    args = (dist, [4], [4, 5, 4], [0], [1, 1, 1])
    assert evaluate_rank(*args, max_rank=3)[1] == pytest.approx(5 / 6, abs=1e-12)
    assert evaluate_rank(*args, max_rank=3, ap_rule="trapezoid")[1] == pytest.approx(19 / 24, abs=1e-12)
    assert evaluate_rank(*args, max_rank=3, ap_rule="mar-release")[1] == pytest.approx(19 / 24, abs=1e-12)


def test_junk_same_camera_matches_and_distractors() -> None:
    # Gallery: junk (closest), own identity from the query's camera, distractor 0, the true match.
    dist = np.array([[0.0, 0.1, 0.2, 0.3]])
    result = evaluate_rank_detailed(dist, [3], [-1, 3, 0, 3], [1], [0, 1, 2, 0], max_rank=3)
    # Junk and the same-camera match are ignored; the distractor comes first: the match is rank 2.
    np.testing.assert_array_equal(result.cmc, [0, 1, 1])
    assert result.mAP == pytest.approx(0.5)


def test_query_without_match_is_skipped_and_counted() -> None:
    dist = np.array([[0.2, 0.1, 0.3], [0.1, 0.2, 0.3], [0.3, 0.2, 0.1]])
    # Query 1 (identity 8) only has a same-camera image; query 2 (identity 9) none at all.
    result = evaluate_rank_detailed(dist, [5, 8, 9], [5, 8, 6], [0, 1, 0], [1, 1, 1], max_rank=3)
    assert (result.num_valid_queries, result.num_skipped_queries) == (1, 2)
    assert np.isnan(result.per_query_ap[1:]).all()
    # Query 0: the match (d .2) is behind identity 8 (d .1): rank 2, AP 1/2.
    assert result.per_query_ap[0] == pytest.approx(0.5)
    np.testing.assert_array_equal(result.cmc, [0, 1, 1])
    assert "AP rule: plain" in result.summary() and "2 skipped" in result.summary()


def test_junk_only_gallery_has_no_valid_query() -> None:
    with pytest.raises(DatasetError, match="no query has a valid gallery match"):
        evaluate_rank(np.zeros((2, 3)), [1, 2], [-1, -1, -1], [0, 0], [1, 1, 1])


def test_ties_go_to_the_lower_gallery_index() -> None:
    dist = np.array([[0.5, 0.5], [0.5, 0.5]])
    # Query 0's match is gallery 1 behind gallery 0 at the same distance; query 1's is gallery 0.
    result = evaluate_rank_detailed(dist, [1, 2], [2, 1], [0, 0], [1, 1], max_rank=2)
    np.testing.assert_allclose(result.per_query_ap, [0.5, 1.0])
    np.testing.assert_allclose(result.cmc, [0.5, 1.0])


def test_cmc_stays_flat_past_the_gallery_size() -> None:
    cmc, _ = evaluate_rank(np.array([[0.2, 0.1]]), [1], [1, 2], [0], [1, 1], max_rank=4)
    np.testing.assert_array_equal(cmc, [0, 1, 1, 1])


def test_memmap_and_tensor_distance_matrices(tmp_path) -> None:
    dist, q_pids, g_pids, q_cams, g_cams = random_problem(3, ties=True, dtype=np.float32)
    want = evaluate_rank_detailed(dist, q_pids, g_pids, q_cams, g_cams, max_rank=5)
    path = tmp_path / "dist.f32"
    dist.tofile(path)
    mapped = np.memmap(path, dtype=np.float32, mode="r", shape=dist.shape)
    from_map = evaluate_rank_detailed(mapped, q_pids, g_pids, q_cams, g_cams, max_rank=5, chunk_size=2)
    from_tensor = evaluate_rank_detailed(
        torch.from_numpy(dist), torch.from_numpy(q_pids), g_pids, q_cams, g_cams, max_rank=5
    )
    for got in (from_map, from_tensor):
        np.testing.assert_array_equal(got.cmc, want.cmc)
        assert got.mAP == want.mAP


def exact_features(rng: np.random.Generator, rows: int, metric: str) -> np.ndarray:
    """Features whose distances are computed exactly in float32, so ties are real ties in every path.

    Euclidean: small integers. Cosine: scaled signed axis vectors (unit rows are exact, cosines are 0 or +-1).
    """
    if metric == "euclidean":
        return rng.integers(-2, 3, (rows, 3)).astype(np.float32)
    feats = np.zeros((rows, 3), np.float32)
    feats[np.arange(rows), rng.integers(0, 3, rows)] = rng.choice([-3.0, -1.0, 2.0], rows)
    return feats


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_evaluate_features_matches_naive_loop(metric: str) -> None:
    rng = np.random.default_rng(5)
    qf, gf = exact_features(rng, 15, metric), exact_features(rng, 40, metric)
    q_pids, g_pids = rng.integers(0, 5, 15), rng.integers(-1, 5, 40)
    q_cams, g_cams = rng.integers(0, 2, 15), rng.integers(0, 2, 40)
    got = evaluate_features(qf, gf, q_pids, g_pids, q_cams, g_cams, metric=metric, max_rank=8, chunk_size=4)
    dist = compute_distance_matrix(qf.astype(np.float64), gf.astype(np.float64), metric=metric)
    want_cmc, want_map, _ = naive_rank(dist, q_pids, g_pids, q_cams, g_cams, 8, "plain")
    np.testing.assert_allclose(got.cmc, want_cmc, atol=1e-12)
    assert got.mAP == pytest.approx(want_map, abs=1e-12)


def test_bad_inputs_name_the_problem() -> None:
    dist = np.zeros((2, 3))
    ids = ([1, 2], [1, 2, 3], [0, 0], [1, 1, 1])
    with pytest.raises(ConfigError, match="ap_rule='map'.*plain, trapezoid, mar-release"):
        evaluate_rank(dist, *ids, ap_rule="map")
    with pytest.raises(DatasetError, match="g_pids must be 1-D with 3 entries"):
        evaluate_rank(dist, [1, 2], [1, 2], [0, 0], [1, 1, 1])
    with pytest.raises(DatasetError, match="q_camids must hold integers"):
        evaluate_rank(dist, [1, 2], [1, 2, 3], [0.5, 0.0], [1, 1, 1])
    with pytest.raises(DatasetError, match="NaN or infinite"):
        evaluate_rank(np.array([[0.0, np.nan, 1.0], [0.0, 0.0, 0.0]]), *ids)
    with pytest.raises(ConfigError, match="max_rank=0"):
        evaluate_rank(dist, *ids, max_rank=0)
    with pytest.raises(DatasetError, match="distmat must be a 2-D array"):
        evaluate_rank(np.zeros(3), *ids)
    with pytest.raises(DatasetError, match="gf has dimension 2"):
        evaluate_features(np.ones((2, 3)), np.ones((3, 2)), *ids)
