"""Choosing the hybrid's blend weight w on held-out target training identities.

For each candidate w the validation images are clustered as the hybrid clusters the target
each epoch, with DBSCAN on d = (1 - w) d_J + w (1 - A) (``metrics.cluster.blended_distance``),
and the clustering is scored against their identities. The identities come from a split of
the target *training* set (``data.split.split_identities``), never from the test set.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from marreid.errors import ConfigError
from marreid.metrics.cluster import blended_distance, clustering_scores, pseudo_labels
from marreid.metrics.rerank import k_reciprocal_jaccard


def validate_cluster_weights(
    features: np.ndarray,
    multilabels: np.ndarray,
    truth_pids: np.ndarray,
    weights: Sequence[float],
    k1: int = 30,
    k2: int = 6,
    eps: float = 0.6,
    min_samples: int = 4,
) -> list[dict]:
    """One row per weight: ``clustering_scores`` of the blended-distance DBSCAN, plus ``weight``.

    The Jaccard distance (k1, k2) is computed once, densely (the validation set is a fraction
    of the target's training images), and blended for each weight; every weight must be in
    [0, 1 - eps] (``blended_distance``).
    """
    if not weights:
        raise ConfigError("no blend weight to validate")
    jaccard = k_reciprocal_jaccard(features, k1, k2)
    rows = []
    for weight in weights:
        labels = pseudo_labels(blended_distance(jaccard, multilabels, weight, eps=eps), eps, min_samples)
        rows.append({"weight": float(weight), **clustering_scores(labels, truth_pids)})
    return rows


def pick_weight(rows: Sequence[dict], key: str = "pair_f") -> float:
    """The weight of the row with the largest ``key``; on a tie the smallest such weight (the least blending)."""
    if not rows:
        raise ConfigError("no validation rows to pick a weight from")
    if key not in rows[0]:
        raise ConfigError(f"key {key!r} is not a clustering score; one of {', '.join(sorted(rows[0]))}")
    best = max(rows, key=lambda row: (row[key], -row["weight"]))
    return best["weight"]


__all__ = ["pick_weight", "validate_cluster_weights"]
