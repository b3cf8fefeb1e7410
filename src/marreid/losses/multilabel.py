"""Soft multilabels (Eq. 1) and their pairwise agreement (Eq. 2).

Everything here is pure tensor code. Pairs are always the distinct pairs
``i < j`` in row-major order, the order of ``torch.pdist`` and of
``torch.triu_indices(n, n, 1)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from marreid.errors import DatasetError

Tensor = torch.Tensor


def upcast(x: Tensor) -> Tensor:
    """Return ``x`` in float32 when it is a half type, unchanged otherwise.

    The losses take exponentials, logs and small differences of nearly equal
    values, so bf16 / fp16 inputs from autocast are widened before any arithmetic.
    """
    if x.dtype in (torch.float16, torch.bfloat16):
        return x.float()
    return x


def soft_multilabel(logits: Tensor) -> Tensor:
    """Eq. 1: y = softmax_k(s * cos(f, a_k)) over the agents.

    Parameters
    ----------
    logits : Tensor
        ``[B, N]`` scaled cosine similarities to the N reference agents.

    Returns
    -------
    Tensor
        ``[B, N]`` soft multilabels, each row a distribution.
    """
    return F.softmax(upcast(logits), dim=1)


def log_soft_multilabel(logits: Tensor) -> Tensor:
    """Log of Eq. 1, computed as a log-softmax so that tiny entries stay finite."""
    return F.log_softmax(upcast(logits), dim=1)


def pairwise_agreement(y_a: Tensor, y_b: Tensor | None = None, chunk: int = 1024) -> Tensor:
    """Eq. 2: A(y_i, y_j) = sum_k min(y_i^k, y_j^k) for every row i of y_a and j of y_b.

    For distributions (rows summing to one) this equals ``1 - ||y_i - y_j||_1 / 2``,
    which is what is computed: an L1 distance matrix needs no ``[n, m, N]``
    intermediate. Rows of ``y_a`` are processed ``chunk`` at a time.

    Parameters
    ----------
    y_a : Tensor
        ``[n, N]`` soft multilabels.
    y_b : Tensor, optional
        ``[m, N]``; ``y_a`` itself when omitted.
    chunk : int
        Rows of ``y_a`` per block.

    Returns
    -------
    Tensor
        ``[n, m]`` agreements in [0, 1].
    """
    y_a = upcast(y_a)
    y_b = y_a if y_b is None else upcast(y_b)
    blocks = [1.0 - torch.cdist(y_a[s : s + chunk], y_b, p=1.0) / 2.0 for s in range(0, len(y_a), chunk)]
    if not blocks:
        return y_a.new_zeros((0, len(y_b)))
    return torch.cat(blocks)


def pair_agreements(y: Tensor) -> Tensor:
    """Eq. 2 for the distinct pairs i < j of rows of ``y``, row-major, ``[n(n-1)/2]``.

    Same values as the upper triangle of ``pairwise_agreement(y)``, through
    ``torch.pdist``, which is an order of magnitude faster than ``cdist`` for p = 1.
    """
    return 1.0 - torch.pdist(upcast(y), p=1.0) / 2.0


def pair_count(n: int) -> int:
    """Number of distinct pairs among ``n`` items, M = n(n-1)/2."""
    return n * (n - 1) // 2


def top_count(num_pairs: int, ratio: float) -> int:
    """The number of pairs in the top fraction ``ratio`` of ``num_pairs``: ceil(p*M), at least 1.

    The product is rounded to 9 decimals first so that, e.g., 0.1 * 30 counts
    3 pairs and not 4 through float error. The release truncates instead
    (``int(p*M)``, which gives 0 pairs for small batches); ceil keeps the
    mined set non-empty, as the adaptive threshold S of Eq. 3 requires.
    """
    return max(1, math.ceil(round(ratio * num_pairs, 9)))


def top_quantile(pair_values: Tensor, ratio: float) -> float:
    """The k-th largest of ``pair_values`` with k = top_count(M, ratio).

    Only a fraction ``ratio`` of the pairs lie above it: the release's
    ``sort(agreements)[-k]`` used for the agreement threshold T.
    """
    k = top_count(len(pair_values), ratio)
    return float(pair_values.topk(k).values[-1])


def _cross_pairs(n_first: int, n_second: int, device: torch.device) -> Tensor:
    """Positions, in pdist order over ``n_first + n_second`` rows, of the pairs (i in the first group, j in the second).

    Pair (i, j), i < j, of m rows sits at i*m - i(i+1)/2 + (j - i - 1).
    """
    m = n_first + n_second
    i = torch.arange(n_first, device=device)[:, None]
    j = torch.arange(n_first, m, device=device)[None, :]
    return (i * m - i * (i + 1) // 2 + j - i - 1).flatten()


def _tiled_pair_agreements(tiles: list[Tensor]) -> Iterator[Tensor]:
    """Eq. 2 for every distinct pair of rows across ``tiles``: each tile's own pairs, then each pair of tiles."""
    for index, first in enumerate(tiles):
        yield pair_agreements(first)
        for second in tiles[index + 1 :]:
            yield pair_agreements(torch.cat([first, second]))[_cross_pairs(len(first), len(second), first.device)]


def agreement_top_quantile(y: Tensor, ratio: float, tile: int = 1024) -> float:
    """The top-``ratio`` quantile of Eq. 2 over all distinct pairs of rows of ``y`` (T's initial value).

    Exact, and streaming over tiles of ``tile`` rows: the pairs inside a tile,
    then those between two tiles, keeping only the running k largest values,
    so the ``n(n-1)/2`` agreements are never held at once. Pairs between two
    tiles come from ``pdist`` over both (half of its pairs are discarded: still
    faster than ``cdist`` for p = 1).

    Parameters
    ----------
    y : Tensor
        ``[n, N]`` soft multilabels of the whole target training set.
    ratio : float
        The mining ratio p.
    tile : int
        Rows per tile; a step holds about ``2 * tile**2`` agreements.

    Returns
    -------
    float
        The k-th largest agreement, k = top_count(n(n-1)/2, ratio).
    """
    n = len(y)
    if n < 2:
        raise DatasetError(f"the target training set has {n} image(s); at least 2 are needed to set T")
    k = top_count(pair_count(n), ratio)
    tiles = list(upcast(y).split(tile))
    best = tiles[0].new_zeros(0)
    for values in _tiled_pair_agreements(tiles):
        candidates = torch.cat([best, values])
        best = candidates.topk(min(k, len(candidates))).values
    return float(best[-1])
