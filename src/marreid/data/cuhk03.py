"""CUHK03-NP: ``detected/`` and ``labeled/`` copies, each in the Market-1501 layout."""

from __future__ import annotations

from pathlib import Path

from marreid.data.market1501 import holds_market_layout, read_market_style
from marreid.data.sample import ReidDataset, locate_root
from marreid.errors import ConfigError

CUHK03_VARIANTS = ("detected", "labeled")


def holds_cuhk03_layout(folder: Path) -> bool:
    """True if ``folder`` has a Market-style ``detected/`` or ``labeled/`` subfolder."""
    return any(holds_market_layout(folder / v) for v in CUHK03_VARIANTS)


def read_cuhk03(root: str | Path, variant: str = "detected") -> ReidDataset:
    """CUHK03-NP's ``variant`` copy; ``root`` may also point at that copy itself."""
    if variant not in CUHK03_VARIANTS:
        raise ConfigError(f"cuhk03_variant must be one of {', '.join(CUHK03_VARIANTS)}, not {variant!r}")
    path = Path(root).absolute()
    if path.is_dir() and holds_market_layout(path):
        return read_market_style(path, "cuhk03")
    base = locate_root(path, holds_cuhk03_layout, "cuhk03")
    return read_market_style(base / variant, "cuhk03")
