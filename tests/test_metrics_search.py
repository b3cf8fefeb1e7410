from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch

from marreid.errors import ConfigError, DatasetError
from marreid.metrics import topk_search


def exact_features(rng: np.random.Generator, rows: int, metric: str) -> np.ndarray:
    """Features with exactly computed distances (and so many exact ties)."""
    if metric == "euclidean":
        return rng.integers(-2, 3, (rows, 3)).astype(np.float32)
    feats = np.zeros((rows, 3), np.float32)
    feats[np.arange(rows), rng.integers(0, 3, rows)] = rng.choice([-3.0, -1.0, 2.0], rows)
    return feats


def full_sort(query: np.ndarray, gallery: np.ndarray, k: int, metric: str):
    """Every distance from the definition, then a sort by (distance, gallery index)."""
    distances, indices = [], []
    for q in query.astype(np.float64):
        if metric == "euclidean":
            row = [math.sqrt(((q - g) ** 2).sum()) for g in gallery.astype(np.float64)]
        else:
            row = [
                1.0 - (q @ g) / (np.linalg.norm(q) * np.linalg.norm(g)) for g in gallery.astype(np.float64)
            ]
        order = sorted(range(len(row)), key=lambda j: (row[j], j))[:k]
        indices.append(order)
        distances.append([row[j] for j in order])
    return np.array(distances), np.array(indices)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("chunk_size", [1, 4, 7, None])
def test_matches_full_sort_with_ties(metric: str, chunk_size: int | None) -> None:
    rng = np.random.default_rng(0)
    query, gallery = exact_features(rng, 5, metric), exact_features(rng, 45, metric)
    for k in (1, 6, 45):
        distances, indices = topk_search(query, gallery, k, metric=metric, chunk_size=chunk_size)
        want_distances, want_indices = full_sort(query, gallery, k, metric)
        np.testing.assert_array_equal(indices, want_indices)
        np.testing.assert_allclose(distances, want_distances, atol=1e-6)
        assert indices.dtype == np.int64 and distances.shape == (5, k)


def test_random_features_match_full_sort() -> None:
    rng = np.random.default_rng(1)
    query = rng.standard_normal((4, 16)).astype(np.float32)
    gallery = rng.standard_normal((300, 16)).astype(np.float32)
    distances, indices = topk_search(query, gallery, 20, chunk_size=64)
    want_distances, want_indices = full_sort(query, gallery, 20, "cosine")
    np.testing.assert_array_equal(indices, want_indices)
    np.testing.assert_allclose(distances, want_distances, atol=1e-5)


def test_memmap_gallery_and_tensor_queries(tmp_path) -> None:
    rng = np.random.default_rng(2)
    query, gallery = exact_features(rng, 3, "euclidean"), exact_features(rng, 50, "euclidean")
    path = tmp_path / "gallery.f32"
    gallery.tofile(path)
    mapped = np.memmap(path, dtype=np.float32, mode="r", shape=gallery.shape)
    distances, indices = topk_search(torch.from_numpy(query), mapped, 8, metric="euclidean", chunk_size=9)
    want_distances, want_indices = full_sort(query, gallery, 8, "euclidean")
    np.testing.assert_array_equal(indices, want_indices)
    np.testing.assert_allclose(distances, want_distances, atol=1e-6)


def test_faiss_backend_without_faiss_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(ConfigError, match="backend='faiss' needs the faiss package"):
        topk_search(np.ones((1, 2)), np.ones((3, 2)), 1, backend="faiss")


def test_bad_inputs() -> None:
    query, gallery = np.ones((2, 3)), np.ones((4, 3))
    with pytest.raises(ConfigError, match="k=5 must be an integer from 1 to the gallery size 4"):
        topk_search(query, gallery, 5)
    with pytest.raises(ConfigError, match="k=0"):
        topk_search(query, gallery, 0)
    with pytest.raises(ConfigError, match="backend='annoy' is not one of exact, faiss"):
        topk_search(query, gallery, 1, backend="annoy")
    with pytest.raises(DatasetError, match="gallery_feats has dimension 2"):
        topk_search(query, np.ones((4, 2)), 1)
    bad = gallery.copy()
    bad[2, 0] = np.nan
    with pytest.raises(DatasetError, match="NaN or infinite"):
        topk_search(query, bad, 1)
