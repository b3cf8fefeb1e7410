"""Cluster contrast's pseudo labels and the MAR hybrid's clustering distance, and scores of a clustering.

* :func:`pseudo_labels`: scikit-learn's DBSCAN on a precomputed (dense or sparse) distance,
  as cluster contrast (Dai et al. 2021) clusters the k-reciprocal Jaccard distance each epoch.
* :func:`cluster_centres`: the L2-normalised mean feature of each cluster, the memory's start.
* :func:`agreement_distance` and :func:`blended_distance`: 1 - A(y_i, y_j), MAR's soft multilabel
  agreement (Yu et al. 2019, Eq. 2, as ``losses.multilabel``) turned into a distance, and its
  blend with the Jaccard distance, d = (1 - w) d_J + w (1 - A), computed only where it can
  fall within DBSCAN's eps (:func:`blend_cutoff`).
* :func:`clustering_scores`: pairwise precision / recall / F, ARI, NMI of a clustering against
  identities (diagnostics and the choice of w on held-out target identities).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.cluster import DBSCAN
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from sklearn.neighbors import sort_graph_by_row_values

from marreid.errors import ConfigError, DatasetError
from marreid.metrics.distance import Array, block_rows, check_positive, to_tensor

Distance = np.ndarray | sp.spmatrix | sp.sparray


def _check_square(distance: Distance) -> int:
    """N for an [N, N] distance, else ``DatasetError``."""
    if distance.ndim != 2 or distance.shape[0] != distance.shape[1]:
        raise DatasetError(f"a precomputed distance must be square [N, N], got shape {tuple(distance.shape)}")
    return distance.shape[0]


def _first_appearance(labels: np.ndarray) -> np.ndarray:
    """``labels`` renumbered 0..C-1 in order of first appearance, -1 (outlier) kept, as int64."""
    labels = np.asarray(labels)
    out = np.full(labels.shape, -1, np.int64)
    inside = labels >= 0
    values, first, inverse = np.unique(labels[inside], return_index=True, return_inverse=True)
    rank = np.empty(len(values), np.int64)
    rank[np.argsort(first)] = np.arange(len(values))
    out[inside] = rank[inverse]
    return out


def pseudo_labels(distance: Distance, eps: float = 0.6, min_samples: int = 4) -> np.ndarray:
    """DBSCAN pseudo labels of N points from their precomputed distances (cluster contrast's step).

    ``sklearn.cluster.DBSCAN(eps, min_samples, metric="precomputed")``: j is a neighbour of i
    when d(i, j) <= eps; a core point has at least ``min_samples`` neighbours, itself included.
    eps = 0.6, min_samples = 4 are cluster contrast's values for the Jaccard distance.

    Parameters
    ----------
    distance : array [N, N] or scipy sparse [N, N]
        Dense: every pair. Sparse: a stored entry is a pair at its stored distance and a missing
        entry is no neighbour, so every pair with d <= eps must be stored, zeros explicitly (as
        ``k_reciprocal_jaccard(..., max_distance=eps)`` does; ``eliminate_zeros`` would lose
        pairs at distance 0). The diagonal is stored here as explicit zeros, whatever it held,
        so each point is its own neighbour in every scikit-learn version, and the input is not
        modified.
    eps, min_samples : float, int
        DBSCAN's radius and core size.

    Returns
    -------
    np.ndarray [N], int64
        -1 for outliers, clusters numbered 0..C-1 in order of first appearance.
    """
    if not eps > 0:
        raise ConfigError(f"eps={eps!r} must be > 0")
    check_positive(min_samples, "min_samples")
    n = _check_square(distance)
    if n == 0:
        return np.zeros(0, np.int64)
    if sp.issparse(distance):
        graph = sp.csr_matrix(distance, copy=True)
        graph.setdiag(0.0)  # stores the zeros: CSR keeps an explicitly set entry
        # Rows sorted by distance, the order scikit-learn's radius search wants (else it re-sorts and warns).
        distance = sort_graph_by_row_values(graph, copy=False, warn_when_not_sorted=False)
    labels = DBSCAN(eps=eps, min_samples=min_samples, metric="precomputed").fit_predict(distance)
    return _first_appearance(labels)


def cluster_centres(features: Array, labels: np.ndarray | torch.Tensor) -> torch.Tensor:
    """The L2-normalised mean feature of each cluster, float32 ``[C, D]`` (outliers, -1, ignored).

    c_k = m_k / ||m_k||, m_k = mean of the features labelled k; ``labels`` are 0..C-1 (every
    cluster non-empty, as :func:`pseudo_labels` numbers them). Sums are taken in float64.
    """
    x = to_tensor(features).detach().cpu().double()
    y = torch.as_tensor(np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels), dtype=torch.int64)
    if x.dim() != 2 or y.shape != x.shape[:1]:
        raise DatasetError(f"features {tuple(x.shape)} and labels {tuple(y.shape)} must be [N, D] and [N]")
    inside = y >= 0
    num = int(y[inside].max()) + 1 if bool(inside.any()) else 0
    if num == 0:
        raise DatasetError("every point is an outlier: no cluster to take a centre of (raise eps or lower min_samples)")
    counts = torch.bincount(y[inside], minlength=num)
    if bool((counts == 0).any()):
        raise DatasetError(f"labels must number non-empty clusters 0..C-1; cluster sizes {counts.tolist()[:10]}")
    sums = torch.zeros(num, x.shape[1], dtype=torch.float64).index_add_(0, y[inside], x[inside])
    return torch.nn.functional.normalize(sums / counts[:, None], dim=1).float()


def _check_multilabels(multilabels: np.ndarray, n: int | None = None) -> np.ndarray:
    """``multilabels`` as a 2-D float array whose rows sum to 1, else ``DatasetError``."""
    y = np.asarray(multilabels)
    if y.ndim != 2 or not np.issubdtype(y.dtype, np.floating) or (n is not None and y.shape[0] != n):
        raise DatasetError(f"multilabels must be a float [{n if n is not None else 'N'}, K] array, "
                           f"got {y.dtype} {y.shape}")
    sums = y.sum(1, dtype=np.float64)
    if len(sums) and np.abs(sums - 1.0).max() > 1e-3:
        raise DatasetError(f"multilabel rows must sum to 1 (soft multilabels), found sums up to {sums.max():.4g}")
    return y


def agreement_distance(multilabels: np.ndarray, pairs_rows: np.ndarray, pairs_cols: np.ndarray) -> np.ndarray:
    """1 - A(y_i, y_j) = ||y_i - y_j||_1 / 2 for the given pairs (i, j), float32 [P].

    A is MAR's soft multilabel agreement (Eq. 2), A = sum_k min(y_i^k, y_j^k), which for rows
    that sum to 1 is 1 - ||y_i - y_j||_1 / 2, the form ``losses.multilabel.pair_agreements``
    computes. Pairs are taken about ``metrics.distance.BLOCK_ELEMENTS / K`` at a time (two
    gathered [pairs, K] blocks of about 32 MB each in float32), so nothing [N, N, K] or [P, K]
    is built.
    """
    y = _check_multilabels(multilabels)
    rows, cols = np.asarray(pairs_rows, np.int64), np.asarray(pairs_cols, np.int64)
    if rows.shape != cols.shape or rows.ndim != 1:
        raise DatasetError(f"pairs_rows {rows.shape} and pairs_cols {cols.shape} must be equal-length 1-D arrays")
    if len(rows) and (min(rows.min(), cols.min()) < 0 or max(rows.max(), cols.max()) >= y.shape[0]):
        raise DatasetError(f"pair indices fall outside the {y.shape[0]} multilabel rows")
    return _agreement(y, rows, cols)


def _agreement(y: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """:func:`agreement_distance` of checked inputs."""
    out = np.empty(len(rows), np.float32)
    step = block_rows(y.shape[1])
    for start in range(0, len(rows), step):
        a, b = y[rows[start : start + step]], y[cols[start : start + step]]
        np.subtract(a, b, out=a)
        out[start : start + step] = 0.5 * np.abs(a, out=a).sum(1, dtype=np.float64)
    return out


def blend_cutoff(weight: float, eps: float = 0.6) -> float:
    """eps / (1 - w): the largest Jaccard distance d_J of a pair whose blended distance can be <= eps.

    d = (1 - w) d_J + w (1 - A) >= (1 - w) d_J, so a pair with d_J above the cutoff is no DBSCAN
    edge whatever its agreement. Pass it as ``k_reciprocal_jaccard(..., max_distance=...)`` for
    the sparse path of :func:`blended_distance`. w must be in [0, 1 - eps), else ``ConfigError``:
    at w >= 1 - eps the cutoff reaches 1 and every pair would be a candidate, the N x N x K
    computation this avoids.
    """
    if not 0.0 < eps < 1.0:
        raise ConfigError(f"eps={eps!r} must be in (0, 1) for a blend with the Jaccard distance")
    if not 0.0 <= weight < 1.0 - eps:
        raise ConfigError(f"blend weight={weight!r} must be in [0, 1 - eps) = [0, {1.0 - eps:.6g}) for eps={eps!r}; "
                          "at 1 - eps every pair of images could become a DBSCAN edge")
    return eps / (1.0 - weight)


def blended_distance(jaccard: Distance, multilabels: np.ndarray, weight: float, *, eps: float = 0.6) -> Distance:
    """The hybrid's clustering distance d = (1 - w) d_J + w (1 - A), for DBSCAN with radius eps.

    d_J is the k-reciprocal Jaccard distance (``metrics.rerank.k_reciprocal_jaccard``), A MAR's
    soft multilabel agreement (:func:`agreement_distance`): MAR's reference agreement helping
    the clustering. The agreement is computed only for the pairs with d_J <= c =
    :func:`blend_cutoff` (w, eps) = eps / (1 - w); every other pair keeps d_J. DBSCAN at eps
    sees the same neighbourhoods as with the exact blend: such a pair has d_J > c >= eps, and
    its exact blend is >= (1 - w) d_J > eps too, so it is no edge either way (up to float32
    rounding at the boundary).

    Why not the pairs that merely share a k-reciprocal point (d_J < 1): with k1 = 30, k2 = 6
    nearly every pair does (random identity-clustered 1,280-D features, ``bench_eval.make_problem``,
    N = 2,000: 1,998 pairs a row), which would be the N x N x K computation (10^11 values at
    Market size). At N = 3,000 the pairs per row with d_J <= 0.667, 0.75, 0.857 (w = 0.1, 0.2,
    0.3) were 4.5, 7.8 and 14; the cost grows quickly as w nears 1 - eps (d_J <= 0.95: 44 a
    row, <= 0.99: 1,914), and w >= 1 - eps (0.4 for eps 0.6) is a ``ConfigError``.

    Parameters
    ----------
    jaccard : array [N, N] or scipy sparse [N, N]
        Dense (float32, 4 N^2 bytes): the result is a new dense float32 array, built a block
        of about 8M distances (32 MB) at a time. Sparse: a new CSR matrix with the stored
        entries blended (those with d_J <= c) or kept; missing entries stay missing (no
        neighbour), so store every pair with d_J <= c:
        ``k_reciprocal_jaccard(features, k1, k2, max_distance=blend_cutoff(w, eps))``.
    multilabels : array [N, K]
        Soft multilabels of the same N images (rows sum to 1).
    weight : float
        w in [0, 1 - eps).
    eps : float
        The DBSCAN radius the result is for.
    """
    cutoff = blend_cutoff(weight, eps)
    n = _check_square(jaccard)
    y = _check_multilabels(multilabels, n)
    if sp.issparse(jaccard):
        graph = sp.csr_matrix(jaccard, dtype=np.float32, copy=True)
        rows = np.repeat(np.arange(n), np.diff(graph.indptr))
        near = np.flatnonzero(graph.data <= cutoff)
        graph.data[near] = (1.0 - weight) * graph.data[near] + weight * _agreement(y, rows[near], graph.indices[near])
        return graph
    out = np.empty((n, n), np.float32)
    rows = block_rows(n)
    for start in range(0, n, rows):
        block = out[start : start + rows]
        block[...] = jaccard[start : start + rows]
        r, c = np.nonzero(block <= cutoff)
        block[r, c] = (1.0 - weight) * block[r, c] + weight * _agreement(y, r + start, c)
    return out


def _pair_count(sizes: np.ndarray) -> int:
    """sum over groups of size(size - 1) / 2, exactly (Python integers)."""
    sizes = sizes.astype(np.int64)
    return int((sizes * (sizes - 1) // 2).sum())


def clustering_scores(pred: np.ndarray, truth: np.ndarray) -> dict[str, float | int]:
    """Scores of a clustering ``pred`` (-1 = outlier) against identities ``truth``.

    Pairwise: over the unordered pairs of distinct images, P = pairs in one predicted cluster,
    T = pairs of one identity, precision = |P & T| / |P|, recall = |P & T| / |T|,
    F = 2 precision recall / (precision + recall); an outlier is a cluster of its own (it
    pairs with nothing), and an empty P or T gives 0. ARI and NMI (scikit-learn, arithmetic
    normalisation) also count each outlier as its own cluster.

    Returns
    -------
    dict
        ``pair_precision``, ``pair_recall``, ``pair_f``, ``ari``, ``nmi`` (floats),
        ``clusters`` (predicted, outliers excluded), ``identities``, ``outlier_share``.
    """
    pred, truth = np.asarray(pred, np.int64), np.asarray(truth, np.int64)
    if pred.ndim != 1 or pred.shape != truth.shape:
        raise DatasetError(f"pred {pred.shape} and truth {truth.shape} must be equal-length 1-D arrays")
    outlier = pred < 0
    clustered = np.stack([pred[~outlier], truth[~outlier]])
    cells = np.unique(clustered, axis=1, return_counts=True)[1] if clustered.size else np.zeros(0, np.int64)
    together = _pair_count(np.unique(pred[~outlier], return_counts=True)[1])
    same = _pair_count(np.unique(truth, return_counts=True)[1])
    both = _pair_count(cells)
    precision = both / together if together else 0.0
    recall = both / same if same else 0.0
    singletons = pred.copy()
    singletons[outlier] = pred.max(initial=-1) + 1 + np.arange(int(outlier.sum()))
    return {
        "pair_precision": precision,
        "pair_recall": recall,
        "pair_f": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "ari": float(adjusted_rand_score(truth, singletons)),
        "nmi": float(normalized_mutual_info_score(truth, singletons)),
        "clusters": int(len(np.unique(pred[~outlier]))),
        "identities": int(len(np.unique(truth))),
        "outlier_share": float(outlier.mean()) if len(pred) else 0.0,
    }


__all__ = [
    "agreement_distance",
    "blend_cutoff",
    "blended_distance",
    "cluster_centres",
    "clustering_scores",
    "pseudo_labels",
]
