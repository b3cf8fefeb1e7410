"""``marreid synth``: write the embedded synthetic auxiliary + target datasets."""

from __future__ import annotations

import argparse
import time
from typing import Any, Callable

from marreid.data.synthetic import SPLITS, SyntheticConfig, generate


def _int_in(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in {low}..{high}, got {value}")
        return value

    return parse


def _size(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    try:
        height, width = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW such as 64x32, got {text!r}") from None
    if height < 16 or width < 8:
        raise argparse.ArgumentTypeError(f"must be at least 16x8, got {text!r}")
    return height, width


def register(subparsers: Any) -> None:
    defaults = SyntheticConfig()
    parser = subparsers.add_parser(
        "synth",
        help="generate the synthetic multi-camera pedestrian datasets",
        description="Render an auxiliary and a target camera network of synthetic pedestrians "
                    "in Market-1501 layout (OUT/auxiliary, OUT/target, OUT/params.json).",
    )
    parser.add_argument("out", metavar="OUT", help="output folder (new, empty, or made by synth)")
    parser.add_argument("--seed", type=_int_in(0, 2**63 - 1), default=defaults.seed)
    parser.add_argument("--aux-ids", type=_int_in(1, 9999), default=defaults.aux_ids,
                        help="auxiliary training identities (default %(default)s)")
    parser.add_argument("--aux-test-ids", type=_int_in(1, 9999), default=defaults.aux_test_ids,
                        help="auxiliary query/gallery identities (default %(default)s)")
    parser.add_argument("--aux-cams", type=_int_in(2, 9), default=defaults.aux_cams,
                        help="auxiliary cameras (default %(default)s)")
    parser.add_argument("--target-ids", type=_int_in(1, 9999), default=defaults.target_train_ids,
                        help="target training identities (default %(default)s)")
    parser.add_argument("--test-ids", type=_int_in(1, 9999), default=defaults.target_test_ids,
                        help="target query/gallery identities (default %(default)s)")
    parser.add_argument("--cams", type=_int_in(2, 9), default=defaults.target_cams,
                        help="target cameras (default %(default)s)")
    parser.add_argument("--per-cam", type=_int_in(1, 1000), default=defaults.per_cam,
                        help="images per identity per camera (default %(default)s)")
    parser.add_argument("--distractors", type=_int_in(0, 10_000), default=defaults.distractors,
                        help="pid-0000 images in the target gallery (default %(default)s)")
    h, w = defaults.image_size
    parser.add_argument("--size", type=_size, default=(h, w), metavar="HxW",
                        help=f"image height x width (default {h}x{w})")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a dataset previously written to OUT by synth")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = SyntheticConfig(
        aux_ids=args.aux_ids,
        aux_test_ids=args.aux_test_ids,
        aux_cams=args.aux_cams,
        target_train_ids=args.target_ids,
        target_test_ids=args.test_ids,
        target_cams=args.cams,
        per_cam=args.per_cam,
        distractors=args.distractors,
        image_size=args.size,
        seed=args.seed,
    )
    start = time.perf_counter()
    summary = generate(args.out, config, overwrite=args.overwrite)
    seconds = time.perf_counter() - start
    print(f"wrote {summary['out_dir']} in {seconds:.1f} s (seed {config.seed}, "
          f"{config.image_size[0]}x{config.image_size[1]} images)")
    for domain in ("auxiliary", "target"):
        part = summary[domain]
        splits = ", ".join(f"{s} {part[s]['images']} images / {part[s]['ids']} ids" for s in SPLITS)
        print(f"  {domain} ({part['cameras']} cameras): {splits}")
    print(f"  parameters: {summary['out_dir']}/params.json")
    return 0
