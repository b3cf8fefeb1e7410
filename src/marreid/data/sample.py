"""The record every dataset reader returns, the split container, and the
file-system helpers all readers share."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from marreid.errors import ConfigError, DatasetError

JUNK_PID = -1
DISTRACTOR_PID = 0
# the splits of every ReidDataset
SPLITS = ("train", "query", "gallery")


@dataclass(frozen=True)
class Sample:
    """One person crop: where it is on disk, who it is, which camera saw it.

    ``pid`` is the dataset's original identity (``0`` = distractor in Market-style
    galleries); ``camid`` is 0-based.
    """

    path: str
    pid: int
    camid: int


@dataclass
class ReidDataset:
    """The three splits of one re-ID dataset as read from disk.

    ``junk`` counts the gallery images dropped because their identity is -1
    (Market-1501 convention); they are never in ``gallery``.
    """

    name: str
    root: str
    train: list[Sample] = field(default_factory=list)
    query: list[Sample] = field(default_factory=list)
    gallery: list[Sample] = field(default_factory=list)
    junk: int = 0

    @property
    def num_train_pids(self) -> int:
        return len({s.pid for s in self.train})

    @property
    def num_cams(self) -> int:
        return len({s.camid for s in self.train + self.query + self.gallery})

    def relabelled_train(self) -> list[Sample]:
        """Training samples with identities mapped to 0..N-1 (sorted by original id)."""
        return relabel(self.train)


def relabel(samples: list[Sample]) -> list[Sample]:
    """Map identities to 0..N-1 in order of the sorted original ids."""
    mapping = {pid: i for i, pid in enumerate(sorted({s.pid for s in samples}))}
    return [Sample(s.path, mapping[s.pid], s.camid) for s in samples]


def zero_is_distractor(ds: ReidDataset) -> bool:
    """True if gallery identity 0 marks distractors: no query has identity 0 (Market-1501).

    In MSMT17 the test identities start at 0, and identity 0 is a real person.
    """
    return not any(s.pid == DISTRACTOR_PID for s in ds.query)


def pool_splits(ds: ReidDataset, splits: Sequence[str]) -> list[Sample]:
    """Samples of several splits (in the order given) as one labeled set, relabelled 0..N-1.

    Train and test (query + gallery) identities are different people even where
    their numbers coincide (MSMT17 numbers both from 0), so an identity is keyed
    by (train or test, pid); query and gallery share theirs. Labels follow the
    sorted keys. Test identity 0 is left out where it marks distractors
    (``zero_is_distractor``): they are many people under one id.
    """
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise ConfigError(f"unknown split(s) {unknown} to pool; choose from {', '.join(SPLITS)}")
    drop_zero = zero_is_distractor(ds)
    keyed: list[tuple[tuple[str, int], Sample]] = []
    for split in splits:
        group = "train" if split == "train" else "test"
        keyed += [((group, s.pid), s) for s in getattr(ds, split)
                  if not (group == "test" and drop_zero and s.pid == DISTRACTOR_PID)]
    labels = {key: i for i, key in enumerate(sorted({key for key, _ in keyed}))}
    return [Sample(s.path, labels[key], s.camid) for key, s in keyed]


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")


def is_image(name: str) -> bool:
    """True for the image file types every reader accepts (case-insensitive suffix)."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


def require_dir(folder: Path, hint: str = "") -> Path:
    """Return ``folder`` if it is a directory, else raise DatasetError naming it."""
    if not folder.is_dir():
        raise DatasetError(f"missing folder {folder}{f' ({hint})' if hint else ''}")
    return folder


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name; other files are ignored.

    An entry with an image's name whose type cannot be read (a symlink loop, say) is
    listed too, so the image checks name it as unreadable, or skip it, like any bad image.
    """
    require_dir(folder)
    # scandir's cached file type avoids one stat per image on 100k-file folders
    with os.scandir(folder) as entries:
        names = sorted(e.name for e in entries if is_image(e.name) and _maybe_file(e))
    return [folder / name for name in names]


def _maybe_file(entry: os.DirEntry) -> bool:
    """True for a file, or an entry whose type cannot be read (``is_file`` raises for a symlink loop)."""
    try:
        return entry.is_file()
    except OSError:
        return True


def require_samples(samples: list[Sample], split: str, where: Path | str) -> list[Sample]:
    """Return ``samples``, or raise DatasetError if the split holds no image."""
    if not samples:
        raise DatasetError(f"empty {split} split: no images in {where}")
    return samples


def drop_junk(gallery: list[Sample]) -> tuple[list[Sample], int]:
    """Gallery samples without the junk identity -1, and how many were dropped."""
    kept = [s for s in gallery if s.pid != JUNK_PID]
    return kept, len(gallery) - len(kept)


def reject_junk(samples: list[Sample], split: str) -> list[Sample]:
    """Return ``samples``; junk (-1) is a gallery-only notion, so elsewhere it is an error."""
    for s in samples:
        if s.pid == JUNK_PID:
            raise DatasetError(f"junk identity -1 in the {split} split: {s.path}")
    return samples


def locate_root(root: Path, holds_layout: Callable[[Path], bool], what: str) -> Path:
    """``root`` itself or its one subfolder that holds the layout.

    Archives usually unpack one level down (``root/Market-1501-v15.09.15/...``),
    so a single matching child folder is accepted; several are ambiguous. With
    no match ``root`` is returned, so the reader names the folder it misses.
    """
    if not root.exists():
        raise DatasetError(f"dataset root not found: {root}")
    if holds_layout(root):
        return root
    children = sorted(c for c in root.iterdir() if c.is_dir() and holds_layout(c))
    if len(children) == 1:
        return children[0]
    if len(children) > 1:
        names = ", ".join(c.name for c in children)
        raise DatasetError(f"several {what} copies under {root} ({names}); pass one of them")
    return root
