"""The classic CUHK03 single-gallery-shot CMC: one gallery image per identity, averaged over draws."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from marreid.errors import DatasetError
from marreid.metrics.distance import Array, block_rows, check_positive
from marreid.metrics.rank import distance_rows, id_array


@dataclass(frozen=True)
class SingleShotResult:
    """CMC averaged over ``repeats`` draws and the valid queries; skipped queries have no candidate match."""

    cmc: np.ndarray
    num_valid_queries: int
    num_skipped_queries: int
    repeats: int


def _group_gallery(g_pids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Distinct identities (junk -1 left out), their images in gallery order, first position and count."""
    members = np.argsort(g_pids, kind="stable")
    members = members[g_pids[members] != -1]
    ids, starts, counts = np.unique(g_pids[members], return_index=True, return_counts=True)
    return ids, members, starts, counts


def evaluate_cuhk03_single_shot(
    distmat: Array,
    q_pids: Array | list[int],
    g_pids: Array | list[int],
    q_camids: Array | list[int],
    g_camids: Array | list[int],
    max_rank: int = 50,
    repeats: int = 10,
    seed: int = 0,
    chunk_size: int | None = None,
) -> SingleShotResult:
    """Single-gallery-shot CMC: each query sees one randomly drawn gallery image per identity.

    The draw, fixed by ``seed`` so that it can be replayed exactly: let ids be the sorted
    distinct gallery identities other than -1 (P of them) and
    U = numpy.random.default_rng(seed).random((repeats, Q, P)) (drawn block by block, same
    numbers). In repeat t, query i keeps of identity ids[p] its candidate number
    floor(U[t, i, p] * n) (0-based, in gallery order) among its n candidates: every gallery
    image of ids[p], less those seen by the query's own camera when ids[p] is the query's
    identity. The query's rank is 1 + the number of kept images of other identities that
    come before its own kept image by (distance, gallery index); a query whose identity
    has no candidate is skipped.

    Parameters
    ----------
    distmat : array [Q, G]
        Distances, read ``chunk_size`` query rows at a time (once per repeat).
    q_pids, g_pids, q_camids, g_camids : integer arrays [Q] / [G]
    max_rank, repeats, seed : int
        CMC length, number of draws averaged, seed of the draws.
    chunk_size : int, optional
        Queries per block; by default about 8M distances per block.
    """
    for value, name in ((max_rank, "max_rank"), (repeats, "repeats"), (chunk_size, "chunk_size")):
        check_positive(value, name)
    if not isinstance(distmat, (np.ndarray, torch.Tensor)) or distmat.ndim != 2:
        raise DatasetError(f"distmat must be a 2-D array [queries, gallery], got {type(distmat).__name__}")
    num_q, num_g = distmat.shape
    q_pids = id_array(q_pids, "q_pids", num_q)
    g_pids = id_array(g_pids, "g_pids", num_g)
    q_camids = id_array(q_camids, "q_camids", num_q)
    g_camids = id_array(g_camids, "g_camids", num_g)

    ids, members, starts, counts = _group_gallery(g_pids)
    if ids.size == 0:
        raise DatasetError("the gallery has no identity other than junk (-1)")
    # Each identity's images as one padded row (-1 after the last), to gather the own identity's.
    padded = np.full((ids.size, counts.max()), -1, np.int64)
    slot_in_row = np.arange(members.size) - np.repeat(starts, counts)
    padded[np.repeat(np.arange(ids.size), counts), slot_in_row] = members
    own = np.minimum(np.searchsorted(ids, q_pids), ids.size - 1)
    own[ids[own] != q_pids] = -1

    rng = np.random.default_rng(seed)
    rows = chunk_size or block_rows(num_g)
    rank_counts = np.zeros(max_rank + 2, np.int64)
    for _ in range(repeats):
        for start in range(0, num_q, rows):
            stop = min(start + rows, num_q)
            draws = rng.random((stop - start, ids.size))
            dist = distance_rows(distmat[start:stop])
            if not np.isfinite(dist).all():
                raise DatasetError(f"distmat holds NaN or infinite distances (rows from {start})")
            own_rows = padded[np.maximum(own[start:stop], 0)]
            usable = (own_rows >= 0) & (g_camids[own_rows] != q_camids[start:stop, None])
            usable &= own[start:stop, None] >= 0
            kept = members[starts + (draws * counts).astype(np.int64)]
            ranks = _single_shot_ranks(dist, draws, kept, own[start:stop], own_rows, usable)
            rank_counts += np.bincount(np.minimum(ranks, max_rank + 1), minlength=max_rank + 2)
    answers = int(rank_counts.sum())
    if answers == 0:
        raise DatasetError("no query identity has a gallery image from another camera")
    cmc = np.cumsum(rank_counts[1 : max_rank + 1]) / answers
    return SingleShotResult(cmc, answers // repeats, num_q - answers // repeats, repeats)


def _single_shot_ranks(
    dist: np.ndarray,
    draws: np.ndarray,
    kept: np.ndarray,
    own: np.ndarray,
    own_rows: np.ndarray,
    usable: np.ndarray,
) -> np.ndarray:
    """Rank of each answerable query's own kept image among the kept images (one per identity).

    ``kept`` [c, P] holds the drawn image of every identity, drawn among all its images;
    the own identity's (column ``own``) is redrawn here among its ``usable`` images
    (``own_rows``, another camera), then r = 1 + #{kept images before it by (distance, index)}.
    Queries without a usable image are left out.
    """
    num_usable = usable.sum(1)
    answered = np.flatnonzero(num_usable > 0)
    own = own[answered]
    # A stable argsort of ~usable lists each row's usable slots first, in gallery order.
    slots = np.argsort(~usable[answered], axis=1, kind="stable")
    nth = (draws[answered, own] * num_usable[answered]).astype(np.int64)
    match = own_rows[answered, slots[np.arange(answered.size), nth]]
    kept = kept[answered]
    kept[np.arange(answered.size), own] = match
    kept_dist = np.take_along_axis(dist[answered], kept, 1)
    match_dist = dist[answered, match][:, None]
    before = (kept_dist < match_dist) | ((kept_dist == match_dist) & (kept < match[:, None]))
    return before.sum(1) + 1
