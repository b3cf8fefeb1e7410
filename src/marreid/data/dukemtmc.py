"""DukeMTMC-reID: the Market-1501 layout with names like ``0001_c2_f0046182.jpg``."""

from __future__ import annotations

import re
from pathlib import Path

from marreid.data.market1501 import read_market_style
from marreid.data.sample import ReidDataset

DUKE_NAME = re.compile(r"^\d+_c\d+_f\d+")


def read_dukemtmc(root: str | Path) -> ReidDataset:
    """DukeMTMC-reID (702 train ids / 16,522 images, 2,228 queries, 8 cameras)."""
    return read_market_style(root, "dukemtmc")
