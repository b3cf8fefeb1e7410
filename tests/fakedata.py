"""Tiny real-style dataset trees on disk, for tests across the project.

Each writer returns a ``FakeTree`` that records every image it wrote as
``(pid, camid)`` per split, so tests compare a reader's output with what is
really on disk. With ``identity_colours`` every identity has its own two
colours (upper / lower body) plus per-image noise and a per-camera brightness
shift, so a tiny model can learn to tell people apart across cameras.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from marreid.data.sample import SPLITS


@dataclass
class FakeTree:
    """What a writer put on disk: ``root`` to load, and ``(pid, camid)`` per image per split."""

    root: Path
    written: dict[str, list[tuple[int, int]]] = field(default_factory=lambda: {s: [] for s in SPLITS})

    def kept(self, split: str) -> list[tuple[int, int]]:
        """Images of ``split`` a reader keeps (junk, pid -1, is left out of the gallery)."""
        return [(pid, cam) for pid, cam in self.written[split] if pid != -1]

    @property
    def junk(self) -> int:
        return sum(pid == -1 for pid, _ in self.written["gallery"])

    @property
    def distractors(self) -> int:
        """Gallery images of identity 0, unless 0 is a real person with queries (MSMT17)."""
        if any(pid == 0 for pid, _ in self.written["query"]):
            return 0
        return sum(pid == 0 for pid, _ in self.written["gallery"])

    def counts(self, split: str) -> dict[str, int]:
        """Images, identities and cameras a reader should report for ``split``."""
        kept = self.kept(split)
        return {"images": len(kept), "ids": len({p for p, _ in kept}), "cams": len({c for _, c in kept})}

    def summary(self) -> dict[str, dict[str, int]]:
        """The counts ``marreid data summary --json`` should print for this tree."""
        out = {split: self.counts(split) for split in SPLITS}
        out["gallery"].update(junk=self.junk, distractors=self.distractors)
        return out


class _Painter:
    """Writes tiny JPEG/PNG crops, coloured per identity or plain noise."""

    def __init__(self, size: tuple[int, int], identity_colours: bool, cams: int, seed: int):
        self.height, self.width = size
        self.identity_colours = identity_colours
        self.cams = max(cams, 1)
        self.rng = np.random.default_rng(seed)

    def image(self, pid: int, cam: int) -> np.ndarray:
        noise = self.rng.normal(0.0, 8.0, (self.height, self.width, 3))
        if not self.identity_colours:
            return np.clip(self.rng.uniform(0, 255, (1, 1, 3)) + noise, 0, 255).astype(np.uint8)
        colours = np.random.default_rng(abs(pid) + 1000).uniform(30, 225, (2, 3))
        pixels = np.empty((self.height, self.width, 3))
        pixels[: self.height // 2] = colours[0]
        pixels[self.height // 2 :] = colours[1]
        tint = 40.0 * (cam / self.cams - 0.5)
        return np.clip(pixels + noise + tint, 0, 255).astype(np.uint8)

    def write(self, path: Path, pid: int, cam: int) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(self.image(pid, cam)).save(path)
        return path


def _market_name(style: str, pid: int, cam: int, frame: int, ext: str) -> str:
    if style == "market":
        return f"{pid:04d}_c{cam + 1}s1_{frame:06d}_00.{ext}" if pid >= 0 else f"-1_c{cam + 1}s1_{frame:06d}_00.{ext}"
    if style == "duke":
        return f"{pid:04d}_c{cam + 1}_f{frame:07d}.{ext}" if pid >= 0 else f"-1_c{cam + 1}_f{frame:07d}.{ext}"
    raise ValueError(f"style must be 'market' or 'duke', not {style!r}")


def make_market_tree(
    root: str | Path,
    ids: int = 4,
    cams: int = 2,
    per_id: int = 2,
    size: tuple[int, int] = (16, 8),
    junk: int = 2,
    distractors: int = 2,
    style: str = "market",
    identity_colours: bool = True,
    ext: str = "jpg",
    seed: int = 0,
) -> FakeTree:
    """A Market-1501 (or DukeMTMC, ``style="duke"``) tree under ``root``.

    Train identities are 1..ids with ``per_id`` images each; test identities
    ids+1..2*ids have one query (camera ``pid % cams``) and ``per_id`` gallery
    images starting on the next camera, so with ``cams >= 2`` every query has a
    cross-camera match. The gallery also gets ``junk`` images of identity -1
    and ``distractors`` of identity 0. ``size`` is (height, width).
    """
    root = Path(root)
    tree = FakeTree(root)
    painter = _Painter(size, identity_colours, cams, seed)
    folders = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
    for folder in folders.values():
        (root / folder).mkdir(parents=True, exist_ok=True)
    frame = 0

    def put(split: str, pid: int, cam: int) -> None:
        nonlocal frame
        frame += 1
        painter.write(root / folders[split] / _market_name(style, pid, cam, frame, ext), pid, cam)
        tree.written[split].append((pid, cam))

    for pid in range(1, ids + 1):
        for k in range(per_id):
            put("train", pid, (pid + k) % cams)
    for pid in range(ids + 1, 2 * ids + 1):
        put("query", pid, pid % cams)
        for k in range(per_id):
            put("gallery", pid, (pid + 1 + k) % cams)
    for k in range(distractors):
        put("gallery", 0, k % cams)
    for k in range(junk):
        put("gallery", -1, k % cams)
    return tree


def make_training_trees(root: str | Path) -> Path:
    """The small labeled auxiliary set (``root/aux``: 6 ids, 2 cameras, 4 images each, no junk) and target
    set (``root/tgt``: 6 ids, 3 cameras) that the engine tests train on, as Market-style trees; returns root."""
    root = Path(root)
    make_market_tree(root / "aux", ids=6, cams=2, per_id=4, size=(32, 16), junk=0, distractors=0)
    make_market_tree(root / "tgt", ids=6, cams=3, per_id=4, size=(32, 16), seed=1)
    return root


def write_tiny_config(path: str | Path, aux: str | Path, target: str | Path, **sections: dict) -> Path:
    """Write the run configuration the end-to-end tests train with to ``path`` and return it.

    Market-style ``aux`` and ``target`` trees at 32x16, the ``tiny`` backbone on the CPU,
    one pretraining and one MAR epoch in batches of 8, no progress bars; ``sections``
    update those sections key by key, e.g. ``optim={"epochs": 2}``.
    """
    settings: dict[str, dict] = {
        "data": {"aux_format": "market1501", "aux_root": str(aux), "target_format": "market1501",
                 "target_root": str(target), "height": 32, "width": 16, "pad": 2, "num_workers": 0},
        "model": {"arch": "tiny"},
        "pretrain": {"epochs": 1, "batch_size": 8, "lr": 0.05},
        "optim": {"epochs": 1, "lr": 0.01},
        "mar": {"mining_ratio": 0.1},
        "train": {"aux_batch": 8, "target_batch": 8, "device": "cpu", "progress": False},
    }
    for section, values in sections.items():
        settings.setdefault(section, {}).update(values)
    path = Path(path)
    path.write_text(yaml.safe_dump(settings))
    return path


def make_msmt_tree(
    root: str | Path,
    ids: int = 3,
    cams: int = 3,
    per_id: int = 3,
    size: tuple[int, int] = (16, 8),
    version: int = 1,
    seed: int = 0,
) -> FakeTree:
    """An MSMT17 V1 (``train/``, ``test/``) or V2 (``mask_*_v2/``) tree with its four lists.

    Train identities 0..ids-1 have ``per_id`` images; the last image of each is
    listed in ``list_val.txt``, the others in ``list_train.txt``. Test
    identities (numbered from 0 again, as in MSMT17) have one query and
    ``per_id`` gallery images.
    """
    root = Path(root)
    tree = FakeTree(root)
    painter = _Painter(size, True, cams, seed)
    train_dir, test_dir = ("train", "test") if version == 1 else ("mask_train_v2", "mask_test_v2")
    lists: dict[str, list[str]] = {"train": [], "val": [], "query": [], "gallery": []}
    frame = 0

    def put(split: str, listed_in: str, folder: str, pid: int, cam: int) -> None:
        nonlocal frame
        frame += 1
        rel = f"{pid:04d}/{pid:04d}_{frame:03d}_{cam + 1:02d}_0303morning_{frame:04d}_0.jpg"
        painter.write(root / folder / rel, pid + (0 if split == "train" else 500), cam)
        lists[listed_in].append(f"{rel} {pid}")
        tree.written[split].append((pid, cam))

    for pid in range(ids):
        for k in range(per_id):
            put("train", "val" if k == per_id - 1 else "train", train_dir, pid, (pid + k) % cams)
    for pid in range(ids):
        put("query", "query", test_dir, pid, pid % cams)
        for k in range(per_id):
            put("gallery", "gallery", test_dir, pid, (pid + 1 + k) % cams)
    for name, lines in lists.items():
        (root / f"list_{name}.txt").write_text("".join(line + "\n" for line in lines))
    return tree


def make_folder_tree(
    root: str | Path,
    ids: int = 3,
    per_id: int = 2,
    cams: int = 2,
    size: tuple[int, int] = (16, 8),
    form: str = "identity",
    names: str = "int",
    splits: bool = False,
    seed: int = 0,
) -> FakeTree:
    """A user's folder dataset in one ``form``.

    - ``identity``: ``<dir>/<name>/<k>.jpg``, camera 0; ``names="int"`` uses
      folder names ``0007`` (pid 7), ``names="str"`` uses ``person_<letters>``
      (pid = index among the sorted names of all splits);
    - ``flat``: ``<dir>/<pid>_c<cam+1>_<k>.jpg``, read with
      ``(?P<pid>\\d+)_c(?P<cam>\\d+)``;
    - ``csv``: images in ``<dir>/images/`` and a manifest ``path,pid,camid``
      (``<dir>/manifest.csv``, or ``<root>/<split>.csv`` with ``splits``).

    With ``splits`` the tree has ``train``, ``query`` and ``gallery``; test
    identities differ from training ones. ``FakeTree.root`` is what to load.
    """
    root = Path(root)
    painter = _Painter(size, True, cams, seed)
    split_ids = {"train": range(1, ids + 1)}
    if splits:
        split_ids.update(query=range(ids + 1, 2 * ids + 1), gallery=range(ids + 1, 2 * ids + 1))
    all_pids = sorted({p for r in split_ids.values() for p in r})
    label = {p: f"{p:04d}" if names == "int" else f"person_{_letters(p)}" for p in all_pids}
    index_of = {p: i for i, p in enumerate(sorted(all_pids, key=lambda p: label[p]))}
    tree = FakeTree(root / "manifest.csv" if form == "csv" and not splits else root)
    for split, pids in split_ids.items():
        base = root / split if splits else root
        rows = []
        for pid in pids:
            count = 1 if split == "query" else per_id
            for k in range(count):
                cam = (pid + k + (split == "gallery")) % cams if form != "identity" else 0
                if form == "identity":
                    painter.write(base / label[pid] / f"{k}.jpg", pid, cam)
                    tree.written[split].append((pid if names == "int" else index_of[pid], 0))
                elif form == "flat":
                    painter.write(base / f"{pid:04d}_c{cam + 1}_{k:02d}.jpg", pid, cam)
                    tree.written[split].append((pid, cam))
                elif form == "csv":
                    rel = f"images/{split}_{pid:04d}_{k:02d}.png"
                    painter.write(root / rel, pid, cam)
                    rows.append((rel, pid, cam))
                    tree.written[split].append((pid, cam))
                else:
                    raise ValueError(f"form must be identity, flat or csv, not {form!r}")
        if form == "csv":
            _write_manifest(root / (f"{split}.csv" if splits else "manifest.csv"), rows)
    return tree


def _letters(n: int) -> str:
    """A name for ``n`` whose sort order differs from numeric order (z, y, x, ...)."""
    return chr(ord("z") - n % 26) * (1 + n // 26)


def _write_manifest(path: Path, rows: list[tuple[str, int, int]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "pid", "camid"])
        writer.writerows(rows)
