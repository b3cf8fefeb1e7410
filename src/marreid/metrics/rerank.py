"""The k-reciprocal encoding of Zhong et al., "Re-ranking Person Re-identification with k-reciprocal
Encoding" (CVPR 2017): the Jaccard distance between all pairs of a feature set (what cluster
contrast clusters with DBSCAN) and the re-ranked query x gallery distance.

Definitions, with the paper's equation numbers, over a set of N L2-normalised features
(rows are normalised here; a zero row stays zero):

* original distance d(p, g) = ||x_p - x_g||^2 = 2 - 2 <x_p, x_g> (Eq. 1 with M = I: the squared
  Euclidean distance, as the reference code uses). :func:`rerank` divides each row by its
  largest entry over all N points, d(p, g) / max_h d(p, h), as the reference ``re_ranking``
  does; :func:`k_reciprocal_jaccard` does not, as cluster contrast's ``compute_jaccard_distance``.
* ranking list of p (Eq. 2): all N points by (d, index), p itself first (distance 0, also ahead
  of an exact duplicate); N(p, k) (Eq. 3) = p and the k points after it (the reference code's
  ``initial_rank[p, :k + 1]``).
* R(p, k) = {g in N(p, k) : p in N(g, k)} (Eq. 4), the k-reciprocal neighbours; p is in it.
* R*(p, k1) = R(p, k1) united with R(q, k1/2) for every q in R(p, k1) with
  |R(p, k1) & R(q, k1/2)| > 2/3 |R(q, k1/2)| (Eq. 5; strictly more, as the reference code, where
  the paper writes >=); k1/2 is rounded half to even, as ``np.around``.
* V_p,g = exp(-d(p, g)) for g in R*(p, k1), else 0 (Eq. 8), scaled so each row sums to 1 (the
  reference code's normalisation, which the published re-ranked results and cluster contrast's
  eps = 0.6 were obtained with; the paper's Eq. 8 leaves rows unscaled).
* local query expansion (Eq. 11): V_p <- the mean of V_g over the first k2 entries of p's
  ranking list (p included; k2 = 1 keeps V_p).
* d_J(p, g) = 1 - sum_j min(V_p,j, V_g,j) / sum_j max(V_p,j, V_g,j) (Eq. 9-10); the max sum is
  computed as sum V_p + sum V_g - sum min. Symmetric, zero on the diagonal, in [0, 1], and 1
  exactly when V_p and V_g share no point.
* d*(p, g) = (1 - lambda) d_J(p, g) + lambda d(p, g) (Eq. 12).

Memory: nothing N x N is dense except what is returned. Neighbour lists come from row blocks
of the distance matrix (``chunk_size`` rows, by default about 8M distances per block); the sets
R, R* and the vectors V are scipy sparse matrices (at most a few hundred non-zeros a row); d_J
is computed a block of rows at a time by walking, for each non-zero V_p,j, the points g with
V_g,j > 0 (an inverted index of V, as the reference code's ``invIndex``), never more than about
2M (p, j, g) triples at once.

Limits, from ``bench/bench_rerank.py`` (random identity-clustered 2,048-D features, 2 CPU cores
shared with a training run, so times are pessimistic). :func:`rerank` at Market-1501 size
(3,368 x 15,913: N = 19,281) took 183 s with a peak of +0.76 GiB RSS, the 0.20 GiB float32
result included; a dense implementation holds at least N^2 float32 distances and their int64
argsort, 4.15 GiB. :func:`k_reciprocal_jaccard` on 12,936 features (k1 = 30, k2 = 6) took
165 s, +0.88 GiB with the 0.62 GiB dense result, +0.32 GiB with ``max_distance=0.6``. At MSMT17
size (11,659 queries + 82,161 gallery = 93,820 points) :func:`rerank` needs at most about
72 min on such a machine (x23.7: the neighbour search grows as N^2 D, the sparse stages as
N) and about 2.7 GiB of working memory (x4.87) plus its 3.6 GiB float32 result; a dense
implementation would need at least 98 GiB.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import scipy.sparse as sp
import torch

from marreid.errors import ConfigError, DatasetError
from marreid.metrics.distance import Array, block_rows, check_features, check_positive, to_tensor
from marreid.metrics.search import smallest_k

# (p, j, g) triples gathered at once when summing min(V_p,j, V_g,j): about 2M, which keeps the
# gather's temporaries (a handful of 8-byte arrays of that length) near 100 MB.
_GATHER_ENTRIES = 1 << 21

# Feature elements gathered at once when computing the distances of the pairs in R* (32 MB in float32).
_PAIR_ELEMENTS = 1 << 23


def _unit_rows(*parts: Array) -> torch.Tensor:
    """The rows of ``parts`` stacked on the CPU and L2-normalised (float64 kept, else float32)."""
    rows = [to_tensor(part).detach().cpu() for part in parts]
    dtype = torch.float64 if any(r.dtype == torch.float64 for r in rows) else torch.float32
    x = torch.cat([r.to(dtype) for r in rows])
    if not bool(torch.isfinite(x).all()):
        raise DatasetError("features hold NaN or infinite values")
    return torch.nn.functional.normalize(x, dim=1)


def _squared(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||a_i - b_j||^2 = 2 - 2 <a_i, b_j> for unit rows, clamped at 0 against rounding."""
    return torch.addmm(a.new_full((), 2.0), a, b.T, alpha=-2.0).clamp_(min=0.0)


def _ranking(x: torch.Tensor, width: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``width`` entries of every point's ranking list (Eq. 2, the point itself first)
    and every row's largest squared distance, from ``rows``-row blocks of the distance matrix."""
    n = x.shape[0]
    ranking = np.empty((n, width), np.int64)
    row_max = np.empty(n, np.float64)
    for start in range(0, n, rows):
        block = _squared(x[start : start + rows], x)
        local = torch.arange(block.shape[0])
        block[local, local + start] = 0.0
        row_max[start : start + rows] = block.amax(1).numpy()
        # Below every real distance, so p heads its own list even when another point equals it.
        block[local, local + start] = -1.0
        ranking[start : start + rows] = smallest_k(block, width)[1].numpy()
    return ranking, row_max


def _rows_of(columns: np.ndarray, n: int, value: float | np.integer) -> sp.csr_matrix:
    """An n x n CSR matrix whose row p holds ``value`` at ``columns[p]`` (one equal-length list a row)."""
    width = columns.shape[1]
    data = np.full(n * width, value)
    return sp.csr_matrix((data, columns.ravel(), np.arange(0, n * width + 1, width)), shape=(n, n))


def _reciprocal(ranking: np.ndarray, k: int) -> sp.csr_matrix:
    """R(p, k) (Eq. 4) as the rows of a 0/1 integer matrix: g in N(p, k) and p in N(g, k)."""
    member = _rows_of(ranking[:, : k + 1], ranking.shape[0], np.int32(1))
    return member.multiply(member.T).tocsr()


def _support_distances(x: torch.Tensor, support: sp.csr_matrix) -> np.ndarray:
    """d(p, g) for every stored entry (p, g) of ``support``, in its order.

    Rows are taken a few at a time, each one's points padded to the longest row of the
    group (with p itself), so one batched product gives them without repeating x_p per pair.
    """
    n = x.shape[0]
    counts = np.diff(support.indptr)
    out = np.empty(support.nnz, np.float64)
    rows = max(1, _PAIR_ELEMENTS // (x.shape[1] * max(1, int(counts.max()))))
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        width = int(counts[start:stop].max())
        slot = np.arange(width)[None, :]
        filled = slot < counts[start:stop, None]
        index = np.repeat(np.arange(start, stop)[:, None], width, axis=1)
        index[filled] = support.indices[support.indptr[start] : support.indptr[stop]]
        own = x[start:stop].unsqueeze(2)
        dots = torch.bmm(x[torch.from_numpy(index)], own).squeeze(2).numpy()
        out[support.indptr[start] : support.indptr[stop]] = 2.0 - 2.0 * dots[filled]
    np.maximum(out, 0.0, out=out)
    out[np.repeat(np.arange(n), counts) == support.indices] = 0.0
    return out


def _encoding(
    x: torch.Tensor, k1: int, k2: int, normalise_rows: bool, rows: int
) -> tuple[sp.csr_matrix, np.ndarray]:
    """The query-expanded vectors V (Eq. 8 and 11) as an N x N CSR matrix, and each row's divisor
    of the original distance (its largest distance when ``normalise_rows``, else 1)."""
    n = x.shape[0]
    ranking, row_max = _ranking(x, min(n, max(k1 + 1, k2)), rows)
    scale = np.where(row_max > 0, row_max, 1.0) if normalise_rows else np.ones(n)
    near = _reciprocal(ranking, k1)
    half = _reciprocal(ranking, int(np.around(k1 / 2)))
    half_size = np.diff(half.indptr)
    expanded = []
    for start in range(0, n, rows):
        own = near[start : start + rows]
        # shared[p, q] = |R(p, k1) & R(q, k1/2)|, kept for the candidates q in R(p, k1) (Eq. 5).
        shared = (own @ half.T).multiply(own).tocoo()
        keep = 3 * shared.data > 2 * half_size[shared.col]
        taken = sp.csr_matrix(
            (np.ones(int(keep.sum()), np.int32), (shared.row[keep], shared.col[keep])), shape=own.shape
        )
        expanded.append((own + taken @ half).tocsr())
    support = sp.vstack(expanded, format="csr")
    p = np.repeat(np.arange(n), np.diff(support.indptr))
    weight = np.exp(-_support_distances(x, support) / scale[p])
    weight /= np.add.reduceat(weight, support.indptr[:-1])[p]  # every row holds p itself
    vectors = sp.csr_matrix((weight, support.indices, support.indptr), shape=(n, n))
    expansion = _rows_of(ranking[:, : min(k2, n)], n, 1.0 / min(k2, n))
    return (expansion @ vectors).tocsr(), scale


def _row_chunks(work: np.ndarray, max_rows: int, budget: int) -> Iterator[tuple[int, int]]:
    """Consecutive row ranges of at most ``max_rows`` rows and about ``budget`` work (one row at least)."""
    total = np.cumsum(work)
    start = 0
    while start < work.shape[0]:
        done = total[start - 1] if start else 0
        stop = int(np.searchsorted(total, done + budget, side="right"))
        stop = min(max(stop, start + 1), start + max_rows)
        yield start, stop
        start = stop


def _jaccard_blocks(
    vp: sp.csr_matrix, vg: sp.csr_matrix, max_rows: int
) -> Iterator[tuple[int, int, np.ndarray]]:
    """d_J (Eq. 10) between every row of ``vp`` and every row of ``vg``, as float64 blocks of ``vp``'s rows."""
    num_g = vg.shape[0]
    inverted = vg.tocsc()  # column j lists the points g with V_g,j > 0
    column_size = np.diff(inverted.indptr)
    sums_p = np.asarray(vp.sum(1)).ravel()
    sums_g = np.asarray(vg.sum(1)).ravel()
    work = np.add.reduceat(column_size[vp.indices], vp.indptr[:-1])  # every row holds its own point
    for start, stop in _row_chunks(work, min(max_rows, block_rows(num_g)), _GATHER_ENTRIES):
        block = vp[start:stop]
        # Every non-zero V_p,j meets the points g of column j: min(V_p,j, V_g,j) summed per (p, g).
        begin = inverted.indptr[block.indices]
        length = inverted.indptr[block.indices + 1] - begin
        entry = np.repeat(np.arange(length.shape[0]), length)
        position = np.arange(entry.shape[0]) + np.repeat(begin - (np.cumsum(length) - length), length)
        row = np.repeat(np.arange(stop - start), np.diff(block.indptr))[entry]
        smaller = np.minimum(block.data[entry], inverted.data[position])
        shared = np.bincount(
            row * num_g + inverted.indices[position], weights=smaller, minlength=(stop - start) * num_g
        ).reshape(stop - start, num_g)
        union = sums_p[start:stop, None] + sums_g[None, :]
        union -= shared  # sum max(a, b) = sum a + sum b - sum min(a, b)
        np.divide(shared, union, out=shared)
        np.subtract(1.0, shared, out=shared)
        yield start, stop, np.clip(shared, 0.0, 1.0, out=shared)


def _check_k(k1: int, k2: int, chunk_size: int | None) -> None:
    """Raise ``ConfigError`` unless k1, k2 (and chunk_size, when given) are positive integers."""
    check_positive(k1, "k1")
    check_positive(k2, "k2")
    check_positive(chunk_size, "chunk_size")


def k_reciprocal_jaccard(
    features: Array,
    k1: int = 30,
    k2: int = 6,
    *,
    max_distance: float | None = None,
    chunk_size: int | None = None,
) -> np.ndarray | sp.csr_matrix:
    """The k-reciprocal Jaccard distance d_J (Eq. 10) between every pair of rows of ``features``.

    The original distance is the squared Euclidean distance of the L2-normalised rows, not
    divided by the row maximum (cluster contrast's ``compute_jaccard_distance``); see the module
    docstring for every step. k1 = 30, k2 = 6 are cluster contrast's clustering parameters.

    Parameters
    ----------
    features : array [N, D]
        Feature rows (normalised here).
    k1, k2 : int
        Size of the k-reciprocal neighbourhood (Eq. 4-5) and of the query expansion (Eq. 11).
    max_distance : float, optional
        None: a dense float32 [N, N] array (4 N^2 bytes: 0.67 GB at Market's 12,936 training
        images). A number: a scipy CSR matrix holding only the pairs with d_J <= max_distance
        (the diagonal's zeros stored explicitly), enough for DBSCAN with ``eps <= max_distance``
        and ``metric="precomputed"``; its size is the number of such pairs.
    chunk_size : int, optional
        Rows per block of every stage; by default about 8M distances per block.
    """
    check_features(features, features, "features", "features")
    _check_k(k1, k2, chunk_size)
    if max_distance is not None and not max_distance >= 0:
        raise ConfigError(f"max_distance={max_distance!r} must be >= 0")
    n = features.shape[0]
    if n == 0:
        raise DatasetError("k_reciprocal_jaccard needs at least one feature row")
    x = _unit_rows(features)
    rows = chunk_size or block_rows(n)
    vectors, _ = _encoding(x, k1, k2, normalise_rows=False, rows=rows)
    dense = np.empty((n, n), np.float32) if max_distance is None else None
    found_rows, found_cols, found = [], [], []
    for start, stop, block in _jaccard_blocks(vectors, vectors, rows):
        # d_J(p, p) = 0 exactly; the two sums it comes from are rounded in different orders.
        block[np.arange(stop - start), np.arange(start, stop)] = 0.0
        if dense is not None:
            dense[start:stop] = block
            continue
        r, c = np.nonzero(block <= max_distance)
        found_rows.append(r + start)
        found_cols.append(c)
        found.append(block[r, c].astype(np.float32))
    if dense is not None:
        return dense
    return sp.csr_matrix(
        (np.concatenate(found), (np.concatenate(found_rows), np.concatenate(found_cols))), shape=(n, n)
    )


def rerank(
    q_feat: Array,
    g_feat: Array,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    *,
    chunk_size: int | None = None,
) -> np.ndarray:
    """The re-ranked distance d* (Eq. 12) of every query to every gallery image, float32 [Q, G].

    As the reference ``re_ranking``: the k-reciprocal sets are taken over the queries and the
    gallery together (N = Q + G points), and the original distance, in the Gaussian weights and
    in Eq. 12 alike, is the squared Euclidean distance of the L2-normalised features divided by
    the largest one of its row over all N points (so it is in [0, 1]). k1 = 20, k2 = 6,
    lambda = 0.3 are the paper's values. The result goes to ``evaluate_rank`` as it is;
    ``lambda_value = 1`` ranks as the plain (cosine or Euclidean) distance does.
    ``chunk_size`` is the rows per block of every stage (by default about 8M distances per block).
    """
    check_features(q_feat, g_feat, "q_feat", "g_feat")
    _check_k(k1, k2, chunk_size)
    if not 0.0 <= lambda_value <= 1.0:
        raise ConfigError(f"lambda_value={lambda_value!r} must be in [0, 1]")
    num_q, num_g = q_feat.shape[0], g_feat.shape[0]
    if num_q == 0 or num_g == 0:
        raise DatasetError("rerank needs at least one query and one gallery row")
    x = _unit_rows(q_feat, g_feat)
    rows = chunk_size or block_rows(num_q + num_g)
    vectors, scale = _encoding(x, k1, k2, normalise_rows=True, rows=rows)
    out = np.empty((num_q, num_g), np.float32)
    for start, stop, jaccard in _jaccard_blocks(vectors[:num_q], vectors[num_q:], rows):
        original = _squared(x[start:stop], x[num_q:]).numpy() / scale[start:stop, None]
        out[start:stop] = (1.0 - lambda_value) * jaccard + lambda_value * original
    return out


__all__ = ["k_reciprocal_jaccard", "rerank"]
