"""``marreid train``: adaptation to the unlabeled target by the method of ``train.method`` (MAR by default)."""

from __future__ import annotations

import argparse

from marreid.cli.common import (add_config_args, add_run_args, add_trust_arg, print_metrics, resolved_config,
                                stopped_by_signal, yaml_string)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train MAR (or another train.method) on the unlabeled target from a pretrained checkpoint",
        description="Adaptation to the unlabeled target by train.method: mar (default; Eq. 10 on auxiliary + "
                    "unlabeled target batches) or cluster_contrast (Dai et al. 2021, the cc section; "
                    "--set train.method=cluster_contrast), then evaluation on the target's query / gallery. "
                    "Writes config.yaml, log.jsonl, last.pt and metrics.json to the run directory "
                    "(output.run_dir unless --run-dir).",
    )
    add_config_args(parser)
    add_run_args(parser)
    parser.add_argument("--pretrained", metavar="CKPT",
                        help="the pretrain checkpoint the run starts from, whose classifier rows become the agents "
                             "(default: train.pretrained_checkpoint, else output.pretrain_dir/last.pt)")
    add_trust_arg(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from marreid.engine.train import run_train

    extra = []
    if args.pretrained:
        extra.append(f"train.pretrained_checkpoint={yaml_string(args.pretrained)}")
    if args.trust_checkpoint:
        extra.append("model.trust_checkpoint=true")
    cfg = resolved_config(args, run_dir_key="output.run_dir", extra=extra)
    result = run_train(cfg, resume=args.resume)
    print(f"train {result['status']} after {result['steps']} steps; checkpoint: {result['checkpoint']}")
    if result["metrics"] is not None:
        print_metrics(result["metrics"])
    return stopped_by_signal("train", result) or 0
