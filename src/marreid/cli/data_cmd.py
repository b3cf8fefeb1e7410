"""``marreid data summary|verify``: count or check a dataset on disk."""

from __future__ import annotations

import argparse
import json
import sys

from marreid.data.loaders import find_bad_images
from marreid.data.registry import DATASET_FORMATS, load_dataset
from marreid.data.sample import ReidDataset
from marreid.data.summary import format_summary, summarize


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("root", metavar="ROOT", help="dataset folder (or a .csv manifest)")
    parser.add_argument("--format", help=f"one of {', '.join(DATASET_FORMATS)} (default: detected)")
    parser.add_argument("--pattern", help="regex with (?P<pid>...) and optional (?P<cam>...) for a flat folder")
    parser.add_argument("--cuhk03-variant", default="detected", choices=("detected", "labeled"))


def load(args: argparse.Namespace) -> ReidDataset:
    return load_dataset(args.format, args.root, pattern=args.pattern, cuhk03_variant=args.cuhk03_variant)


def run_summary(args: argparse.Namespace) -> int:
    ds = load(args)
    counts = summarize(ds)
    print(json.dumps(counts) if args.json else format_summary(counts, f"{ds.name} at {ds.root}"))
    return 0


def run_verify(args: argparse.Namespace) -> int:
    ds = load(args)
    samples = ds.train + ds.query + ds.gallery
    bad = find_bad_images(samples)
    for path, reason in bad:
        print(f"bad image {path}: {reason}", file=sys.stderr)
    if bad:
        print(f"{len(bad):,} of {len(samples):,} images cannot be read", file=sys.stderr)
        return 2
    print(f"all {len(samples):,} images of {ds.root} decode")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="count or check a dataset on disk")
    actions = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    summary = actions.add_parser("summary", help="images, identities and cameras per split")
    add_dataset_arguments(summary)
    summary.add_argument("--json", action="store_true", help="print the counts as JSON")
    summary.set_defaults(func=run_summary)
    verify = actions.add_parser("verify", help="decode every image; list the unreadable ones")
    add_dataset_arguments(verify)
    verify.set_defaults(func=run_verify)
