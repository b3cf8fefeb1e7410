from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from marreid.errors import ConfigError, DatasetError
from marreid.metrics import compute_distance_matrix


def naive_distances(a: np.ndarray, b: np.ndarray, metric: str) -> np.ndarray:
    """Straight from the definitions, one pair at a time, in float64."""
    out = np.empty((len(a), len(b)))
    for i, x in enumerate(a.astype(np.float64)):
        for j, y in enumerate(b.astype(np.float64)):
            if metric == "cosine":
                out[i, j] = 1.0 - float(x @ y) / (math.sqrt(x @ x) * math.sqrt(y @ y))
            else:
                out[i, j] = math.sqrt(float(((x - y) ** 2).sum()))
    return out


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("chunk_size", [None, 1, 3])
def test_matches_pairwise_definition(metric: str, chunk_size: int | None) -> None:
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((7, 5)), rng.standard_normal((11, 5))
    got = compute_distance_matrix(a, b, metric=metric, chunk_size=chunk_size)
    assert isinstance(got, np.ndarray) and got.dtype == np.float64
    np.testing.assert_allclose(got, naive_distances(a, b, metric), atol=1e-12)


def test_hand_worked_values() -> None:
    a = np.array([[1.0, 0.0], [0.0, 0.0]])
    b = np.array([[0.0, 2.0], [3.0, 0.0], [-1.0, 0.0], [3.0, 4.0]])
    cosine = compute_distance_matrix(a[:1], b)
    np.testing.assert_allclose(cosine, [[1.0, 0.0, 2.0, 1.0 - 3.0 / 5.0]], atol=1e-12)
    euclidean = compute_distance_matrix(a, b, metric="euclidean")
    want = [[math.sqrt(5), 2.0, 2.0, math.sqrt(20)], [2.0, 3.0, 1.0, 5.0]]
    np.testing.assert_allclose(euclidean, want, atol=1e-12)


def test_zero_row_has_cosine_distance_one() -> None:
    got = compute_distance_matrix(np.zeros((1, 3)), np.array([[1.0, 2.0, 3.0], [-4.0, 0.0, 1.0]]))
    np.testing.assert_allclose(got, [[1.0, 1.0]])


def test_tensors_in_tensor_out_and_float32_computed_in_float32() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((4, 6)).astype(np.float32), rng.standard_normal((5, 6)).astype(np.float32)
    got = compute_distance_matrix(torch.from_numpy(a), torch.from_numpy(b), metric="euclidean", chunk_size=2)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), naive_distances(a, b, "euclidean"), rtol=1e-5, atol=1e-5)
    mixed = compute_distance_matrix(a, torch.from_numpy(b))
    assert isinstance(mixed, torch.Tensor)
    np.testing.assert_allclose(mixed.numpy(), naive_distances(a, b, "cosine"), atol=1e-6)


def test_no_autograd_graph_is_kept() -> None:
    a = torch.randn(3, 4, requires_grad=True)
    assert not compute_distance_matrix(a, torch.randn(2, 4)).requires_grad


def test_read_only_memmap_is_read_in_chunks(tmp_path) -> None:
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((9, 4)).astype(np.float32), rng.standard_normal((6, 4)).astype(np.float32)
    path = tmp_path / "a.f32"
    a.tofile(path)
    mapped = np.memmap(path, dtype=np.float32, mode="r", shape=a.shape)
    got = compute_distance_matrix(mapped, b, chunk_size=4)
    np.testing.assert_allclose(got, naive_distances(a, b, "cosine"), atol=1e-6)


def test_bad_inputs_name_the_problem() -> None:
    with pytest.raises(ConfigError, match="metric='manhattan'.*cosine, euclidean"):
        compute_distance_matrix(np.ones((2, 3)), np.ones((2, 3)), metric="manhattan")
    with pytest.raises(DatasetError, match="b has dimension 4"):
        compute_distance_matrix(np.ones((2, 3)), np.ones((2, 4)))
    with pytest.raises(DatasetError, match="a must be 2-D"):
        compute_distance_matrix(np.ones(3), np.ones((2, 3)))
    with pytest.raises(DatasetError, match="must hold numbers"):
        compute_distance_matrix(np.array([["x"]]), np.ones((1, 1)))
    with pytest.raises(DatasetError, match="numpy array or a torch tensor"):
        compute_distance_matrix([[1.0]], np.ones((1, 1)))
    with pytest.raises(ConfigError, match="chunk_size=0"):
        compute_distance_matrix(np.ones((2, 3)), np.ones((2, 3)), chunk_size=0)
