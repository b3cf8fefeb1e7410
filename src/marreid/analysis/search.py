"""Searching a gallery with query images: gallery features from a ``marreid extract`` file or a
folder (extracted once, then cached), and the exact top-k by ``metrics.search.topk_search``."""

from __future__ import annotations

import csv
import hashlib
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from marreid.analysis.plotting import GridLayout, Tile, render_grid, save_png
from marreid.analysis.ranklist import FRAME_COLOURS, QUERY, RESULT
from marreid.config import Config
from marreid.data import Sample
from marreid.data.sample import is_image
from marreid.errors import DatasetError
from marreid.metrics.search import topk_search

FEATURE_KEYS = ("feats", "paths", "pids", "camids")


@dataclass
class Gallery:
    """Gallery features (float32 [G, D]) with each row's image path, pid and camid (-1: unknown)."""

    feats: np.ndarray
    paths: list[str]
    pids: np.ndarray
    camids: np.ndarray


@dataclass(frozen=True)
class Hit:
    """One search result: 1-based rank, gallery row, its distance to the query and its image."""

    rank: int
    index: int
    distance: float
    path: str


def load_feature_file(path: str | Path) -> Gallery:
    """A ``marreid extract`` .npz (``feats``, ``paths``; ``pids`` / ``camids`` optional).

    Raises DatasetError naming the file when it is unreadable or its arrays disagree.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"gallery feature file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in FEATURE_KEYS if key in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DatasetError(f"{path}: not a readable .npz feature file ({str(exc).splitlines()[0]})") from None
    for key in ("feats", "paths"):
        if key not in arrays:
            raise DatasetError(f"{path}: no '{key}' array (expected the .npz written by `marreid extract`)")
    feats = arrays["feats"]
    if feats.ndim != 2 or feats.shape[0] == 0:
        raise DatasetError(f"{path}: 'feats' must be a non-empty [N, D] array, got shape {feats.shape}")
    rows = feats.shape[0]
    unknown = np.full(rows, -1, np.int64)
    gallery = Gallery(feats.astype(np.float32, copy=False), [str(p) for p in arrays["paths"]],
                      arrays.get("pids", unknown).astype(np.int64), arrays.get("camids", unknown).astype(np.int64))
    for key, value in (("paths", gallery.paths), ("pids", gallery.pids), ("camids", gallery.camids)):
        if len(value) != rows:
            raise DatasetError(f"{path}: '{key}' has {len(value)} entries for {rows} feature rows")
    return gallery


def save_feature_file(path: str | Path, gallery: Gallery, cache_key: str | None = None) -> Path:
    """Write ``gallery`` in the ``marreid extract`` layout (plus ``cache_key`` when given)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = {} if cache_key is None else {"cache_key": np.array(cache_key)}
    with path.open("wb") as fh:  # a handle, so numpy does not append a second .npz suffix
        np.savez(fh, feats=gallery.feats, paths=np.array(gallery.paths), pids=gallery.pids,
                 camids=gallery.camids, **extra)
    return path


def folder_samples(folder: str | Path) -> list[Sample]:
    """Every image under ``folder`` (recursively, sorted), with unknown pid / camid (-1)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"--gallery: neither a folder nor a .npz feature file: {folder}")
    samples = [Sample(str(p), -1, -1) for p in sorted(folder.rglob("*")) if p.is_file() and is_image(p.name)]
    if not samples:
        raise DatasetError(f"--gallery: no images under {folder}")
    return samples


def cache_key(checkpoint: str | Path, cfg: Config, samples: list[Sample]) -> str:
    """A digest of what a folder gallery's features depend on: the checkpoint file (path, size,
    modification time), the test transform's settings and every image (path, size, modification time)."""
    digest = hashlib.sha256()
    ckpt = Path(checkpoint).resolve()
    stat = ckpt.stat()
    digest.update(f"{ckpt}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    digest.update(f"{cfg.data.height}|{cfg.data.width}|{cfg.data.mean}|{cfg.data.std}\n".encode())
    for s in samples:
        st = os.stat(s.path)
        digest.update(f"{os.path.abspath(s.path)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def cache_path(out_dir: str | Path, folder: str | Path) -> Path:
    """Where a folder gallery's features are cached: ``out_dir/gallery_<folder name>_<8 hex>.npz``,
    the hex from the folder's absolute path, so two folders of one name do not collide."""
    folder = Path(folder).resolve()
    tag = hashlib.sha256(str(folder).encode()).hexdigest()[:8]
    return Path(out_dir) / f"gallery_{folder.name or 'root'}_{tag}.npz"


def read_cache(path: Path, key: str) -> Gallery | None:
    """The cached gallery at ``path`` if it exists and was made with ``key``; else None."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            if "cache_key" not in data.files or str(data["cache_key"]) != key:
                return None
    except (OSError, ValueError, zipfile.BadZipFile):
        return None
    return load_feature_file(path)


def search(query_feats: np.ndarray, gallery: Gallery, k: int, metric: str = "cosine") -> list[list[Hit]]:
    """The ``k`` nearest gallery rows of each query (all of them if the gallery is smaller),
    ordered by (distance, gallery row)."""
    if query_feats.shape[1] != gallery.feats.shape[1]:
        raise DatasetError(f"the gallery features have dimension {gallery.feats.shape[1]}, the model gives "
                           f"{query_feats.shape[1]}: they were extracted with another model")
    k = min(k, gallery.feats.shape[0])
    distances, indices = topk_search(query_feats, gallery.feats, k, metric=metric)
    return [[Hit(rank + 1, int(j), float(d), gallery.paths[int(j)]) for rank, (d, j) in enumerate(zip(drow, irow))]
            for drow, irow in zip(distances, indices)]


def short_name(path: str, limit: int = 12) -> str:
    """The file name, cut to its last ``limit`` characters (a caption under a tile)."""
    name = Path(path).name
    return name if len(name) <= limit else "…" + name[-(limit - 1):]


def write_search_results(queries: list[str], hits: list[list[Hit]], out_dir: str | Path,
                         layout: GridLayout, name: str = "search") -> dict[str, Path]:
    """``name``.png (one row per query: the query, then its results with rank and distance) and
    ``name``.csv (query, rank, gallery row, distance, gallery image); returns both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tiles, rows = [], []
    for query, found in zip(queries, hits):
        row = [Tile(query, FRAME_COLOURS[QUERY], ("query", short_name(query)))]
        for hit in found:
            row.append(Tile(hit.path, FRAME_COLOURS[RESULT], (f"#{hit.rank} {hit.distance:.3f}", short_name(hit.path))))
            rows.append([query, hit.rank, hit.index, hit.distance, hit.path])
        tiles.append(row)
    png = save_png(render_grid(tiles, layout), out_dir / f"{name}.png")
    table = out_dir / f"{name}.csv"
    with table.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["query_path", "rank", "gallery_index", "distance", "gallery_path"])
        writer.writerows(rows)
    return {"png": png, "csv": table}


__all__ = ["Gallery", "Hit", "load_feature_file", "save_feature_file", "folder_samples", "cache_key",
           "cache_path", "read_cache", "search",
           "short_name", "write_search_results"]
