"""Ranked lists: what each gallery image is to its query under the Market-1501 protocol,
which queries to show, and the grid (laid out by ``plotting.GridLayout``) and table written
from them."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from marreid.analysis.plotting import GridLayout, Tile, render_grid, save_png
from marreid.data import Sample
from marreid.errors import ConfigError
from marreid.metrics.search import topk_search

MATCH = "match"
FALSE = "false"
SAME_CAMERA = "same camera"
JUNK = "junk"
IGNORED = (SAME_CAMERA, JUNK)
QUERY = "query"
RESULT = "result"
FRAME_COLOURS: dict[str, tuple[int, int, int]] = {
    QUERY: (30, 90, 220),
    MATCH: (0, 190, 0),
    FALSE: (220, 0, 0),
    SAME_CAMERA: (150, 150, 150),
    JUNK: (150, 150, 150),
    RESULT: (60, 60, 60),
}
IGNORED_CAPTIONS = {SAME_CAMERA: "same cam (ign.)", JUNK: "junk (ignored)"}


def frame_status(q_pid: int, q_camid: int, g_pid: int, g_camid: int) -> str:
    """What gallery image (g_pid, g_camid) is to query (q_pid, q_camid) in the Market-1501 protocol.

    ``junk`` if g_pid = -1; ``same camera`` if g_pid = q_pid and g_camid = q_camid (both
    ignored by the protocol); ``match`` if g_pid = q_pid on another camera; else ``false``
    (distractors, pid 0 in Market-style galleries, are false matches).
    """
    if g_pid == -1:
        return JUNK
    if g_pid == q_pid:
        return SAME_CAMERA if g_camid == q_camid else MATCH
    return FALSE


def frame_statuses(q_pid: int, q_camid: int, g_pids: Sequence[int], g_camids: Sequence[int]) -> list[str]:
    """:func:`frame_status` of each ranked gallery image, in rank order."""
    return [frame_status(int(q_pid), int(q_camid), int(p), int(c)) for p, c in zip(g_pids, g_camids)]


def choose_queries(num_query: int, count: int | None = None, indices: Sequence[int] | None = None,
                   seed: int = 0) -> list[int]:
    """The query rows to show: ``indices`` as given, else ``count`` distinct rows drawn at random
    with ``seed`` (all of them if there are fewer), in increasing order."""
    if indices:
        for i in indices:
            if not 0 <= i < num_query:
                raise ConfigError(f"--query-index {i}: out of range, the query split has {num_query} images "
                                  f"(0..{num_query - 1})")
        return list(indices)
    if count is None or count < 1:
        raise ConfigError(f"--queries must be at least 1, got {count}")
    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.choice(num_query, size=min(count, num_query), replace=False))


@dataclass(frozen=True)
class RankedList:
    """One query's top-k: its row in the query split, and per rank the gallery row, the
    distance and the protocol status (:func:`frame_status`)."""

    query_index: int
    gallery_indices: list[int]
    distances: list[float]
    statuses: list[str]


def ranked_lists(query_feats: np.ndarray, gallery_feats: np.ndarray, query: Sequence[Sample],
                 gallery: Sequence[Sample], chosen: Sequence[int], k: int, metric: str = "cosine") -> list[RankedList]:
    """The ``k`` nearest gallery images (all of them if fewer) of each chosen query, ordered by
    (distance, gallery row), every one with its status; nothing is dropped, ignored images included.

    ``query_feats`` row i belongs to query ``chosen[i]`` of ``query``.
    """
    k = min(k, len(gallery))
    distances, indices = topk_search(query_feats, gallery_feats, k, metric=metric)
    out = []
    for qi, drow, irow in zip(chosen, distances, indices):
        q = query[qi]
        ranked = [gallery[int(j)] for j in irow]
        out.append(RankedList(int(qi), [int(j) for j in irow], [float(d) for d in drow],
                              frame_statuses(q.pid, q.camid, [g.pid for g in ranked], [g.camid for g in ranked])))
    return out


def identity_caption(sample: Sample) -> str:
    """``id <pid> c<camera>``, the camera counted from 1 as in Market-1501 file names."""
    return f"id {sample.pid} c{sample.camid + 1}"


def write_ranked_lists(lists: list[RankedList], query: Sequence[Sample], gallery: Sequence[Sample],
                       out_dir: str | Path, layout: GridLayout, name: str = "ranks") -> dict[str, Path]:
    """``name``.png (query framed blue, true matches green, false red, ignored grey with a label)
    and ``name``.csv (one line per query and rank); returns both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tiles = []
    rows = []
    for ranked in lists:
        q = query[ranked.query_index]
        row = [Tile(q.path, FRAME_COLOURS[QUERY], (f"query {ranked.query_index}", identity_caption(q)))]
        for rank, (j, d, status) in enumerate(zip(ranked.gallery_indices, ranked.distances, ranked.statuses), 1):
            g = gallery[j]
            second = IGNORED_CAPTIONS.get(status, identity_caption(g))
            row.append(Tile(g.path, FRAME_COLOURS[status], (f"#{rank} {d:.3f}", second)))
            rows.append([ranked.query_index, q.path, q.pid, q.camid, rank, j, g.path, g.pid, g.camid, d, status])
        tiles.append(row)
    png = save_png(render_grid(tiles, layout), out_dir / f"{name}.png")
    table = out_dir / f"{name}.csv"
    with table.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["query_index", "query_path", "query_pid", "query_camid", "rank", "gallery_index",
                         "gallery_path", "gallery_pid", "gallery_camid", "distance", "status"])
        writer.writerows(rows)
    return {"png": png, "csv": table}


__all__ = ["MATCH", "FALSE", "SAME_CAMERA", "JUNK", "IGNORED", "QUERY", "RESULT", "FRAME_COLOURS",
           "frame_status", "frame_statuses", "choose_queries", "RankedList", "ranked_lists",
           "identity_caption", "write_ranked_lists"]
