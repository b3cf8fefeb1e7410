"""One entry point for every dataset layout: ``load_dataset`` and ``detect_format``."""

from __future__ import annotations

from pathlib import Path

from marreid.data.cuhk03 import CUHK03_VARIANTS, holds_cuhk03_layout, read_cuhk03
from marreid.data.dukemtmc import DUKE_NAME, read_dukemtmc
from marreid.data.folder import read_folder
from marreid.data.market1501 import MARKET_FOLDERS, holds_market_layout, missing_market_folder, read_market1501
from marreid.data.msmt17 import missing_msmt_part, msmt_folders, read_msmt17
from marreid.data.sample import ReidDataset, is_image, list_images
from marreid.errors import ConfigError, DatasetError

DATASET_FORMATS = ("market1501", "dukemtmc", "msmt17", "cuhk03", "folder")


def layout_format(folder: Path) -> str | None:
    """The standard layout ``folder`` holds, if any (Duke told from Market by its file names)."""
    if msmt_folders(folder) is not None:
        return "msmt17"
    if holds_cuhk03_layout(folder):
        return "cuhk03"
    if holds_market_layout(folder):
        names = list_images(folder / MARKET_FOLDERS["train"])
        return "dukemtmc" if names and DUKE_NAME.match(names[0].name) else "market1501"
    return None


def incomplete_layout(folder: Path) -> str | None:
    """What a standard layout begun in ``folder`` (or its CUHK03 copies) lacks, as the error
    to report; None when ``folder`` begins none."""
    for base in (folder, *(folder / variant for variant in CUHK03_VARIANTS)):
        missing = missing_market_folder(base)
        if missing is not None:
            return (f"missing folder {missing}: {base} looks like a Market-1501-style dataset, which needs "
                    f"{', '.join(MARKET_FOLDERS.values())}")
    missing = missing_msmt_part(folder)
    if missing is not None:
        return (f"missing {missing}: {folder} looks like MSMT17, which needs list_train.txt, list_val.txt, "
                f"list_query.txt, list_gallery.txt and train/ + test/ (or mask_train_v2/ + mask_test_v2/)")
    return None


def detect_format(root: str | Path) -> str:
    """The format of the dataset at ``root`` (or one level below it), by layout and file names."""
    path = Path(root).absolute()
    if not path.exists():
        raise DatasetError(f"dataset root not found: {path}")
    if path.is_file():
        if path.suffix.lower() == ".csv":
            return "folder"
        raise DatasetError(f"not a dataset folder or .csv manifest: {path}")
    found = layout_format(path)
    if found is not None:
        return found
    nested = {child.name: layout_format(child) for child in sorted(path.iterdir()) if child.is_dir()}
    nested = {name: fmt for name, fmt in nested.items() if fmt is not None}
    if len(nested) == 1:
        return next(iter(nested.values()))
    if len(nested) > 1:
        raise DatasetError(f"several datasets under {path} ({', '.join(nested)}); pass one of them")
    for folder in (path, *(child for child in sorted(path.iterdir()) if child.is_dir())):
        problem = incomplete_layout(folder)
        if problem is not None:
            raise DatasetError(problem)
    if any(child.is_dir() or is_image(child.name) or child.name == "train.csv" for child in path.iterdir()):
        return "folder"
    raise DatasetError(f"no images or known dataset layout in {path}")


def load_dataset(
    format: str | None,
    root: str | Path,
    *,
    pattern: str | None = None,
    cuhk03_variant: str = "detected",
) -> ReidDataset:
    """Read the dataset at ``root``; ``format`` None means detect it (``pattern`` implies folder)."""
    if format is None:
        format = "folder" if pattern is not None else detect_format(root)
    if format not in DATASET_FORMATS:
        raise DatasetError(f"unknown dataset format {format!r}; known: {', '.join(DATASET_FORMATS)}")
    if pattern is not None and format != "folder":
        raise ConfigError(f"--pattern applies to the folder format only, not {format}")
    if format == "folder":
        return read_folder(root, pattern)
    if format == "cuhk03":
        return read_cuhk03(root, cuhk03_variant)
    readers = {"market1501": read_market1501, "dukemtmc": read_dukemtmc, "msmt17": read_msmt17}
    return readers[format](root)
