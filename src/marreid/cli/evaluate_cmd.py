"""``marreid evaluate``: rank-1/5/10 and mAP of a checkpoint on a dataset's query / gallery."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from marreid.cli.common import add_config_args, add_trust_arg, check_output, checkpoint_config, print_metrics
from marreid.metrics.rank import AP_RULES


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
    parser.add_argument("--rerank", action="store_true",
                        help="also report the metrics after k-reciprocal re-ranking (Zhong et al., CVPR 2017; "
                             "sets eval.rerank)")
    parser.add_argument("--k1", type=int, metavar="K",
                        help="re-ranking's k1 (default: eval.rerank_k1, 20; implies --rerank)")
    parser.add_argument("--k2", type=int, metavar="K",
                        help="re-ranking's k2 (default: eval.rerank_k2, 6; implies --rerank)")
    parser.add_argument("--lambda", dest="rerank_lambda", type=float, metavar="L",
                        help="re-ranking's weight of the original distance (default: eval.rerank_lambda, 0.3; "
                             "implies --rerank)")
    parser.add_argument("--adabn", action="store_true",
                        help="first recompute the BatchNorm statistics on the dataset's training images (AdaBN, "
                             "Li et al. 2018): the label-free baseline that shows how much of an adaptation "
                             "method's gain is BatchNorm statistics")
    add_trust_arg(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from marreid.engine.extract import evaluate_model, load_target, model_from_checkpoint, resolve_device

    if args.out:
        check_output(args.out, "--out")  # now, not after the metrics are computed
    if args.ap_rule:
        args.overrides = [*args.overrides, f"eval.ap_rule={args.ap_rule}"]
    rerank_options = {"eval.rerank_k1": args.k1, "eval.rerank_k2": args.k2, "eval.rerank_lambda": args.rerank_lambda}
    rerank_options = {key: value for key, value in rerank_options.items() if value is not None}
    if args.rerank or rerank_options:
        rerank_options["eval.rerank"] = "true"
    args.overrides = [*args.overrides, *(f"{key}={value}" for key, value in rerank_options.items())]
    cfg, state = checkpoint_config(args, args.checkpoint)
    device = resolve_device(cfg.train.device)
    model = model_from_checkpoint(state, args.checkpoint, cfg).to(device)
    if args.dataset_root:
        dataset = load_target(cfg, args.dataset_format, args.dataset_root)
    else:
        dataset = load_target(cfg)
    if args.adabn:
        adapt_batchnorm(model, dataset, cfg, device)
    metrics = evaluate_model(model, dataset, cfg, device)
    if args.adabn:
        metrics["adabn_images"] = len(dataset.train)
    metrics["checkpoint"] = str(args.checkpoint)
    print_metrics(metrics)
    if "rerank" in metrics:
        again = metrics["rerank"]
        print(f"re-ranked (k1 {again['k1']}, k2 {again['k2']}, lambda {again['lambda']}): "
              f"rank-1 {100 * again['rank1']:.1f}  rank-5 {100 * again['rank5']:.1f}  "
              f"rank-10 {100 * again['rank10']:.1f}  mAP {100 * again['mAP']:.1f}")
    text = json.dumps(metrics, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


def adapt_batchnorm(model, dataset, cfg, device) -> None:
    """AdaBN over ``dataset.train`` with the test transform, in ``eval.batch_size`` batches."""
    from marreid.data.loaders import plain_loader
    from marreid.engine.extract import eval_transform
    from marreid.errors import DatasetError
    from marreid.models.adabn import recompute_batchnorm

    if not dataset.train:
        raise DatasetError(f"{dataset.root}: --adabn needs the training images, and there are none")
    loader = plain_loader(dataset.train, eval_transform(cfg), cfg.eval.batch_size, cfg.data.num_workers)
    recompute_batchnorm(model, (images for images, _, _, _ in loader), device)
