"""``marreid evaluate``: rank-1/5/10 and mAP of a checkpoint on a dataset's query / gallery."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from marreid.cli.common import add_config_args, add_trust_arg, checkpoint_config, print_metrics
from marreid.config import AP_RULES


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="evaluate a checkpoint (rank-1/5/10, mAP) on a dataset's query / gallery",
        description="Market-1501 protocol (same identity and camera ignored, junk ignored), cosine "
                    "distance unless eval.metric says otherwise. The configuration is the checkpoint's "
                    "own unless --config is given; the dataset is its target unless --dataset-root is.",
    )
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="a marreid checkpoint or a weight file")
    add_config_args(parser, positional=False)
    parser.add_argument("--dataset-format", metavar="F", help="format of --dataset-root (default: detected)")
    parser.add_argument("--dataset-root", metavar="R", help="dataset to evaluate on (default: the target)")
    parser.add_argument("--ap-rule", choices=AP_RULES, help="how AP is computed (default: eval.ap_rule, plain)")
    parser.add_argument("--out", metavar="JSON", help="also write the metrics to this JSON file")
    add_trust_arg(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from marreid.engine.extract import evaluate_model, load_target, model_from_checkpoint, resolve_device

    if args.ap_rule:
        args.overrides = [*args.overrides, f"eval.ap_rule={args.ap_rule}"]
    cfg, state = checkpoint_config(args, args.checkpoint)
    device = resolve_device(cfg.train.device)
    model = model_from_checkpoint(state, args.checkpoint, cfg).to(device)
    if args.dataset_root:
        dataset = load_target(cfg, args.dataset_format, args.dataset_root)
    else:
        dataset = load_target(cfg)
    metrics = evaluate_model(model, dataset, cfg, device)
    metrics["checkpoint"] = str(args.checkpoint)
    print_metrics(metrics)
    text = json.dumps(metrics, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0
