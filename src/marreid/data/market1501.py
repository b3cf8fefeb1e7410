"""Market-1501 and every dataset stored in its layout (DukeMTMC-reID, CUHK03-NP).

Layout: ``bounding_box_train/``, ``query/``, ``bounding_box_test/`` (gallery),
file names starting ``PID_cCAM`` with a 1-based camera, e.g.
``0002_c1s1_000451_03.jpg``. Identity -1 is junk (dropped from the gallery and
counted), identity 0 is a distractor (kept).
"""

from __future__ import annotations

import re
from pathlib import Path

from marreid.data.sample import (
    ReidDataset,
    Sample,
    drop_junk,
    list_images,
    locate_root,
    reject_junk,
    require_dir,
    require_samples,
)
from marreid.errors import DatasetError

MARKET_FOLDERS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
PID_CAM = re.compile(r"^(-1|\d+)_c(\d+)")


def holds_market_layout(folder: Path) -> bool:
    """True if ``folder`` has the three Market-style split folders."""
    return all((folder / sub).is_dir() for sub in MARKET_FOLDERS.values())


def missing_market_folder(folder: Path) -> Path | None:
    """The first split folder missing from a Market-style layout that ``folder`` begins (it has
    ``bounding_box_train/`` or ``bounding_box_test/``) but does not complete; None otherwise.

    Without this, a tree short of ``query/`` would be read as a folder dataset whose
    identities are the split folders' names.
    """
    if not any((folder / MARKET_FOLDERS[split]).is_dir() for split in ("train", "gallery")):
        return None
    return next((folder / sub for sub in MARKET_FOLDERS.values() if not (folder / sub).is_dir()), None)


def parse_pid_cam(path: Path) -> tuple[int, int]:
    """(pid, 0-based camid) from a ``PID_cCAM...`` file name."""
    match = PID_CAM.match(path.name)
    if match is None or int(match.group(2)) < 1:
        raise DatasetError(f"cannot parse identity and camera (PID_cCAM...) from {path}")
    return int(match.group(1)), int(match.group(2)) - 1


def read_split(folder: Path, split: str) -> list[Sample]:
    """Samples of one Market-style split folder; junk is allowed only in the gallery."""
    samples = [Sample(str(p), *parse_pid_cam(p)) for p in list_images(folder)]
    if split != "gallery":
        reject_junk(samples, split)
    return require_samples(samples, split, folder)


def read_market_style(root: str | Path, name: str) -> ReidDataset:
    """Read a Market-style tree at ``root`` (or one level below it)."""
    base = locate_root(Path(root).absolute(), holds_market_layout, name)
    hint = f"{name} needs {', '.join(MARKET_FOLDERS.values())}"
    splits = {
        split: read_split(require_dir(base / sub, hint), split)
        for split, sub in MARKET_FOLDERS.items()
    }
    gallery, junk = drop_junk(splits["gallery"])
    require_samples(gallery, "gallery", base / MARKET_FOLDERS["gallery"])
    return ReidDataset(name, str(base), splits["train"], splits["query"], gallery, junk)


def read_market1501(root: str | Path) -> ReidDataset:
    """Market-1501 (751 train ids / 12,936 images, 3,368 queries, 6 cameras)."""
    return read_market_style(root, "market1501")
