"""Checkpoints: atomic writes and safe (``weights_only``) loads.

A checkpoint is a plain dict of tensors, dicts, lists, numbers and strings, so
it loads without unpickling arbitrary objects. Training checkpoints hold
``model``, ``optimizer``, ``scheduler``, ``loss`` (MARLoss state), ``rng``,
``epoch`` and ``step`` (the next to run), ``config`` (plain dict),
``num_agents``, ``num_target``, ``kind`` ("pretrain" or "mar") and
``marreid_version``.
"""

from __future__ import annotations

import errno
import os
import pickle
import re
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import BinaryIO

import torch

from marreid import __version__
from marreid.errors import CheckpointError

TRUST_HINT = ("it holds pickled Python objects, which can run arbitrary code when loaded; "
              "pass --trust-checkpoint, but only for a file whose origin you trust")
# What torch's weights_only loader says of a class or function it does not allow: "Unsupported
# global: GLOBAL x", or "unsupported GLOBAL posix.system whose module posix is blocked" (2.6 on)
UNSUPPORTED_GLOBAL = re.compile(r"unsupported global", re.IGNORECASE)
# ... and of an opcode it cannot parse ("Unsupported operand 149"), e.g. a raw protocol-4 pickle's
UNSUPPORTED_OPCODE = re.compile(r"unsupported operand", re.IGNORECASE)
PICKLE_PROTO = b"\x80"  # the first byte of every pickle of protocol 2 or later
# How many non-finite tensors an error names before it only counts the rest
SHOWN_TENSORS = 3


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write ``state`` to ``path`` atomically.

    The bytes go to a temporary file in the same folder, are flushed and fsync'ed, then
    ``os.replace`` swaps it in: a crash at any point leaves the previous file intact.
    A failed write (disk full, I/O error) removes the temporary file and raises OSError.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"marreid_version": __version__, **state}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            _write(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _write(state: dict, fh: BinaryIO) -> None:
    """``torch.save``, whose failure to write is an OSError like any other file's.

    Its zip writer reports a short write (a full disk) as ``RuntimeError: [enforce fail
    at inline_container.cc:...] unexpected pos N vs M``; the callers handle OSError.
    """
    try:
        torch.save(state, fh)
    except RuntimeError as exc:
        raise OSError(errno.EIO, f"the write failed, is the disk full? ({_first_line(exc)})") from None


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


def load_checkpoint(path: str | os.PathLike, trust: bool = False, map_location: str | torch.device = "cpu",
                    finite: bool = False) -> dict:
    """Read a checkpoint; only tensors and plain containers unless ``trust`` is set.

    Raises CheckpointError naming the file when it is missing, truncated or corrupt,
    not a dict, (without ``trust``) holds objects that need arbitrary unpickling, or
    (with ``finite``, for weights about to be used) holds a NaN or infinite value.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():
            # a raw (non-zip) pickle makes torch warn about its protocol first; the error says it all
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            state = torch.load(path, map_location=map_location, weights_only=not trust)
    except pickle.UnpicklingError as exc:
        # Only what the safe loader refuses to unpickle needs trust; anything else is damage.
        if not trust and _needs_unpickling(path, str(exc)):
            raise CheckpointError(f"refusing to load {path}: {TRUST_HINT}") from None
        raise CheckpointError(f"{path}: corrupt or not a torch checkpoint") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, AttributeError,
            ModuleNotFoundError) as exc:
        raise CheckpointError(f"{path}: unreadable or corrupt checkpoint ({_first_line(exc)})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
    if finite:
        require_finite(state, path)
    return state


def _needs_unpickling(path: Path, message: str) -> bool:
    """True when the safe loader refused a real pickle rather than damage: a class or function it
    does not allow, or an opcode it cannot parse in a file that starts as a pickle does (garbage
    bytes fail as unsupported opcodes too)."""
    if UNSUPPORTED_GLOBAL.search(message):
        return True
    if not UNSUPPORTED_OPCODE.search(message):
        return False
    with path.open("rb") as fh:
        return fh.read(1) == PICKLE_PROTO


def non_finite_tensors(state: object, prefix: str = "") -> list[str]:
    """Dotted names of the floating-point tensors in a nested dict / list / tuple that hold a NaN or inf."""
    if isinstance(state, torch.Tensor):
        bad = state.is_floating_point() and not torch.isfinite(state).all()
        return [prefix or "(the tensor)"] if bad else []
    if isinstance(state, dict):
        items = state.items()
    elif isinstance(state, (list, tuple)):
        items = enumerate(state)
    else:
        return []
    return [name for key, value in items for name in non_finite_tensors(value, f"{prefix}{'.' if prefix else ''}{key}")]


def require_finite(state: dict, path: str | os.PathLike) -> None:
    """CheckpointError naming ``path`` and its first non-finite tensors (and how many there are).

    Weights of a diverged run would otherwise surface far from their cause: as NaN
    distances at evaluation, or as a non-finite loss at a training's first step.
    """
    bad = non_finite_tensors(state)
    if not bad:
        return
    more = len(bad) - SHOWN_TENSORS
    shown = ", ".join(bad[:SHOWN_TENSORS]) + (f" and {more} more" if more > 0 else "")
    raise CheckpointError(f"{path}: non-finite values (NaN or inf) in {len(bad)} tensor(s): {shown}; "
                          f"use a checkpoint from before the run diverged")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else exc.__class__.__name__


__all__ = ["save_checkpoint", "load_checkpoint", "non_finite_tensors", "require_finite", "TRUST_HINT"]
