"""CMC and mAP under the Market-1501 protocol, vectorised over blocks of queries.

For a query of identity q seen by camera c, a gallery image is *ignored* when its
identity is -1 (junk) or when it is identity q seen by camera c; among the rest
(the *valid* images) the *hits* are those of identity q. Valid images are ranked
by (distance, gallery index), so ties go to the lower index. A query without any
hit is left out of CMC and mAP and counted as skipped.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from marreid.errors import ConfigError, DatasetError
from marreid.metrics.distance import (
    Array,
    block_rows,
    check_features,
    check_metric,
    check_positive,
    distance_block,
    prepare_rows,
    to_tensor,
)

AP_RULES = ("plain", "trapezoid", "mar-release")

# Below this many hits per query a block is bucketed by comparison passes, above by binary search
# (it must stay under 255, the uint8 count's range).
_MAX_COMPARISON_PASSES = 128


@dataclass(frozen=True)
class RankResult:
    """The outcome of one evaluation.

    ``cmc[k]`` is the fraction of valid queries whose first hit is at rank <= k + 1;
    ``per_query_ap`` is NaN for the skipped queries (those without any hit).
    """

    cmc: np.ndarray
    mAP: float
    num_valid_queries: int
    num_skipped_queries: int
    ap_rule: str
    per_query_ap: np.ndarray

    def summary(self, ranks: tuple[int, ...] = (1, 5, 10)) -> str:
        """One line: the chosen CMC ranks, mAP, the AP rule and the query counts."""
        shown = " ".join(f"rank-{r} {100 * self.cmc[r - 1]:.1f}%" for r in ranks if r <= len(self.cmc))
        return (
            f"{shown} mAP {100 * self.mAP:.1f}% (AP rule: {self.ap_rule}; "
            f"{self.num_valid_queries} queries, {self.num_skipped_queries} skipped: no valid match)"
        )


def check_ap_rule(ap_rule: str) -> None:
    """Raise ``ConfigError`` unless ``ap_rule`` is one of ``AP_RULES``."""
    if ap_rule not in AP_RULES:
        raise ConfigError(f"ap_rule={ap_rule!r} is not one of {', '.join(AP_RULES)}")


def id_array(x: Array | list[int], name: str, length: int) -> np.ndarray:
    """``x`` as a 1-D int64 array of ``length`` entries, or ``DatasetError`` naming ``name``."""
    arr = np.asarray(x.cpu() if isinstance(x, torch.Tensor) else x)
    if arr.ndim != 1 or arr.shape[0] != length:
        raise DatasetError(f"{name} must be 1-D with {length} entries, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise DatasetError(f"{name} must hold integers, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def protocol_masks(
    q_pids: np.ndarray, q_camids: np.ndarray, g_pids: np.ndarray, g_camids: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Market-1501 masks for a block of queries, both [Q, G] booleans.

    valid[i, j] = g_pid[j] != -1 and not (g_pid[j] == q_pid[i] and g_cam[j] == q_cam[i])
    hit[i, j]   = valid[i, j] and g_pid[j] == q_pid[i]
    """
    not_junk = (g_pids != -1)[None, :]
    same_id = g_pids[None, :] == q_pids[:, None]
    hit = same_id & (g_camids[None, :] != q_camids[:, None]) & not_junk
    valid = (~same_id & not_junk) | hit
    return valid, hit


def hit_ranks(dist: np.ndarray, valid: np.ndarray, hit: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """1-based rank r_p of every hit among the valid images, ordered by (distance, gallery index).

    Returns ``ranks`` [Q, H] (row i holds r_1 < r_2 < ... < r_n of query i, then zeros;
    H is the largest n in the block) and ``num_hits`` [Q].

    Instead of sorting whole rows, each valid non-hit is put in the bucket
    b = #{hits ranked before it}; then r_p = #{non-hits with b < p} + p.
    """
    num_rows, num_gallery = dist.shape
    num_hits = hit.sum(1)
    width = int(num_hits.max(initial=0))
    if width == 0:
        return np.zeros((num_rows, 0), np.int64), num_hits
    rows, cols = np.nonzero(hit)
    slot = np.arange(rows.size) - np.repeat(np.cumsum(num_hits) - num_hits, num_hits)
    hit_dist = np.full((num_rows, width), np.inf, dtype=dist.dtype)
    hit_index = np.full((num_rows, width), num_gallery, dtype=np.int64)
    hit_dist[rows, slot] = dist[rows, cols]
    hit_index[rows, slot] = cols
    # Slots are filled in gallery-index order, so a stable sort gives (distance, index) order.
    order = np.argsort(hit_dist, axis=1, kind="stable")
    hit_dist = np.take_along_axis(hit_dist, order, 1)
    hit_index = np.take_along_axis(hit_index, order, 1)

    # Ignored images and hits go to +inf, past the last bucket, where no hit counts them.
    others = np.where(valid & ~hit, dist, np.inf)
    bucket = _count_at_or_below(hit_dist, others)

    # Counting hits at or below puts a non-hit after every hit at exactly its distance; those
    # hits of that distance with a larger gallery index must come after it instead. Padding
    # becomes NaN here so that the +inf of ignored images never matches it.
    previous = np.concatenate(
        [np.full((num_rows, 1), -np.inf, dtype=dist.dtype), np.where(np.isinf(hit_dist), np.nan, hit_dist)],
        axis=1,
    )
    tied_to_previous = np.take_along_axis(previous, bucket, 1) == others
    if tied_to_previous.any():
        tie_rows, tie_cols = np.nonzero(tied_to_previous)
        tied = hit_dist[tie_rows] == others[tie_rows, tie_cols][:, None]
        bucket[tie_rows, tie_cols] -= (tied & (hit_index[tie_rows] > tie_cols[:, None])).sum(1)

    bucket += np.arange(num_rows)[:, None] * (width + 1)
    per_bucket = np.bincount(bucket.ravel(), minlength=num_rows * (width + 1)).reshape(num_rows, width + 1)
    ranks = np.cumsum(per_bucket, axis=1)[:, :width] + np.arange(1, width + 1)
    ranks[np.arange(width)[None, :] >= num_hits[:, None]] = 0
    return ranks, num_hits


def _count_at_or_below(sorted_rows: np.ndarray, values: np.ndarray) -> np.ndarray:
    """For each value, how many entries of its row of ``sorted_rows`` are <= it, as int64."""
    width = sorted_rows.shape[1]
    # A few vectorised comparison passes beat a batched binary search up to about a hundred
    # thresholds (measured: 50 passes take a quarter of torch.searchsorted's time).
    if width > _MAX_COMPARISON_PASSES:
        return torch.searchsorted(torch.from_numpy(sorted_rows), torch.from_numpy(values), right=True).numpy()
    count = np.zeros(values.shape, np.uint8)
    at_or_below = np.empty(values.shape, bool)
    for p in range(width):
        np.less_equal(sorted_rows[:, p : p + 1], values, out=at_or_below)
        count += at_or_below
    return count.astype(np.int64)


def average_precision(ranks: np.ndarray, num_hits: np.ndarray, ap_rule: str) -> np.ndarray:
    """AP of each query from the ranks r_1 < ... < r_n of its n hits (NaN where n = 0).

    plain (torchreid, fast-reid):
        AP = 1/n sum_p p / r_p
    trapezoid (the Market-1501 MATLAB code, ``compute_AP.m``):
        AP = 1/n sum_p (P_before(p) + p / r_p) / 2,  P_before(p) = (p - 1) / (r_p - 1),
        the precision at the rank just above the p-th hit; for p = 1 it is 1 if r_1 = 1, else 0.
    mar-release (the MAR authors' ``eval_cmc_map``):
        as trapezoid, but P_before(1) = 1 wherever the first hit is, so a query whose
        first hit is at rank r_1 > 1 scores 1 / (2n) higher than under trapezoid.

    Only the formula differs: the ignored images and the tie order are those of this
    module for all three rules (the release itself drops no junk and sorts unstably).
    """
    width = ranks.shape[1]
    if width == 0:
        return np.full(num_hits.shape[0], np.nan)
    p = np.arange(1, width + 1, dtype=np.float64)[None, :]
    present = p <= num_hits[:, None]
    # Padding gets a harmless placeholder rank; it is masked out of the sum below.
    r = np.where(present, ranks, p).astype(np.float64)
    terms = p / r
    if ap_rule != "plain":
        before = np.empty_like(terms)
        before[:, 1:] = (p[:, 1:] - 1.0) / (r[:, 1:] - 1.0)
        before[:, 0] = 1.0 if ap_rule == "mar-release" else (r[:, 0] == 1.0)
        terms = (before + terms) / 2.0
    total = np.where(present, terms, 0.0).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(num_hits > 0, total / num_hits, np.nan)


def _evaluate_blocks(
    blocks: Iterator[tuple[int, np.ndarray]],
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    max_rank: int,
    ap_rule: str,
    source: str,
) -> RankResult:
    """Rank every block of distance rows (starting at query ``start``) and average the results."""
    per_query_ap = np.full(q_pids.shape[0], np.nan)
    first_rank = np.zeros(q_pids.shape[0], np.int64)
    for start, dist in blocks:
        if not np.isfinite(dist).all():
            raise DatasetError(f"{source} holds NaN or infinite distances (rows from {start})")
        stop = start + dist.shape[0]
        valid, hit = protocol_masks(q_pids[start:stop], q_camids[start:stop], g_pids, g_camids)
        ranks, num_hits = hit_ranks(dist, valid, hit)
        per_query_ap[start:stop] = average_precision(ranks, num_hits, ap_rule)
        if ranks.shape[1]:
            first_rank[start:stop] = ranks[:, 0]
    answered = first_rank > 0
    num_valid = int(answered.sum())
    if num_valid == 0:
        raise DatasetError("no query has a valid gallery match (same identity, another camera, not junk)")
    first_counts = np.bincount(np.minimum(first_rank[answered], max_rank + 1), minlength=max_rank + 2)
    cmc = np.cumsum(first_counts[1 : max_rank + 1]) / num_valid
    return RankResult(
        cmc=cmc,
        mAP=float(per_query_ap[answered].mean()),
        num_valid_queries=num_valid,
        num_skipped_queries=int(q_pids.shape[0] - num_valid),
        ap_rule=ap_rule,
        per_query_ap=per_query_ap,
    )


def distance_rows(block: Array) -> np.ndarray:
    """A block of distances as float32 (kept) or float64 (everything else, exact for integers)."""
    if isinstance(block, torch.Tensor):
        block = block.detach().cpu().numpy()
    return np.asarray(block, dtype=np.float32 if block.dtype == np.float32 else np.float64)


def evaluate_rank_detailed(
    distmat: Array,
    q_pids: Array | list[int],
    g_pids: Array | list[int],
    q_camids: Array | list[int],
    g_camids: Array | list[int],
    max_rank: int = 50,
    ap_rule: str = "plain",
    chunk_size: int | None = None,
) -> RankResult:
    """CMC, mAP and query counts from a query x gallery distance matrix.

    Parameters
    ----------
    distmat : array [Q, G]
        Distances (smaller = more similar); a numpy array, a memory-mapped one
        (read ``chunk_size`` rows at a time) or a tensor.
    q_pids, g_pids, q_camids, g_camids : integer arrays [Q] / [G]
        Identities (-1 = junk gallery image) and camera ids.
    max_rank : int
        Length of the CMC curve (also when the gallery is shorter: the curve is flat there).
    ap_rule : {"plain", "trapezoid", "mar-release"}
        See :func:`average_precision`.
    chunk_size : int, optional
        Queries per block; by default about 8M distances per block.
    """
    check_ap_rule(ap_rule)
    check_positive(max_rank, "max_rank")
    check_positive(chunk_size, "chunk_size")
    if not isinstance(distmat, (np.ndarray, torch.Tensor)) or distmat.ndim != 2:
        raise DatasetError(f"distmat must be a 2-D array [queries, gallery], got {type(distmat).__name__}")
    num_q, num_g = distmat.shape
    ids = (
        id_array(q_pids, "q_pids", num_q),
        id_array(g_pids, "g_pids", num_g),
        id_array(q_camids, "q_camids", num_q),
        id_array(g_camids, "g_camids", num_g),
    )
    rows = chunk_size or block_rows(num_g)
    blocks = ((i, distance_rows(distmat[i : i + rows])) for i in range(0, num_q, rows))
    return _evaluate_blocks(blocks, *ids, max_rank, ap_rule, "distmat")


def evaluate_rank(
    distmat: Array,
    q_pids: Array | list[int],
    g_pids: Array | list[int],
    q_camids: Array | list[int],
    g_camids: Array | list[int],
    max_rank: int = 50,
    ap_rule: str = "plain",
) -> tuple[np.ndarray, float]:
    """``(cmc, mAP)`` as torchreid returns them; see :func:`evaluate_rank_detailed`.

    Examples
    --------
    >>> import numpy as np
    >>> cmc, mAP = evaluate_rank(np.array([[0.3, 0.1, 0.2]]), [7], [7, 5, 7], [0], [1, 1, 1], max_rank=3)
    >>> cmc.tolist(), round(mAP, 4)
    ([0.0, 1.0, 1.0], 0.5833)
    """
    result = evaluate_rank_detailed(distmat, q_pids, g_pids, q_camids, g_camids, max_rank, ap_rule)
    return result.cmc, result.mAP


@torch.no_grad()
def evaluate_features(
    qf: Array,
    gf: Array,
    q_pids: Array | list[int],
    g_pids: Array | list[int],
    q_camids: Array | list[int],
    g_camids: Array | list[int],
    metric: str = "cosine",
    max_rank: int = 50,
    ap_rule: str = "plain",
    chunk_size: int | None = None,
) -> RankResult:
    """Like :func:`evaluate_rank_detailed`, from features, never holding the whole distance matrix.

    The gallery is prepared once (normalised for cosine); distances are computed
    ``chunk_size`` queries at a time (on ``qf``'s device when it is a tensor) and
    ranked at once. Equals ``evaluate_rank_detailed(compute_distance_matrix(qf, gf, metric), ...)``
    up to the rounding of the matrix products.
    """
    check_metric(metric)
    check_features(qf, gf, "qf", "gf")
    check_ap_rule(ap_rule)
    check_positive(max_rank, "max_rank")
    check_positive(chunk_size, "chunk_size")
    num_q, num_g = qf.shape[0], gf.shape[0]
    ids = (
        id_array(q_pids, "q_pids", num_q),
        id_array(g_pids, "g_pids", num_g),
        id_array(q_camids, "q_camids", num_q),
        id_array(g_camids, "g_camids", num_g),
    )
    device = qf.device if isinstance(qf, torch.Tensor) else None
    gallery = prepare_rows(to_tensor(gf, device), metric)
    rows = chunk_size or block_rows(num_g)

    def blocks() -> Iterator[tuple[int, np.ndarray]]:
        for i in range(0, num_q, rows):
            query = prepare_rows(to_tensor(qf[i : i + rows], device), metric)
            yield i, distance_block(query, gallery, metric).cpu().numpy()

    return _evaluate_blocks(blocks(), *ids, max_rank, ap_rule, "the distances of qf and gf")
