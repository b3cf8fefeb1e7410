"""The ``marreid`` command: a thin dispatcher over one module per command group.

Each module in ``COMMAND_MODULES`` exposes ``register(subparsers)``, which adds
its sub-command(s) and sets ``func`` on the parser to a callable taking the
parsed namespace and returning an exit code. A ``MarreidError`` raised anywhere below is
printed as one line and exits with status 2, and so is an ``OSError`` the machine rather
than the code caused (disk full, read-only or forbidden path, I/O failure); a second
Ctrl-C (the first stops a training run gracefully) prints one line and exits with 130.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys

from marreid import __version__
from marreid.errors import MarreidError

ENVIRONMENT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO)

COMMAND_MODULES = (
    "data_cmd",
    "synth_cmd",
    "pretrain_cmd",
    "train_cmd",
    "evaluate_cmd",
    "extract_cmd",
    "experiment_cmd",
    "demo_cmd",
    "analyze_cmd",
    "visualize_cmd",
    "search_cmd",
    "export_cmd",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="marreid",
        description="Unsupervised person re-ID by soft multilabel reference learning (MAR).",
    )
    parser.add_argument("--version", action="version", version=f"marreid {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"marreid.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except MarreidError as exc:
        print(f"marreid {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in ENVIRONMENT_ERRNOS:
            raise
        where = f": {exc.filename}" if exc.filename else ""
        print(f"marreid {args.command}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"marreid {args.command}: interrupted", file=sys.stderr)
        return 130


__all__ = ["build_parser", "main"]
