"""Checks run before training starts, so bad input fails in seconds, not hours into a run.

Each raises a ``MarreidError`` whose one-line message names the file or option:
unreadable images (or, when asked, leaves them out and counts them), a target
whose cameras L_CML cannot compare, a target that could not be evaluated at the
end, a run folder that cannot be written, is short of space or is in use by another
run, a fresh run that would overwrite a checkpoint, and a resume at another input size.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import os
import shutil
import sys
import tempfile
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import torch

from marreid.config import Config, DataConfig
from marreid.data import ReidDataset, Sample
from marreid.data.loaders import find_bad_images
from marreid.data.sample import SPLITS
from marreid.engine.distributed import current_ranks
from marreid.engine.extract import load_target
from marreid.errors import CheckpointError, ConfigError, DatasetError

MAX_SCAN_THREADS = 8
# pickle framing, the RNG states and the config on top of the tensors; generous on purpose
SIZE_MARGIN = 1.05
SIZE_SLACK = 16 * 2**20
# Inside every run folder; held locked by the process running there (see lock_run_dir)
LOCK_FILE = ".marreid.lock"
# The lock file this process holds, as (path, descriptor): at most one, a process runs in one folder at a time
_held_lock: list[tuple[Path, int]] = []


class ImageScreen:
    """Decodes every image once before training, as training would read it.

    An unreadable image (corrupt, truncated, empty, not an image) is a DatasetError
    naming it, unless ``skip``: then it is left out, announced on stderr, and
    remembered in ``skipped`` (``what -> paths``) for the run log. With neither
    ``verify`` nor ``skip`` the samples pass unchecked.
    """

    def __init__(self, verify: bool = True, skip: bool = False, workers: int | None = None) -> None:
        self.verify = verify
        self.skip = skip
        self.workers = workers or min(MAX_SCAN_THREADS, os.cpu_count() or 1)
        self.skipped: dict[str, list[str]] = {}

    @classmethod
    def from_config(cls, data: DataConfig) -> ImageScreen:
        """``data.verify_images`` and ``data.skip_bad_images``."""
        return cls(verify=data.verify_images, skip=data.skip_bad_images)

    def __call__(self, samples: list[Sample], what: str) -> list[Sample]:
        """``samples`` without the unreadable ones (``skip``), or unchanged; ``what`` names the split."""
        if not (self.verify or self.skip):
            return samples
        bad = find_bad_images(samples, self.workers)
        if not bad:
            return samples
        path, reason = bad[0]
        if not self.skip:
            more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
            raise DatasetError(f"unreadable image in {what}: {path} ({reason}){more}; replace or delete it, "
                               f"or pass --skip-bad-images (data.skip_bad_images=true) to train without it")
        gone = {p for p, _ in bad}
        kept = [s for s in samples if s.path not in gone]
        if not kept:
            raise DatasetError(f"every image of {what} is unreadable, e.g. {path} ({reason})")
        self.skipped[what] = [p for p, _ in bad]
        print(f"skipping {len(bad)} unreadable image(s) of {what}, e.g. {path} ({reason})", file=sys.stderr)
        return kept

    @property
    def record(self) -> dict[str, Any]:
        """What was skipped, for ``log.jsonl``: the total, the count per split and the paths."""
        return {"count": sum(len(v) for v in self.skipped.values()),
                "per_split": {k: len(v) for k, v in self.skipped.items()}, "paths": self.skipped}


def load_checked_target(cfg: Config, screen: ImageScreen) -> ReidDataset:
    """The configured target dataset with every split passed through ``screen``."""
    # load_target would drop bad images itself, uncounted; the screen does it instead
    unscreened = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, skip_bad_images=False))
    dataset = load_target(unscreened)
    for split in SPLITS:
        setattr(dataset, split, screen(getattr(dataset, split), f"{dataset.root} ({split})"))
    return dataset


def check_target_cameras(train: list[Sample], use_cml: bool, where: str) -> None:
    """DatasetError when L_CML is on and fewer than two cameras have two or more training images.

    L_CML (Eq. 5-6) compares each camera's multilabel statistics with the whole
    set's; with a single camera it is undefined.
    """
    counts = Counter(s.camid for s in train)
    usable = sorted(cam for cam, n in counts.items() if n >= 2)
    if use_cml and len(usable) < 2:
        raise DatasetError(f"{where}: the target's training images come from {len(usable)} camera(s) with two or "
                           f"more images; L_CML compares cameras and is undefined here: use a multi-camera "
                           f"target, or set mar.use_cml=false to train without it")


def check_evaluable(dataset: ReidDataset) -> None:
    """DatasetError unless some query has a gallery image of its identity from another camera.

    Training ends with this evaluation (Market-1501 protocol); failing it after
    the last epoch would waste the run.
    """
    if not dataset.query or not dataset.gallery:
        raise DatasetError(f"{dataset.root}: the target has no query / gallery images to evaluate the run on")
    cameras: dict[int, set[int]] = defaultdict(set)
    for s in dataset.gallery:
        cameras[s.pid].add(s.camid)
    if not any(cameras.get(q.pid, set()) - {q.camid} for q in dataset.query):
        raise DatasetError(f"{dataset.root}: no query has a gallery image of its identity from another camera, "
                           f"so the run could not be evaluated")


def check_target(dataset: ReidDataset, use_cml: bool) -> None:
    """``check_target_cameras`` and ``check_evaluable`` for a MAR target."""
    check_target_cameras(dataset.train, use_cml, dataset.root)
    check_evaluable(dataset)


def partial_checkpoints(folder: Path) -> list[Path]:
    """Temporary files an interrupted ``save_checkpoint`` left in ``folder``."""
    return sorted(p for p in folder.glob(".*.tmp") if p.is_file())


def prepare_run_dir(run_dir: Path, key: str, overwrites: Path | None = None) -> list[Path]:
    """Create ``run_dir``, prove it writable, lock it (``lock_run_dir``) and remove partial
    checkpoints a killed run left.

    ``overwrites``: the checkpoint a fresh run would replace (None when resuming);
    if it exists the run is refused, since starting over would lose its state.
    Returns the partial files removed.
    """
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".marreid-write-test.", dir=run_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(f"{key}: cannot write to {run_dir} ({exc.strerror or exc})") from None
    if current_ranks().is_main:  # under torchrun every rank prepares the folder; rank 0 holds it
        lock_run_dir(run_dir, key)
    if overwrites is not None and overwrites.is_file():
        raise ConfigError(f"{key}: {run_dir} already holds {overwrites.name}; continue that run with --resume, "
                          f"or choose another run folder")
    removed = partial_checkpoints(run_dir)
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def lock_run_dir(run_dir: Path, key: str) -> None:
    """Lock ``run_dir`` for this process, or raise ConfigError when another process holds it.

    Two runs in one folder would interleave their logs and overwrite each other's
    checkpoints (and a starting run would delete the other's partial checkpoint).
    The lock is a POSIX record lock (``fcntl.lockf``, non-blocking) on ``LOCK_FILE``:
    the kernel drops it when the process ends, even by SIGKILL, so a killed run never
    leaves a stale lock; and unlike ``flock`` a forked DataLoader worker does not
    inherit it, so a worker outliving a killed run for a few seconds cannot block
    ``--resume``. It is held until this process exits or starts a run in another
    folder; locking the folder it holds again (a resume, a pipeline stage) is a no-op.
    """
    fd = _lock_file(run_dir.resolve() / LOCK_FILE)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EAGAIN):
            raise
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        by = f" (process {holder})" if holder.isdigit() else ""
        raise ConfigError(f"{key}: {run_dir} is in use by another marreid run{by}; wait for it to end, "
                          f"or choose another run folder") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)


def _lock_file(path: Path) -> int:
    """An open descriptor of the lock file at ``path``: the one this process holds if it still
    is that file (a pipeline may delete and recreate a stage's folder), else a new one, after
    letting the one held go (closing it releases its lock)."""
    if _held_lock:
        held, fd = _held_lock[0]
        if held == path and _same_file(fd, path):
            return fd
        os.close(fd)
        _held_lock.clear()
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    _held_lock.append((path, fd))
    return fd


def _same_file(fd: int, path: Path) -> bool:
    """True if ``fd`` is open on the file now at ``path``."""
    try:
        now = os.stat(path)
    except OSError:
        return False
    opened = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (opened.st_dev, opened.st_ino)


def state_bytes(state: Any) -> int:
    """Bytes of every tensor in a nested dict / list / tuple."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v) for v in state)
    return 0


def optimizer_buffers(optimizer: torch.optim.Optimizer) -> int:
    """Tensors of a trainable parameter's size the optimiser keeps once it has stepped: SGD one
    (momentum), Adam and AdamW two (the moments); any other optimiser is counted as two."""
    if isinstance(optimizer, torch.optim.SGD):
        return 1
    return 2


def checkpoint_estimate(state: dict, model: torch.nn.Module, buffers: int = 1) -> int:
    """Bytes a checkpoint of ``state`` will take once the optimiser's state exists (``buffers``
    tensors per trainable parameter: ``optimizer_buffers``), with a margin for what is not a tensor."""
    per_buffer = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return int(SIZE_MARGIN * (state_bytes(state) + buffers * per_buffer)) + SIZE_SLACK


def check_free_space(run_dir: Path, need: int, key: str) -> None:
    """ConfigError when the disk holding ``run_dir`` has less than ``need`` bytes free.

    Checkpoints are replaced atomically (a new file, then a rename), so the old one
    stays while the new one is written: a full checkpoint's size must be free.
    """
    free = shutil.disk_usage(run_dir).free
    if free < need:
        raise ConfigError(f"{key}: {run_dir} has {free / 2**20:.0f} MiB free, its checkpoints need about "
                          f"{need / 2**20:.0f} MiB; free some space or choose another run folder")


def check_checkpoint_space(trainer: Any, key: str) -> None:
    """``check_free_space`` for a built trainer's checkpoints: ``last.pt``, plus one per epoch
    when it keeps them (``keep_epoch_checkpoints``)."""
    size = checkpoint_estimate(trainer.state_dict(), trainer.model, optimizer_buffers(trainer.optimizer))
    copies = 1 + (trainer.epochs if trainer.keep_epoch_checkpoints else 0)
    check_free_space(trainer.run_dir, size * copies, key)


def check_input_size(state: dict, cfg: Config, path: Path | str) -> None:
    """CheckpointError when a checkpoint to resume was trained at another data.height x data.width.

    A resumed run must see the images at the size its weights, multilabel memory and
    statistics were computed at.
    """
    data = (state.get("config") or {}).get("data") or {}
    saved = (data.get("height"), data.get("width"))
    wanted = (cfg.data.height, cfg.data.width)
    if None not in saved and saved != wanted:
        raise CheckpointError(f"{path}: trained at {saved[0]}x{saved[1]} (data.height x data.width), this run asks "
                              f"for {wanted[0]}x{wanted[1]}; resume at the size it was trained at")


__all__ = ["ImageScreen", "load_checked_target", "check_target_cameras", "check_evaluable", "check_target",
           "prepare_run_dir", "lock_run_dir", "LOCK_FILE", "partial_checkpoints", "state_bytes", "checkpoint_estimate", "optimizer_buffers",
           "check_free_space", "check_checkpoint_space", "check_input_size"]
