"""Errors a user can fix. The CLI prints them as one line naming the file or option."""

from __future__ import annotations

import codecs
import os
from pathlib import Path


class MarreidError(Exception):
    """Base class: bad input from the user (a path, an option, a file)."""


class DatasetError(MarreidError):
    """A dataset root, layout, file name or image that cannot be used."""


class ConfigError(MarreidError):
    """An unknown key, a wrong type or an inconsistent value in the configuration."""


class CheckpointError(MarreidError):
    """A checkpoint or weight file that is missing, corrupt, untrusted or incompatible."""


class TrainingError(MarreidError):
    """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""


def read_utf8(path: str | os.PathLike, error: type[MarreidError]) -> str:
    """The text of the UTF-8 file at ``path``, without a leading byte-order mark (Excel writes one).

    A byte that is not UTF-8 (a file saved as Latin-1, say, or not text at all) raises
    ``error`` naming the file, the byte, its offset and its line, rather than a traceback.
    """
    raw = Path(path).read_bytes()
    body = raw.removeprefix(codecs.BOM_UTF8)
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = exc.start + len(raw) - len(body)
        line = raw.count(b"\n", 0, offset) + 1
        raise error(f"{path}: not UTF-8 text (byte 0x{raw[offset]:02x} at offset {offset}, line {line}); "
                    f"save it as UTF-8") from None
