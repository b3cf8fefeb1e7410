"""``marreid pretrain``: supervised L_AL pretraining on the auxiliary set (learns the agents)."""

from __future__ import annotations

import argparse

from marreid.cli.common import add_config_args, add_run_args, add_trust_arg, resolved_config, stopped_by_signal


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "pretrain",
        help="pretrain the backbone and reference agents on the labeled auxiliary set",
        description="Softmax pretraining (L_AL, Eq. 7) on the auxiliary identities; the classifier rows "
                    "become MAR's reference agents. Writes config.yaml, log.jsonl and last.pt to the run "
                    "directory (output.pretrain_dir unless --run-dir).",
    )
    add_config_args(parser)
    add_run_args(parser)
    add_trust_arg(parser, "model.pretrained files")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from marreid.engine.pretrain import run_pretrain

    cfg = resolved_config(args, run_dir_key="output.pretrain_dir",
                          extra=["model.trust_checkpoint=true"] if args.trust_checkpoint else [])
    result = run_pretrain(cfg, resume=args.resume)
    print(f"pretrain {result['status']} after {result['steps']} steps, {result['num_agents']} agents; "
          f"checkpoint: {result['checkpoint']}")
    return stopped_by_signal("pretrain", result) or 0
