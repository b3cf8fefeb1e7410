"""Exact top-k gallery search that streams over the gallery, for galleries larger than memory."""

from __future__ import annotations

import importlib

import numpy as np
import torch

from marreid.errors import ConfigError, DatasetError
from marreid.metrics.distance import (
    Array,
    check_features,
    check_metric,
    check_positive,
    distance_block,
    prepare_rows,
    to_tensor,
)

BACKENDS = ("exact", "faiss")

# Elements of one gallery chunk's features or distances (about 16M: 64 MB in float32).
_CHUNK_ELEMENTS = 1 << 24


def smallest_k(dist: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` smallest entries of each row, ordered by (distance, column): values and columns.

    torch.topk breaks ties arbitrarily; here every entry below the k-th smallest value v
    is taken, then the entries equal to v in column order until k are taken.
    """
    if dist.shape[1] <= k:
        values, columns = torch.sort(dist, dim=1, stable=True)
        return values, columns
    kth = torch.topk(dist, k, dim=1, largest=False).values.amax(1, keepdim=True)
    take = dist <= kth
    if not bool((take.sum(1) == k).all()):
        # Some row has more than k entries at or below v: keep the first of those equal to v.
        below = dist < kth
        at_kth = dist == kth
        take = below | (at_kth & (at_kth.cumsum(1) <= k - below.sum(1, keepdim=True)))
    columns = take.nonzero()[:, 1].view(dist.shape[0], k)
    values = dist.gather(1, columns)
    order = torch.sort(values, dim=1, stable=True).indices
    return values.gather(1, order), columns.gather(1, order)


def merge_smallest(
    best: tuple[torch.Tensor, torch.Tensor], new: tuple[torch.Tensor, torch.Tensor], k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two (distance, gallery index) lists, each sorted, keeping the ``k`` first.

    Every index in ``best`` must be smaller than every index in ``new`` (earlier
    chunks first): a stable sort of the concatenation then orders by (distance, index).
    """
    values = torch.cat([best[0], new[0]], dim=1)
    indices = torch.cat([best[1], new[1]], dim=1)
    order = torch.sort(values, dim=1, stable=True).indices[:, :k]
    return values.gather(1, order), indices.gather(1, order)


def _faiss_block(
    query: torch.Tensor, chunk: torch.Tensor, k: int, metric: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest rows of ``chunk`` by faiss's exact flat search, as (distance, column), sorted."""
    faiss = importlib.import_module("faiss")
    xq = np.ascontiguousarray(query.cpu().numpy(), dtype=np.float32)
    xb = np.ascontiguousarray(chunk.cpu().numpy(), dtype=np.float32)
    if metric == "cosine":
        similarity, columns = faiss.knn(xq, xb, k, metric=faiss.METRIC_INNER_PRODUCT)
        values = 1.0 - similarity
    else:
        squared, columns = faiss.knn(xq, xb, k, metric=faiss.METRIC_L2)
        values = np.sqrt(np.maximum(squared, 0.0))
    values, columns = torch.from_numpy(values), torch.from_numpy(columns.astype(np.int64))
    order = torch.sort(values, dim=1, stable=True).indices
    return values.gather(1, order), columns.gather(1, order)


def _check_faiss() -> None:
    """Raise ``ConfigError`` when faiss cannot be imported."""
    try:
        importlib.import_module("faiss")
    except ImportError as error:
        raise ConfigError(
            "backend='faiss' needs the faiss package (pip install faiss-cpu); "
            "backend='exact' needs nothing more"
        ) from error


@torch.no_grad()
def topk_search(
    query_feats: Array,
    gallery_feats: Array,
    k: int,
    metric: str = "cosine",
    chunk_size: int | None = None,
    backend: str = "exact",
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest gallery rows of every query, reading the gallery ``chunk_size`` rows at a time.

    Parameters
    ----------
    query_feats : array [Q, D]
    gallery_feats : array [G, D]
        May be a numpy memmap larger than memory: only one chunk is read at a time.
    k : int
        Neighbours per query, 1 <= k <= G.
    metric : {"cosine", "euclidean"}
        As in :func:`marreid.metrics.compute_distance_matrix`.
    chunk_size : int, optional
        Gallery rows per chunk; by default about 16M elements of features or distances.
    backend : {"exact", "faiss"}
        ``exact`` (default) is a torch matrix product per chunk, ties ordered by
        gallery index. ``faiss`` uses faiss's flat (also exhaustive) search per chunk
        when faiss is installed; its order among equal distances is faiss's.

    Returns
    -------
    distances : numpy array [Q, k], ascending along each row
    indices : numpy int64 array [Q, k], gallery rows
    """
    check_metric(metric)
    check_features(query_feats, gallery_feats, "query_feats", "gallery_feats")
    check_positive(chunk_size, "chunk_size")
    if backend not in BACKENDS:
        raise ConfigError(f"backend={backend!r} is not one of {', '.join(BACKENDS)}")
    num_gallery, dim = gallery_feats.shape
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= num_gallery:
        raise ConfigError(f"k={k!r} must be an integer from 1 to the gallery size {num_gallery}")
    if backend == "faiss":
        _check_faiss()
    device = query_feats.device if isinstance(query_feats, torch.Tensor) else None
    query = prepare_rows(to_tensor(query_feats, device), metric)
    rows = chunk_size or max(1, _CHUNK_ELEMENTS // max(dim, query.shape[0]))
    best: tuple[torch.Tensor, torch.Tensor] | None = None
    for start in range(0, num_gallery, rows):
        chunk = prepare_rows(to_tensor(gallery_feats[start : start + rows], device), metric)
        if backend == "faiss":
            values, columns = _faiss_block(query, chunk, min(k, chunk.shape[0]), metric)
        else:
            dist = distance_block(query, chunk, metric)
            # One reduction finds NaN (it propagates through amax) and overflowed distances.
            if not torch.isfinite(dist.amax()):
                raise DatasetError(
                    f"gallery_feats or query_feats hold NaN or infinite values (gallery rows from {start})"
                )
            values, columns = smallest_k(dist, k)
        found = (values.cpu(), columns.cpu() + start)
        best = found if best is None else merge_smallest(best, found, k)
    return best[0].numpy(), best[1].numpy()
