"""Drawing only: matplotlib figures on the Agg canvas, and ranked-list grids composed pixel by pixel.

Figures are built as ``matplotlib.figure.Figure`` objects on an Agg canvas (no
pyplot, no global backend switch) and saved without tight cropping, so a PNG is
exactly ``width_px`` x ``height_px``. Grids are drawn with PIL at the pixel positions
of :class:`GridLayout`, so every frame lands on known pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

from marreid.data.loaders import IMAGE_ERRORS
from marreid.errors import ConfigError

DPI = 100
# the curves figure: panels per row and each panel's size in pixels
CURVE_COLUMNS, PANEL_W, PANEL_H = 3, 400, 280
# line height of PIL's default font; a GridLayout caption of 26 px holds two lines
CAPTION_LINE = 12
BACKGROUND = (255, 255, 255)
MISSING_TILE = (205, 205, 205)
TEXT = (0, 0, 0)


@dataclass(frozen=True)
class Tile:
    """One grid cell: the image at ``path`` (None or unreadable: a plain grey tile), the frame's
    RGB ``colour`` and up to two caption lines."""

    path: str | None
    colour: tuple[int, int, int]
    caption: tuple[str, ...] = ()


@dataclass(frozen=True)
class GridLayout:
    """Pixel geometry of a ranked-list grid: one row per query, the query in column 0, then
    ``cols`` ranked gallery images. Each tile is an image of ``tile_h`` x ``tile_w`` inside a
    frame ``border`` pixels wide, with a caption strip below; ``gap`` separates tiles and
    ``query_gap`` more sets the query column apart."""

    rows: int
    cols: int
    tile_h: int = 128
    tile_w: int = 64
    border: int = 4
    gap: int = 6
    query_gap: int = 12
    caption: int = 26

    def __post_init__(self) -> None:
        for name in ("rows", "cols", "tile_h", "tile_w"):
            if getattr(self, name) < 1:
                raise ConfigError(f"grid {name} must be at least 1, got {getattr(self, name)}")

    @property
    def cell_h(self) -> int:
        """Framed tile plus caption."""
        return self.tile_h + 2 * self.border + self.caption

    @property
    def cell_w(self) -> int:
        """Framed tile width (a caption is as wide)."""
        return self.tile_w + 2 * self.border

    def size(self) -> tuple[int, int]:
        """(height, width) of the whole grid in pixels."""
        height = self.gap + self.rows * (self.cell_h + self.gap)
        width = self.gap + (self.cols + 1) * (self.cell_w + self.gap) + self.query_gap
        return height, width

    def origin(self, row: int, col: int) -> tuple[int, int]:
        """(y, x) of the outer top-left pixel of the frame in ``row``, ``col`` (0 = the query)."""
        if not (0 <= row < self.rows and 0 <= col <= self.cols):
            raise IndexError(f"cell ({row}, {col}) outside a {self.rows} x {self.cols + 1} grid")
        y = self.gap + row * (self.cell_h + self.gap)
        x = self.gap + col * (self.cell_w + self.gap) + (self.query_gap if col > 0 else 0)
        return y, x


def new_figure(width_px: int, height_px: int) -> Figure:
    """A figure of exactly ``width_px`` x ``height_px`` pixels on an Agg canvas."""
    fig = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as a PNG of its exact pixel size (no tight cropping), creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def _tile_pixels(path: str | None, height: int, width: int) -> np.ndarray | None:
    """The image at ``path`` resized to ``height`` x ``width``; None when there is none or it is unreadable."""
    if path is None:
        return None
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB").resize((width, height), Image.Resampling.BILINEAR))
    except IMAGE_ERRORS:
        return None


def render_grid(tiles: list[list[Tile]], layout: GridLayout) -> np.ndarray:
    """The grid as a uint8 [H, W, 3] array: each row's tiles from column 0, framed in their
    colour, captions below; rows may be shorter than ``layout.cols + 1``."""
    height, width = layout.size()
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    b = layout.border
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            y, x = layout.origin(r, c)
            draw.rectangle([x, y, x + layout.cell_w - 1, y + layout.tile_h + 2 * b - 1], fill=tile.colour)
            pixels = _tile_pixels(tile.path, layout.tile_h, layout.tile_w)
            if pixels is None:
                draw.rectangle([x + b, y + b, x + b + layout.tile_w - 1, y + b + layout.tile_h - 1], fill=MISSING_TILE)
            else:
                canvas.paste(Image.fromarray(pixels), (x + b, y + b))
            for line_no, line in enumerate(tile.caption[:2]):
                draw.text((x, y + layout.tile_h + 2 * b + 1 + CAPTION_LINE * line_no), line, fill=TEXT, font=font)
    return np.asarray(canvas)


def save_png(pixels: np.ndarray, path: str | Path) -> Path:
    """Write a uint8 [H, W, 3] array as a PNG, creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def plot_histograms(panels: list[tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]],
                    path: str | Path, xlabel: str, width_px: int = 1200, height_px: int = 450) -> Path:
    """Side by side, per panel (title, density, bin edges, xs, fitted density at xs, fit label):
    the histogram with the fitted curve over it."""
    fig = new_figure(width_px, height_px)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, density, edges, xs, fitted, label) in zip(axes, panels):
        ax.stairs(density, edges, fill=True, alpha=0.55, label="histogram")
        ax.plot(xs, fitted, color="crimson", label=label)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("density")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_sweep(param: str, values: list[float], rank1: list[float], mAP: list[float], path: str | Path,
               log_x: bool, width_px: int = 700, height_px: int = 450) -> Path:
    """Fig. S2: rank-1 and mAP (in %) against the swept value."""
    fig = new_figure(width_px, height_px)
    ax = fig.subplots()
    ax.plot(values, [100 * v for v in rank1], marker="o", label="rank-1")
    ax.plot(values, [100 * v for v in mAP], marker="s", label="mAP")
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(param)
    ax.set_ylabel("%")
    ax.set_title(f"rank-1 and mAP against {param}")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)


def curves_size(num_panels: int) -> tuple[int, int]:
    """(height, width) in pixels of :func:`plot_curves`' figure for ``num_panels`` panels."""
    return max(1, -(-num_panels // CURVE_COLUMNS)) * PANEL_H, CURVE_COLUMNS * PANEL_W


def plot_curves(panels: list[tuple[str, list[tuple[str, list[float], list[float]]]]], path: str | Path) -> Path:
    """One panel per (title, [(label, steps, values), ...]), ``CURVE_COLUMNS`` to a row."""
    height, width = curves_size(len(panels))
    fig = new_figure(width, height)
    axes = fig.subplots(height // PANEL_H, CURVE_COLUMNS, squeeze=False).ravel()
    for ax, (title, lines) in zip(axes, panels):
        for label, steps, values in lines:
            # a series of a few points (evaluations, short runs) is invisible as a bare line
            ax.plot(steps, values, label=label, linewidth=1.0, marker="o" if len(values) <= 30 else None,
                    markersize=3)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        if len(lines) > 1:
            ax.legend(fontsize=7)
    for ax in axes[len(panels):]:
        ax.set_axis_off()
    fig.tight_layout()
    return save_figure(fig, path)


__all__ = ["Tile", "GridLayout", "new_figure", "save_figure", "render_grid", "save_png", "plot_histograms", "plot_sweep",
           "plot_curves", "curves_size"]
