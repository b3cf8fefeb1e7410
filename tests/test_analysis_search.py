"""Gallery search helpers: feature files, the cache key and the top-k against a brute-force sort."""

from __future__ import annotations

import csv
import os

import numpy as np
import pytest
from PIL import Image

from marreid.analysis.plotting import GridLayout
from marreid.analysis.search import (
    Gallery,
    cache_key,
    cache_path,
    folder_samples,
    load_feature_file,
    read_cache,
    save_feature_file,
    search,
    write_search_results,
)
from marreid.config import Config
from marreid.errors import DatasetError


def brute_force(query: np.ndarray, gallery: np.ndarray) -> list[list[tuple[float, int]]]:
    """Every cosine distance from its definition, sorted by (distance, gallery row)."""
    out = []
    for q in query.astype(np.float64):
        row = []
        for j, g in enumerate(gallery.astype(np.float64)):
            row.append((1.0 - float(q @ g) / (np.linalg.norm(q) * np.linalg.norm(g)), j))
        out.append(sorted(row))
    return out


def gallery_of(feats: np.ndarray) -> Gallery:
    n = len(feats)
    return Gallery(feats, [f"img{i}.jpg" for i in range(n)], np.full(n, -1), np.full(n, -1))


def test_search_equals_brute_force() -> None:
    rng = np.random.default_rng(0)
    gallery = gallery_of(rng.standard_normal((40, 8)).astype(np.float32))
    query = rng.standard_normal((3, 8)).astype(np.float32)
    hits = search(query, gallery, k=7)
    for found, want in zip(hits, brute_force(query, gallery.feats)):
        assert [h.index for h in found] == [j for _, j in want[:7]]
        np.testing.assert_allclose([h.distance for h in found], [d for d, _ in want[:7]], atol=1e-5)
        assert [h.rank for h in found] == list(range(1, 8))
        assert [h.path for h in found] == [f"img{j}.jpg" for _, j in want[:7]]
    assert len(search(query, gallery, k=100)[0]) == 40  # k beyond the gallery: all of it
    with pytest.raises(DatasetError, match="dimension 8"):
        search(query[:, :4], gallery, k=3)


def test_feature_file_round_trip_and_errors(tmp_path) -> None:
    gallery = Gallery(np.eye(3, dtype=np.float32), ["a", "b", "c"], np.array([1, 2, 3]), np.array([0, 1, 0]))
    path = save_feature_file(tmp_path / "g.npz", gallery, cache_key="k1")
    back = load_feature_file(path)
    np.testing.assert_array_equal(back.feats, gallery.feats)
    assert back.paths == ["a", "b", "c"] and back.pids.tolist() == [1, 2, 3] and back.camids.tolist() == [0, 1, 0]
    assert read_cache(path, "k1") is not None and read_cache(path, "k2") is None

    np.savez(tmp_path / "nopaths.npz", feats=np.eye(2))
    with pytest.raises(DatasetError, match="nopaths.npz: no 'paths'"):
        load_feature_file(tmp_path / "nopaths.npz")
    np.savez(tmp_path / "short.npz", feats=np.eye(2), paths=np.array(["a"]))
    with pytest.raises(DatasetError, match="short.npz: 'paths' has 1 entries for 2"):
        load_feature_file(tmp_path / "short.npz")
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(DatasetError, match="junk.npz"):
        load_feature_file(tmp_path / "junk.npz")
    np.savez(tmp_path / "plain.npz", feats=np.eye(2), paths=np.array(["a", "b"]))
    assert load_feature_file(tmp_path / "plain.npz").pids.tolist() == [-1, -1]  # unknown without pids


def test_cache_key_follows_images_checkpoint_and_input_size(tmp_path) -> None:
    folder = tmp_path / "gallery"
    (folder / "sub").mkdir(parents=True)
    for name in ("b.jpg", "a.png", "sub/c.jpg"):
        Image.new("RGB", (4, 8), (1, 2, 3)).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    samples = folder_samples(folder)
    assert [os.path.relpath(s.path, folder) for s in samples] == ["a.png", "b.jpg", "sub/c.jpg"]
    ckpt = tmp_path / "m.pt"
    ckpt.write_bytes(b"weights")
    cfg = Config()
    key = cache_key(ckpt, cfg, samples)
    assert cache_key(ckpt, cfg, samples) == key
    os.utime(folder / "b.jpg", ns=(1, 1))
    assert cache_key(ckpt, cfg, samples) != key
    key = cache_key(ckpt, cfg, samples)
    Image.new("RGB", (4, 8)).save(folder / "d.jpg")
    assert cache_key(ckpt, cfg, folder_samples(folder)) != key
    cfg.data.height = 64
    assert cache_key(ckpt, cfg, samples) != key
    ckpt.write_bytes(b"other weights")
    assert cache_key(ckpt, Config(), samples) != key
    # two folders of one name are cached apart
    assert cache_path(tmp_path, tmp_path / "x" / "gallery") != cache_path(tmp_path, folder)
    assert cache_path(tmp_path, folder).parent == tmp_path
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        folder_samples(tmp_path / "empty")
    with pytest.raises(DatasetError, match="neither a folder"):
        folder_samples(tmp_path / "missing")


def test_search_grid_and_table(tmp_path) -> None:
    paths = []
    for i, colour in enumerate([(200, 0, 0), (0, 200, 0), (0, 0, 200)]):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.new("RGB", (8, 16), colour).save(paths[-1])
    gallery = Gallery(np.array([[1, 0], [0, 1], [1, 1]], np.float32), paths, np.full(3, -1), np.full(3, -1))
    hits = search(np.array([[1.0, 0.2]], np.float32), gallery, k=3)
    layout = GridLayout(rows=1, cols=3, tile_h=16, tile_w=8)
    files = write_search_results([paths[0]], hits, tmp_path / "out", layout)
    with Image.open(files["png"]) as img:
        assert img.size == (layout.size()[1], layout.size()[0])
        pixels = np.asarray(img.convert("RGB"))
    y, x = layout.origin(0, 1)  # the nearest result is gallery row 0, the red image
    assert tuple(pixels[y + layout.border + 8, x + layout.border + 4]) == (200, 0, 0)
    with files["csv"].open() as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["gallery_index"]) for r in rows] == [0, 2, 1]
    assert [r["gallery_path"] for r in rows] == [paths[0], paths[2], paths[1]]
