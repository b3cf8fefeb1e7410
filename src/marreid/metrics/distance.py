"""Query-to-gallery distance matrices (cosine and plain Euclidean), computed in row blocks."""

from __future__ import annotations

from typing import Union

import numpy as np
import torch

from marreid.errors import ConfigError, DatasetError

Array = Union[np.ndarray, torch.Tensor]

METRICS = ("cosine", "euclidean")

# Elements of one distance block; bounds the temporaries of every chunked loop in this package
# (about 8M elements: 32 MB per float32 block).
BLOCK_ELEMENTS = 1 << 23


def check_metric(metric: str) -> None:
    """Raise ``ConfigError`` unless ``metric`` is one of ``METRICS``."""
    if metric not in METRICS:
        raise ConfigError(f"metric={metric!r} is not one of {', '.join(METRICS)}")


def check_positive(value: int | None, name: str) -> None:
    """Raise ``ConfigError`` unless ``value`` is None or an integer >= 1."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{name}={value!r} must be a positive integer")


def check_features(a: Array, b: Array, a_name: str = "a", b_name: str = "b") -> None:
    """Raise ``DatasetError`` unless ``a`` and ``b`` are 2-D arrays with the same feature dimension."""
    for x, name in ((a, a_name), (b, b_name)):
        if not isinstance(x, (np.ndarray, torch.Tensor)):
            raise DatasetError(f"{name} must be a numpy array or a torch tensor, got {type(x).__name__}")
        if isinstance(x, np.ndarray) and not (
            np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_
        ):
            raise DatasetError(f"{name} must hold numbers, got dtype {x.dtype}")
        if x.ndim != 2:
            raise DatasetError(f"{name} must be 2-D [rows, dim], got shape {tuple(x.shape)}")
        if x.shape[1] == 0:
            raise DatasetError(f"{name} has feature dimension 0")
    if a.shape[1] != b.shape[1]:
        raise DatasetError(
            f"{a_name} has dimension {a.shape[1]} but {b_name} has dimension {b.shape[1]}"
        )


def block_rows(num_cols: int) -> int:
    """Rows per block so that a block of ``num_cols`` columns stays near ``BLOCK_ELEMENTS``."""
    return max(1, BLOCK_ELEMENTS // max(1, num_cols))


def to_tensor(x: Array, device: torch.device | None = None) -> torch.Tensor:
    """A floating tensor view or copy of ``x`` (float64 kept, any other dtype made float32).

    Writable float numpy arrays are wrapped without a copy; a float tensor
    already on ``device`` is returned as it is.
    """
    if isinstance(x, np.ndarray):
        arr = np.asarray(x, dtype=np.float64 if x.dtype == np.float64 else np.float32)
        # torch warns on wrapping a read-only buffer (e.g. a memmap opened with mode="r"): copy it.
        x = torch.from_numpy(arr if arr.flags.writeable else arr.copy())
    elif x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    return x if device is None else x.to(device)


def prepare_rows(x: torch.Tensor, metric: str) -> torch.Tensor:
    """Rows as the distance kernel expects them: L2-normalised for cosine, unchanged for Euclidean.

    A zero row stays zero (``torch.nn.functional.normalize`` divides by max(norm, 1e-12)),
    so its cosine distance to anything is 1.
    """
    if metric == "cosine":
        return torch.nn.functional.normalize(x, dim=1)
    return x


def distance_block(a: torch.Tensor, b: torch.Tensor, metric: str) -> torch.Tensor:
    """Distances between rows already passed through :func:`prepare_rows`.

    cosine:    d(a, b) = 1 - <a, b>                      (a, b unit rows)
    euclidean: d(a, b) = sqrt(max(|a|^2 + |b|^2 - 2 <a, b>, 0))

    The Euclidean expansion loses about eps * |a|^2 of absolute precision for
    nearly equal rows; pass float64 rows when that matters.
    """
    dtype = torch.promote_types(a.dtype, b.dtype)
    a, b = a.to(dtype), b.to(dtype)
    if metric == "cosine":
        return torch.addmm(a.new_ones(()), a, b.T, alpha=-1.0)
    norms = (a * a).sum(1, keepdim=True) + (b * b).sum(1)[None, :]
    return torch.addmm(norms, a, b.T, alpha=-2.0).clamp_(min=0.0).sqrt_()


@torch.no_grad()
def compute_distance_matrix(
    a: Array, b: Array, metric: str = "cosine", chunk_size: int | None = None
) -> Array:
    """Distance between every row of ``a`` and every row of ``b``.

    Parameters
    ----------
    a, b : numpy array or torch tensor, shape [M, D] and [N, D]
        Feature rows. Numpy inputs (memory-mapped ones too) are read ``chunk_size``
        rows of ``a`` at a time. Float64 stays float64, any other dtype is computed in float32.
    metric : {"cosine", "euclidean"}
        ``cosine`` is 1 - cos(a_i, b_j) of the L2-normalised rows, in [0, 2].
        ``euclidean`` is the plain (not squared) Euclidean distance ||a_i - b_j||.
    chunk_size : int, optional
        Rows of ``a`` per block; by default chosen so one block holds about 8M distances.

    Returns
    -------
    numpy array or torch tensor, shape [M, N]
        A tensor (on ``a``'s device when ``a`` is a tensor) if either input is a
        tensor, else a numpy array. No autograd graph is recorded.

    Examples
    --------
    >>> import numpy as np
    >>> compute_distance_matrix(np.array([[1.0, 0.0]]), np.array([[0.0, 2.0], [3.0, 0.0]]))
    array([[1., 0.]])
    >>> compute_distance_matrix(np.array([[0.0, 0.0]]), np.array([[3.0, 4.0]]), metric="euclidean")
    array([[5.]])
    """
    check_metric(metric)
    check_features(a, b)
    check_positive(chunk_size, "chunk_size")
    device = a.device if isinstance(a, torch.Tensor) else None
    gallery = prepare_rows(to_tensor(b, device), metric)
    rows = chunk_size or block_rows(b.shape[0])
    dtype = torch.promote_types(to_tensor(a[:0]).dtype, gallery.dtype)
    out = torch.empty(a.shape[0], b.shape[0], dtype=dtype, device=gallery.device)
    for i in range(0, a.shape[0], rows):
        query = prepare_rows(to_tensor(a[i : i + rows], device), metric)
        out[i : i + rows] = distance_block(query, gallery, metric)
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return out
    return out.numpy()
