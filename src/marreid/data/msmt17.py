"""MSMT17 (V1 ``train/``+``test/``, V2 ``mask_train_v2/``+``mask_test_v2/``).

Splits come from ``list_{train,val,query,gallery}.txt`` beside the image
folders, one ``relative/path.jpg PID`` per line; the camera is the third
``_``-separated field of the file name (1-based), e.g.
``0000_000_01_0303morning_0015_0.jpg`` is camera 1. The train split is
``list_train`` + ``list_val`` (1,041 identities, 32,621 images).
"""

from __future__ import annotations

from pathlib import Path

from marreid.data.sample import ReidDataset, Sample, locate_root, require_dir, require_samples
from marreid.errors import DatasetError, read_utf8

MSMT_VERSIONS = {"v1": ("train", "test"), "v2": ("mask_train_v2", "mask_test_v2")}
SPLIT_LISTS = {"train": ("list_train.txt", "list_val.txt"), "query": ("list_query.txt",), "gallery": ("list_gallery.txt",)}


def msmt_folders(folder: Path) -> tuple[str, str] | None:
    """The (train, test) image folder names of the MSMT17 version in ``folder``, if any."""
    if not (folder / "list_train.txt").is_file():
        return None
    for train, test in MSMT_VERSIONS.values():
        if (folder / train).is_dir():
            return train, test
    return None


def missing_msmt_part(folder: Path) -> Path | None:
    """The first list file or train image folder missing from an MSMT17 layout that ``folder``
    begins (it has one of the ``list_*.txt`` files) but does not complete; None otherwise."""
    lists = [folder / name for names in SPLIT_LISTS.values() for name in names]
    if not any(path.is_file() for path in lists):
        return None
    missing = next((path for path in lists if not path.is_file()), None)
    if missing is None and msmt_folders(folder) is None:
        return folder / MSMT_VERSIONS["v1"][0]
    return missing


def parse_camera(name: str, where: str) -> int:
    """0-based camera from the third ``_`` field of an MSMT17 file name."""
    fields = name.split("_")
    if len(fields) < 3 or not fields[2].isdigit() or int(fields[2]) < 1:
        raise DatasetError(f"cannot parse the camera (third _ field) of {name} in {where}")
    return int(fields[2]) - 1


def read_list(list_file: Path, image_dir: Path) -> list[Sample]:
    """Samples of one ``list_*.txt`` file, paths resolved against ``image_dir``."""
    if not list_file.is_file():
        raise DatasetError(f"missing list file {list_file}")
    samples = []
    for number, line in enumerate(read_utf8(list_file, DatasetError).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{list_file}:{number}"
        fields = line.split()
        if len(fields) != 2 or not fields[1].isdigit():
            raise DatasetError(f"expected 'relative/path.jpg PID' at {where}")
        path = image_dir / fields[0]
        if not path.is_file():
            raise DatasetError(f"image listed at {where} not found: {path}")
        samples.append(Sample(str(path), int(fields[1]), parse_camera(path.name, where)))
    return samples


def read_msmt17(root: str | Path) -> ReidDataset:
    """MSMT17 V1 or V2 at ``root`` (or one level below it)."""
    base = locate_root(Path(root).absolute(), lambda f: msmt_folders(f) is not None, "msmt17")
    folders = msmt_folders(base)
    if folders is None:
        raise DatasetError(f"missing MSMT17 layout in {base} (list_train.txt with train/ or mask_train_v2/)")
    train_dir = require_dir(base / folders[0])
    test_dir = require_dir(base / folders[1])
    image_dirs = {"train": train_dir, "query": test_dir, "gallery": test_dir}
    splits = {
        split: require_samples(
            [s for name in lists for s in read_list(base / name, image_dirs[split])],
            split,
            base / lists[0],
        )
        for split, lists in SPLIT_LISTS.items()
    }
    return ReidDataset("msmt17", str(base), splits["train"], splits["query"], splits["gallery"])
