"""Ranked-list decisions, grid geometry and the grid's pixels against hand-worked examples."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

from marreid.analysis.plotting import GridLayout, Tile, render_grid
from marreid.analysis.ranklist import (
    FALSE,
    FRAME_COLOURS,
    JUNK,
    MATCH,
    QUERY,
    SAME_CAMERA,
    choose_queries,
    frame_statuses,
    ranked_lists,
    write_ranked_lists,
)
from marreid.data import Sample
from marreid.errors import ConfigError


def test_frame_statuses_hand_worked() -> None:
    # query: person 5 seen by camera 0
    g_pids = [5, 5, -1, 0, 7, 5, 7]
    g_cams = [1, 0, 0, 1, 0, 2, 1]
    assert frame_statuses(5, 0, g_pids, g_cams) == [MATCH, SAME_CAMERA, JUNK, FALSE, FALSE, MATCH, FALSE]


def test_frame_colours_say_green_red_grey() -> None:
    r, g, b = FRAME_COLOURS[MATCH]
    assert g > 150 and r < 60 and b < 60
    r, g, b = FRAME_COLOURS[FALSE]
    assert r > 150 and g < 60 and b < 60
    for status in (SAME_CAMERA, JUNK):
        r, g, b = FRAME_COLOURS[status]
        assert r == g == b and 80 < r < 200
    assert len({FRAME_COLOURS[s] for s in (QUERY, MATCH, FALSE, JUNK)}) == 4


def test_choose_queries() -> None:
    assert choose_queries(10, indices=[7, 2]) == [7, 2]
    drawn = choose_queries(10, count=4, seed=3)
    assert len(set(drawn)) == 4 and drawn == sorted(drawn) and all(0 <= i < 10 for i in drawn)
    assert choose_queries(10, count=4, seed=3) == drawn
    assert choose_queries(3, count=8) == [0, 1, 2]
    with pytest.raises(ConfigError, match="--query-index 10"):
        choose_queries(10, indices=[1, 10])
    with pytest.raises(ConfigError, match="--queries"):
        choose_queries(10, count=0)


def test_grid_layout_hand_worked() -> None:
    layout = GridLayout(rows=2, cols=3, tile_h=10, tile_w=6, border=2, gap=3, query_gap=5, caption=4)
    # a cell is 10 + 2*2 + 4 = 18 high and 6 + 2*2 = 10 wide
    assert layout.size() == (3 + 2 * (18 + 3), 3 + 4 * (10 + 3) + 5)
    assert layout.origin(0, 0) == (3, 3)
    assert layout.origin(0, 1) == (3, 3 + 13 + 5)
    assert layout.origin(1, 2) == (3 + 21, 3 + 2 * 13 + 5)
    with pytest.raises(IndexError):
        layout.origin(2, 0)
    with pytest.raises(ConfigError):
        GridLayout(rows=0, cols=1)


def solid(tmp_path, name: str, colour: tuple[int, int, int]) -> str:
    path = tmp_path / name
    Image.new("RGB", (8, 16), colour).save(path)
    return str(path)


def test_render_grid_pixels(tmp_path) -> None:
    layout = GridLayout(rows=2, cols=2, tile_h=20, tile_w=10, border=3, gap=4, query_gap=6, caption=10)
    blue_img = solid(tmp_path, "a.png", (10, 20, 200))
    tiles = [
        [Tile(blue_img, (1, 2, 3)), Tile(blue_img, (0, 190, 0), ("#1 0.1",))],
        [Tile(None, (4, 5, 6)), Tile(blue_img, (220, 0, 0)), Tile(blue_img, (9, 9, 9))],
    ]
    pixels = render_grid(tiles, layout)
    assert pixels.shape == (*layout.size(), 3) and pixels.dtype == np.uint8
    for (row, col), colour in {(0, 0): (1, 2, 3), (0, 1): (0, 190, 0), (1, 1): (220, 0, 0), (1, 2): (9, 9, 9)}.items():
        y, x = layout.origin(row, col)
        assert tuple(pixels[y, x]) == colour  # outer corner of the frame
        assert tuple(pixels[y + 2, x + layout.tile_w + 5]) == colour  # inner edge, right side
        assert tuple(pixels[y + 3 + 10, x + 3 + 5]) == (10, 20, 200)  # the image inside
    y, x = layout.origin(1, 0)
    assert tuple(pixels[y, x]) == (4, 5, 6)
    assert tuple(pixels[y + 13, x + 8]) != (10, 20, 200)  # no image: a plain tile
    assert tuple(pixels[0, 0]) == (255, 255, 255)


def test_ranked_lists_and_their_grid(tmp_path) -> None:
    # 2-D features; distances from the query direction (1, 0) are known by hand.
    gallery = [Sample(solid(tmp_path, f"g{i}.png", (i * 40, 80, 80)), pid, cam)
               for i, (pid, cam) in enumerate([(1, 1), (2, 0), (1, 0), (3, 1), (1, 2)])]
    query = [Sample(solid(tmp_path, "q0.png", (0, 0, 0)), 9, 0), Sample(solid(tmp_path, "q1.png", (0, 0, 0)), 1, 0)]
    angles = np.radians([50.0, 10.0, 0.0, 80.0, 30.0])  # cosine order: g2, g1, g4, g0, g3
    gf = np.stack([np.cos(angles), np.sin(angles)], 1).astype(np.float32)
    qf = np.array([[1.0, 0.0]], np.float32)
    lists = ranked_lists(qf, gf, query, gallery, chosen=[1], k=4)
    assert lists[0].query_index == 1
    assert lists[0].gallery_indices == [2, 1, 4, 0]
    np.testing.assert_allclose(lists[0].distances, 1 - np.cos(np.radians([0.0, 10.0, 30.0, 50.0])), atol=1e-6)
    assert lists[0].statuses == [SAME_CAMERA, FALSE, MATCH, MATCH]

    layout = GridLayout(rows=1, cols=4, tile_h=16, tile_w=8, border=2)
    files = write_ranked_lists(lists, query, gallery, tmp_path / "out", layout)
    with Image.open(files["png"]) as img:
        assert img.size == (layout.size()[1], layout.size()[0])
        pixels = np.asarray(img.convert("RGB"))
    want = [QUERY, SAME_CAMERA, FALSE, MATCH, MATCH]
    for col, status in enumerate(want):
        y, x = layout.origin(0, col)
        assert tuple(pixels[y + 1, x + 1]) == FRAME_COLOURS[status], col
    with files["csv"].open() as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["gallery_index"]) for r in rows] == [2, 1, 4, 0]
    assert [r["status"] for r in rows] == want[1:]
    assert [int(r["rank"]) for r in rows] == [1, 2, 3, 4]
    assert rows[0]["query_path"] == query[1].path and int(rows[2]["gallery_pid"]) == 1
