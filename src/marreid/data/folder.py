"""A user's own data: identity folders, a flat folder read by a regex, or a CSV manifest.

Forms of one split:
- a folder of identity folders ``<dir>/<pid>/<anything>.jpg`` (camera 0);
- a flat folder read with ``pattern``, a regex searched in each file name whose
  named group ``pid`` (and optionally ``cam``) gives the labels (no ``cam``: camera 0);
- a CSV manifest with columns ``path,pid,camid`` (``camid`` 0-based, relative
  paths resolved against the CSV's folder).

``root`` holding ``train``, ``query`` and ``gallery`` (each a folder or a
``<split>.csv``) gives three splits; any other root is one train split.
Identity names that are all integers are the pids; otherwise pids are the
indices of the sorted names. Camera names are renumbered 0..C-1 in sorted
order. Both mappings are shared by the three splits, so query and gallery agree.
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

from marreid.data.sample import (
    SPLITS,
    ReidDataset,
    Sample,
    drop_junk,
    is_image,
    list_images,
    reject_junk,
    require_dir,
    require_samples,
)
from marreid.errors import ConfigError, DatasetError, read_utf8

MANIFEST_COLUMNS = ("path", "pid", "camid")

# (image path, identity name, camera name or None) before names become numbers
Entry = tuple[Path, str, str | None]


def compile_pattern(pattern: str) -> re.Pattern[str]:
    """The file-name regex, checked to have a ``pid`` group."""
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"invalid --pattern {pattern!r}: {exc}") from None
    if "pid" not in regex.groupindex:
        raise ConfigError(f"--pattern {pattern!r} needs a named group (?P<pid>...)")
    return regex


def read_flat(folder: Path, regex: re.Pattern[str]) -> list[Entry]:
    """Entries of a flat folder whose file names ``regex`` labels."""
    entries = []
    for path in list_images(folder):
        match = regex.search(path.name)
        if match is None or match.group("pid") is None:
            raise DatasetError(f"file name {path} does not match --pattern {regex.pattern!r}")
        cam = match.group("cam") if "cam" in regex.groupindex else None
        if "cam" in regex.groupindex and cam is None:
            raise DatasetError(f"--pattern {regex.pattern!r} found no camera in {path}")
        entries.append((path, match.group("pid"), cam))
    return entries


def read_identity_folders(folder: Path) -> list[Entry]:
    """Entries of a folder of identity folders; loose images there are an error."""
    require_dir(folder)
    if any(p.is_file() and is_image(p.name) for p in folder.iterdir()):
        raise DatasetError(f"images directly in {folder}: give --pattern for a flat folder, or one folder per identity")
    people = sorted(p for p in folder.iterdir() if p.is_dir())
    return [(path, person.name, None) for person in people for path in list_images(person)]


def read_manifest(csv_path: Path) -> list[Sample]:
    """Samples of a ``path,pid,camid`` CSV manifest (UTF-8, with or without Excel's byte-order mark)."""
    with io.StringIO(read_utf8(csv_path, DatasetError), newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in MANIFEST_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DatasetError(f"{csv_path} lacks column(s) {', '.join(missing)} (needs {','.join(MANIFEST_COLUMNS)})")
        samples = []
        for row in reader:
            where = f"{csv_path}:{reader.line_num}"
            try:
                pid, camid = int(row["pid"]), int(row["camid"])
            except (TypeError, ValueError):
                raise DatasetError(f"pid and camid must be integers at {where}") from None
            if camid < 0:
                raise DatasetError(f"camid must be 0-based (>= 0) at {where}")
            path = Path(row["path"])
            path = path if path.is_absolute() else csv_path.parent / path
            if not path.is_file():
                raise DatasetError(f"image listed at {where} not found: {path}")
            samples.append(Sample(str(path), pid, camid))
    return samples


def number_names(names: set[str], keep_integers: bool) -> dict[str, int]:
    """Names to numbers: integers kept as they are (if allowed and all are), else sorted indices."""
    if all(re.fullmatch(r"-?\d+", n) for n in names):
        if keep_integers:
            return {n: int(n) for n in names}
        return {n: i for i, n in enumerate(sorted(names, key=int))}
    return {n: i for i, n in enumerate(sorted(names))}


def split_sources(root: Path) -> dict[str, Path] | None:
    """The folder or CSV of each split if ``root`` is split into train/query/gallery."""
    def source(split: str) -> Path | None:
        for candidate in (root / split, root / f"{split}.csv"):
            if candidate.exists():
                return candidate
        return None

    if root.is_file() or source("train") is None:
        return None
    found = {split: source(split) for split in SPLITS}
    if (found["query"] is None) != (found["gallery"] is None):
        raise DatasetError(f"{root} has only one of query and gallery; give both or neither")
    return {split: path for split, path in found.items() if path is not None}


def read_folder(root: str | Path, pattern: str | None = None) -> ReidDataset:
    """A user's dataset in one of the folder forms (see the module docstring)."""
    base = Path(root).absolute()
    if not base.exists():
        raise DatasetError(f"dataset root not found: {base}")
    regex = compile_pattern(pattern) if pattern is not None else None
    sources = split_sources(base) or {"train": base}
    manifests: dict[str, list[Sample]] = {}
    entries: dict[str, list[Entry]] = {}
    for split, source in sources.items():
        if source.is_file():
            if source.suffix.lower() != ".csv":
                raise DatasetError(f"expected a folder or a .csv manifest: {source}")
            manifests[split] = read_manifest(source)
        elif regex is not None:
            entries[split] = read_flat(source, regex)
        else:
            entries[split] = read_identity_folders(source)
    all_entries = [e for split_entries in entries.values() for e in split_entries]
    pids = number_names({e[1] for e in all_entries}, keep_integers=True)
    cams = number_names({e[2] for e in all_entries if e[2] is not None}, keep_integers=False)
    splits = {split: [] for split in SPLITS}
    for split in sources:
        if split in manifests:
            samples = manifests[split]
        else:
            samples = [
                Sample(str(path), pids[pid], 0 if cam is None else cams[cam])
                for path, pid, cam in entries[split]
            ]
        require_samples(samples, split, sources[split])
        splits[split] = samples if split == "gallery" else reject_junk(samples, split)
    gallery, junk = drop_junk(splits["gallery"])
    if "gallery" in sources:
        require_samples(gallery, "gallery", sources["gallery"])
    return ReidDataset("folder", str(base), splits["train"], splits["query"], gallery, junk)
