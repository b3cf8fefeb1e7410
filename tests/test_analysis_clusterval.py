"""Choosing the hybrid's blend weight on held-out identities: the agreement term separates what features mix."""

from __future__ import annotations

import numpy as np
import pytest

from marreid.analysis.clusterval import pick_row, pick_weight, validate_cluster_weights
from marreid.errors import ConfigError
from marreid.metrics.cluster import clustering_scores


def mixed_identities(seed: int = 1, per: int = 12, dim: int = 8, agents: int = 6):
    """Identities 0 and 1 share one feature centre (their features are mixed); 2 and 3 have their own.

    Each identity's soft multilabel peaks on its own reference agent, so the agreement tells
    0 from 1 where the features cannot.
    """
    rng = np.random.default_rng(seed)
    centres = 4.0 * rng.normal(size=(3, dim))
    pids = np.repeat(np.arange(4), per)
    features = centres[np.array([0, 0, 1, 2])[pids]] + rng.normal(size=(len(pids), dim))
    logits = 8.0 * np.eye(agents)[pids] + 0.3 * rng.normal(size=(len(pids), agents))
    y = np.exp(logits)
    return features.astype(np.float32), (y / y.sum(1, keepdims=True)).astype(np.float32), pids


def test_the_agreement_term_helps_and_is_picked():
    features, multilabels, pids = mixed_identities()
    everything = np.arange(len(pids))
    rows = validate_cluster_weights(features, multilabels, everything, pids, [0.0, 0.2, 0.35], k1=6, k2=1,
                                    min_samples=4)
    assert [row["weight"] for row in rows] == [0.0, 0.2, 0.35]
    assert set(rows[0]) == {"eps", "weight", *clustering_scores(np.zeros(1), np.zeros(1))}
    scores = [row["pair_f"] for row in rows]
    assert scores[0] < 0.6 < 0.9 < scores[2]
    assert scores[0] < scores[1] < scores[2]
    assert pick_weight(rows) == 0.35


def test_pick_weight_takes_the_smallest_weight_on_a_tie_and_other_keys():
    rows = [{"weight": 0.0, "pair_f": 0.5, "nmi": 0.9}, {"weight": 0.1, "pair_f": 0.7, "nmi": 0.8},
            {"weight": 0.2, "pair_f": 0.7, "nmi": 0.1}]
    assert pick_weight(rows) == 0.1
    assert pick_weight(rows, key="nmi") == 0.0
    with pytest.raises(ConfigError, match="not a clustering score"):
        pick_weight(rows, key="rank1")
    with pytest.raises(ConfigError, match="no validation rows"):
        pick_weight([])


def test_no_weight_is_an_error():
    features, multilabels, pids = mixed_identities()
    with pytest.raises(ConfigError, match="no blend weight"):
        validate_cluster_weights(features, multilabels, np.arange(len(pids)), pids, [])


def test_only_the_held_out_rows_are_scored_but_all_rows_are_clustered():
    features, multilabels, pids = mixed_identities()
    held_out = np.flatnonzero(np.isin(pids, [0, 2]))
    rows = validate_cluster_weights(features, multilabels, held_out, pids[held_out], [0.0, 0.35], k1=6, k2=1,
                                    min_samples=4)
    # by hand: the same clusterings of all rows, scored on the held-out rows
    from marreid.metrics.cluster import blended_distance, pseudo_labels
    from marreid.metrics.rerank import k_reciprocal_jaccard

    jaccard = k_reciprocal_jaccard(features, 6, 1)
    for row, weight in zip(rows, (0.0, 0.35)):
        labels = pseudo_labels(blended_distance(jaccard, multilabels, weight) if weight else jaccard, 0.6, 4)
        expected = clustering_scores(labels[held_out], pids[held_out])
        for key, value in expected.items():
            assert row[key] == pytest.approx(value), key
    # identity 0 shares its feature centre with 1, which is not held out: without the agreement the
    # held-out pairs still look fine (0 and 2 are apart), so recall is what the blend changes
    assert rows[0]["identities"] == 2


def test_several_radii_share_one_jaccard_and_the_best_row_is_picked():
    features, multilabels, pids = mixed_identities()
    everything = np.arange(len(pids))
    rows = validate_cluster_weights(features, multilabels, everything, pids, [0.0, 0.2], k1=6, k2=1,
                                    eps=[0.3, 0.6], min_samples=4)
    assert [(r["eps"], r["weight"]) for r in rows] == [(0.3, 0.0), (0.3, 0.2), (0.6, 0.0), (0.6, 0.2)]
    for radius in (0.3, 0.6):  # each radius alone gives the same rows
        alone = validate_cluster_weights(features, multilabels, everything, pids, [0.0, 0.2], k1=6, k2=1,
                                         eps=radius, min_samples=4)
        assert [r for r in rows if r["eps"] == radius] == alone
    best = pick_row(rows)
    assert best["pair_f"] == max(r["pair_f"] for r in rows)
