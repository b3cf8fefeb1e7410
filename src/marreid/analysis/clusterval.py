"""Choosing the hybrid's blend weight w on held-out target training identities.

For each candidate w the *whole* target training set is clustered as the hybrid clusters it
each epoch, with DBSCAN on d = (1 - w) d_J + w (1 - A) (``metrics.cluster.blended_distance``),
and the clustering is scored on the held-out images only, against their identities. The
held-out identities come from a split of the target *training* set
(``data.split.split_identities``), never from the test set. Clustering the held-out images
alone would be cheaper but misleading: DBSCAN's neighbourhoods depend on how many other
people surround an image, and on Market-1501 a weight that helped a fifth of the training
set clustered alone merged the whole set into one giant cluster.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from marreid.errors import ConfigError
from marreid.metrics.cluster import blend_cutoff, blended_distance, clustering_scores, pseudo_labels
from marreid.metrics.rerank import k_reciprocal_jaccard


def validate_cluster_weights(
    features: np.ndarray,
    multilabels: np.ndarray,
    validation: np.ndarray,
    validation_pids: np.ndarray,
    weights: Sequence[float],
    k1: int = 30,
    k2: int = 6,
    eps: float | Sequence[float] = 0.6,
    min_samples: int = 4,
) -> list[dict]:
    """One row per (eps, weight): ``clustering_scores`` of the held-out rows in the
    blended-distance DBSCAN of all rows, plus ``eps`` and ``weight``.

    ``validation`` indexes the held-out rows of ``features`` / ``multilabels`` and
    ``validation_pids`` are their identities (the only labels read). The Jaccard distance
    (k1, k2) is computed once, sparse, holding the pairs that can be edges for the largest
    radius and weight (``blend_cutoff``), and blended for each weight; every weight must be
    in [0, 1 - eps) for every eps.
    """
    if not weights:
        raise ConfigError("no blend weight to validate")
    radii = [float(eps)] if np.isscalar(eps) else [float(e) for e in eps]
    if not radii:
        raise ConfigError("no DBSCAN radius to validate")
    validation = np.asarray(validation, dtype=np.int64)
    if len(validation) != len(validation_pids):
        raise ConfigError(f"{len(validation)} validation rows but {len(validation_pids)} identities")
    cutoff = min(1.0, max(blend_cutoff(w, e) for w in weights for e in radii))
    jaccard = k_reciprocal_jaccard(features, k1, k2, max_distance=cutoff)
    rows = []
    for radius in radii:
        for weight in weights:
            distance = blended_distance(jaccard, multilabels, weight, eps=radius) if weight > 0 else jaccard
            labels = pseudo_labels(distance, radius, min_samples)
            rows.append({"eps": radius, "weight": float(weight),
                         **clustering_scores(labels[validation], np.asarray(validation_pids))})
    return rows


def pick_row(rows: Sequence[dict], key: str = "pair_f") -> dict:
    """The row with the largest ``key``; on a tie the smallest weight (the least blending), then the
    largest eps."""
    if not rows:
        raise ConfigError("no validation rows to pick from")
    if key not in rows[0]:
        raise ConfigError(f"key {key!r} is not a clustering score; one of {', '.join(sorted(rows[0]))}")
    return max(rows, key=lambda row: (row[key], -row["weight"], row.get("eps", 0.0)))


def pick_weight(rows: Sequence[dict], key: str = "pair_f") -> float:
    """The weight of :func:`pick_row`."""
    return pick_row(rows, key)["weight"]


__all__ = ["pick_row", "pick_weight", "validate_cluster_weights"]
