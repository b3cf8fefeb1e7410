"""``marreid experiment``: pretrain -> direct transfer -> MAR variants on the configured datasets."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from marreid.cli.common import add_config_args, add_rerank_arg, resolved_config
from marreid.engine.variants import known_variants


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "experiment",
        help="run the whole pipeline on the configured datasets (skips finished stages, resumes the rest)",
        description="Pretraining on the auxiliary set, direct transfer evaluated on the target, then each MAR "
                    "variant from the same pretrained checkpoint, evaluated under the configured AP rule and "
                    "under mar-release. Re-running the command skips the finished stages and continues an "
                    "interrupted one from its checkpoint; a finished stage whose evaluation options alone "
                    "changed (--rerank, another AP rule) is evaluated again from its checkpoint, not retrained. "
                    "Writes results.json and results.md to the run folder. Dataset roots are config options "
                    "(data.aux_root, data.target_root); "
                    "--set train.pretrained_checkpoint=CKPT starts from an existing pretraining instead.",
    )
    add_config_args(parser)
    parser.add_argument("--run-dir", metavar="DIR", help="the run folder (default: runs/<CONFIG's name>)")
    parser.add_argument("--variants", default="mar", metavar="V1,V2",
                        help=f"MAR variants to train (default: mar); known: {known_variants()}")
    add_rerank_arg(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from marreid.engine.pipeline import RESULTS_JSON, RESULTS_MD, run_pipeline
    from marreid.engine.variants import parse_variants

    variants = parse_variants(args.variants)
    cfg = resolved_config(args, extra=["eval.rerank=true"] if args.rerank else [])
    run_dir = Path(args.run_dir or Path("runs") / (Path(args.config).stem if args.config else "experiment"))
    start = time.perf_counter()
    run_pipeline(cfg, run_dir, variants, echo=lambda text: print(text, file=sys.stderr, flush=True))
    print((run_dir / RESULTS_MD).read_text(), end="")
    print(f"\nwall time {time.perf_counter() - start:.0f} s; results: {run_dir / RESULTS_JSON}, {run_dir / RESULTS_MD}")
    return 0
