"""Checkpoints: atomic writes and safe (``weights_only``) loads.

A checkpoint is a plain dict of tensors, dicts, lists, numbers and strings, so
it loads without unpickling arbitrary objects. Training checkpoints hold
``model``, ``optimizer``, ``scheduler``, ``loss`` (MARLoss state), ``rng``,
``epoch`` and ``step`` (the next to run), ``config`` (plain dict),
``num_agents``, ``num_target``, ``kind`` ("pretrain" or "mar") and
``marreid_version``.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path

import torch

from marreid import __version__
from marreid.errors import CheckpointError

TRUST_HINT = ("it holds pickled Python objects, which can run arbitrary code when loaded; "
              "if you trust its origin, pass --trust-checkpoint")


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write ``state`` to ``path`` atomically.

    The bytes go to a temporary file in the same folder, are flushed and fsync'ed, then
    ``os.replace`` swaps it in: a crash at any point leaves the previous file intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"marreid_version": __version__, **state}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (not possible on every platform; best effort)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | os.PathLike, trust: bool = False, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint; only tensors and plain containers unless ``trust`` is set.

    Raises CheckpointError naming the file when it is missing, truncated or corrupt,
    not a dict, or (without ``trust``) holds objects that need arbitrary unpickling.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=not trust)
    except pickle.UnpicklingError as exc:
        # Only a disallowed class reference means "safe loading refused"; anything else is damage.
        if not trust and "Unsupported global" in str(exc):
            raise CheckpointError(f"refusing to load {path}: {TRUST_HINT}") from None
        raise CheckpointError(f"{path}: corrupt or not a torch checkpoint") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, AttributeError,
            ModuleNotFoundError) as exc:
        raise CheckpointError(f"{path}: unreadable or corrupt checkpoint ({_first_line(exc)})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
    return state


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else exc.__class__.__name__


__all__ = ["save_checkpoint", "load_checkpoint", "TRUST_HINT"]
