"""``marreid analyze``: the supplementary analyses, ``lognormal`` (Fig. S1) and ``sweep`` (Fig. S2), the
diagnostics ``mining`` (L_MDL's mining over the whole target set) and ``gradients`` (each term's gradient share),
and ``cluster-weights`` (the hybrid's blend weight chosen on held-out target training identities)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from marreid.cli.common import (add_config_args, add_trust_arg, checkpoint_config, output_dir, resolved_config,
                                yaml_string)
from marreid.data.sample import SPLITS


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("analyze", help="the paper's supplementary analyses (Fig. S1, Fig. S2), diagnostics",
                                   description="Supplementary analyses: lognormal (Fig. S1), sweep (Fig. S2); "
                                               "diagnostics: mining, gradients.")
    sub = parser.add_subparsers(dest="analysis", metavar="ANALYSIS", required=True)

    ln = sub.add_parser(
        "lognormal",
        help="Fig. S1: histograms of log soft multilabels with fitted normals",
        description="Histograms of log y (Eq. 1) over a dataset split (default: the target's training images), "
                    "all dimensions together and one dimension alone, each with the fitted normal; mean, std, "
                    "skewness, excess kurtosis and the KS statistic are printed and saved. Writes "
                    "lognormal.png, lognormal.json and lognormal.csv to --out (default: the checkpoint's folder).",
    )
    ln.add_argument("checkpoint", metavar="CHECKPOINT",
                    help="a marreid pretrain or MAR checkpoint (it holds the agents)")
    ln.add_argument("--dataset-root", "--dataset", dest="dataset_root", metavar="R",
                    help="dataset to analyse (default: the configuration's target)")
    ln.add_argument("--dataset-format", metavar="F", help="format of --dataset-root (default: detected)")
    ln.add_argument("--split", choices=SPLITS, default="train", help="which split's images (default: train)")
    ln.add_argument("--dim", type=int, default=0, help="the single dimension of the second panel (default: 0)")
    ln.add_argument("--bins", type=int, default=100, help="histogram bins (default: 100)")
    ln.add_argument("--out", metavar="DIR", help="output folder (default: the checkpoint's folder)")
    add_config_args(ln, positional=False)
    add_trust_arg(ln)
    ln.set_defaults(func=run_lognormal)

    sw = sub.add_parser(
        "sweep",
        help="Fig. S2: one MAR run per value of a parameter, rank-1 / mAP against it",
        description="Pretrains once (or reuses train.pretrained_checkpoint / output.pretrain_dir/last.pt), "
                    "then trains and evaluates MAR once per value of mar.PARAM, each in OUT/PARAM_VALUE. "
                    "Finished runs are reused and interrupted ones resumed when the sweep is run again. "
                    "Writes sweep.csv and sweep.png to --out (default: sweep_PARAM beside output.run_dir).",
    )
    add_config_args(sw)
    sw.add_argument("--param", required=True, metavar="NAME",
                    help="the mar option to vary: mining_ratio, beta, or another float option of mar")
    sw.add_argument("--values", required=True, nargs="+", type=float, metavar="V", help="the values to train with")
    sw.add_argument("--pretrained", metavar="CKPT", help="start every run from this pretrain checkpoint")
    sw.add_argument("--out", metavar="DIR", help="output folder")
    sw.set_defaults(func=run_sweep)

    mi = sub.add_parser(
        "mining",
        help="diagnostic: L_MDL's mining rule over every pair of the target's training images",
        description="Takes the p*M closest pairs (by feature distance) over the whole target training set, "
                    "all pairs and cross-camera pairs only, and scores them with the true identities read from "
                    "the file names (for reporting only): same-person share, same-camera share, positives above "
                    "T and their precision, and the AUC of agreement and of feature distance. Writes mining.json "
                    "to --out (default: the checkpoint's folder).",
    )
    mi.add_argument("checkpoint", metavar="CHECKPOINT", help="a marreid pretrain or MAR checkpoint")
    mi.add_argument("--threshold", type=float, metavar="T",
                    help="agreement threshold (default: the MAR checkpoint's T, else the top-p quantile of all pairs)")
    mi.add_argument("--out", metavar="DIR", help="output folder (default: the checkpoint's folder)")
    add_config_args(mi, positional=False)
    add_trust_arg(mi)
    mi.set_defaults(func=run_mining)

    gr = sub.add_parser(
        "gradients",
        help="diagnostic: each term of Eq. 10 as a share of the backbone gradient",
        description="Loads a MAR checkpoint (its loss state) or a pretrain checkpoint (then initialises the loss "
                    "state on the target), takes --batches training batches and prints, per weighted term, the "
                    "gradient norm, its fraction of the total gradient along the total's direction (the fractions "
                    "sum to 1) and its cosine with the total. Writes gradients.json to --out.",
    )
    gr.add_argument("checkpoint", metavar="CHECKPOINT", help="a marreid pretrain or MAR checkpoint")
    gr.add_argument("--batches", type=int, default=3, help="how many training batches to average over (default: 3)")
    gr.add_argument("--out", metavar="DIR", help="output folder (default: the checkpoint's folder)")
    add_config_args(gr, positional=False)
    add_trust_arg(gr)
    gr.set_defaults(func=run_gradients)

    cw = sub.add_parser(
        "cluster-weights",
        help="choose the hybrid's agreement weight on held-out target training identities",
        description="Splits the target's training identities (a seeded --fraction of them, train.seed), "
                    "clusters all the target's training images as the cluster-contrast hybrid does each epoch, "
                    "and scores the clustering on the held-out images only: DBSCAN on "
                    "(1 - w) d_J + w (1 - A), A MAR's soft-multilabel agreement over the checkpoint's reference "
                    "agents, with the cc section's k1, k2, eps and min_samples. Each weight's clustering is "
                    "scored against the held-out identities of the file names (pair precision / recall / F, ARI, "
                    "NMI); "
                    "the test split is never read. --eps compares DBSCAN radii too. Prints the table and the setting "
                    "with the best pair F, and "
                    "writes cluster_weights.json to --out (default: the checkpoint's folder).",
    )
    cw.add_argument("checkpoint", metavar="CHECKPOINT", help="a marreid pretrain checkpoint (it holds the agents)")
    cw.add_argument("--weights", nargs="+", type=float, default=[0.0, 0.1, 0.2, 0.3], metavar="W",
                    help="the weights to compare (default: 0 0.1 0.2 0.3; each below 1 - cc.eps)")
    cw.add_argument("--eps", nargs="+", type=float, metavar="E",
                    help="DBSCAN radii to compare as well (default: cc.eps alone)")
    cw.add_argument("--fraction", type=float, default=0.2,
                    help="share of the target's training identities held out for validation (default: 0.2)")
    cw.add_argument("--out", metavar="DIR", help="output folder (default: the checkpoint's folder)")
    add_config_args(cw, positional=False)
    add_trust_arg(cw)
    cw.set_defaults(func=run_cluster_weights)


def run_lognormal(args: argparse.Namespace) -> int:
    from marreid.analysis.lognormal import collect_log_multilabels, write_lognormal_report
    from marreid.engine.extract import eval_transform, load_target, model_from_checkpoint, resolve_device
    from marreid.errors import CheckpointError

    cfg, state = checkpoint_config(args, args.checkpoint)
    if "kind" not in state:
        raise CheckpointError(f"{args.checkpoint}: not a marreid checkpoint, so it has no reference agents "
                              f"to compute soft multilabels against")
    device = resolve_device(cfg.train.device)
    model = model_from_checkpoint(state, args.checkpoint, cfg).to(device)
    dataset = load_target(cfg, args.dataset_format, args.dataset_root) if args.dataset_root else load_target(cfg)
    samples = getattr(dataset, args.split)
    log_y = collect_log_multilabels(model, samples, eval_transform(cfg), cfg.eval.batch_size,
                                    cfg.data.num_workers, device)
    out = output_dir(args)
    meta = {"checkpoint": str(args.checkpoint), "dataset": str(dataset.root), "split": args.split}
    result = write_lognormal_report(log_y, out, dim=args.dim, bins=args.bins, meta=meta)
    print(f"log soft multilabels of {log_y.shape[0]} images ({dataset.root}, {args.split}) "
          f"against {log_y.shape[1]} reference agents")
    print(f"{'panel':<16} {'n':>10} {'mean':>9} {'std':>8} {'skew':>7} {'ex.kurt':>8} {'KS':>7}")
    for title, fit in result["fits"].items():
        print(f"{title:<16} {fit.n:>10} {fit.mean:>9.3f} {fit.std:>8.3f} {fit.skewness:>7.3f} "
              f"{fit.excess_kurtosis:>8.3f} {fit.ks_statistic:>7.4f}")
    print(f"wrote {result['png']}, {result['json']} and {result['csv']}")
    return 0


def run_sweep(args: argparse.Namespace) -> int:
    from marreid.analysis.sweep import check_values, run_sweep as sweep, write_sweep

    check_values(args.param, args.values)
    extra = [f"train.pretrained_checkpoint={yaml_string(args.pretrained)}"] if args.pretrained else []
    cfg = resolved_config(args, extra=extra)
    out = Path(args.out) if args.out else Path(cfg.output.run_dir).parent / f"sweep_{args.param}"
    rows = sweep(cfg, args.param, args.values, out)
    files = write_sweep(rows, out)
    print(f"{args.param:>14} {'rank-1':>7} {'rank-5':>7} {'mAP':>7}  run")
    for row in sorted(rows, key=lambda r: r["value"]):
        print(f"{row['value']:>14g} {100 * row['rank1']:>7.1f} {100 * row['rank5']:>7.1f} "
              f"{100 * row['mAP']:>7.1f}  {row['run_dir']}")
    print(f"AP rule: {rows[0]['ap_rule']}; wrote {files['png']} and {files['csv']}")
    return 0


def run_mining(args: argparse.Namespace) -> int:
    from marreid.analysis.mining import mining_report
    from marreid.engine.extract import eval_transform, load_target, model_from_checkpoint, model_outputs, resolve_device
    from marreid.losses.multilabel import soft_multilabel
    from marreid.errors import CheckpointError

    cfg, state = checkpoint_config(args, args.checkpoint)
    if "kind" not in state:
        raise CheckpointError(f"{args.checkpoint}: not a marreid checkpoint, so it has no reference agents")
    threshold = args.threshold
    loss_state = state.get("loss") or {}
    if threshold is None and bool(loss_state.get("threshold.initialized", False)):
        threshold = float(loss_state["threshold.threshold"])
    device = resolve_device(cfg.train.device)
    model = model_from_checkpoint(state, args.checkpoint, cfg).to(device)
    target = load_target(cfg)
    feat, logits = model_outputs(model, target.train, eval_transform(cfg), cfg.eval.batch_size,
                                 cfg.data.num_workers, device)
    report = mining_report(feat, soft_multilabel(logits), [s.pid for s in target.train],
                           [s.camid for s in target.train], cfg.mar.mining_ratio, threshold)
    path = _write_report(output_dir(args), "mining.json",
                         {"checkpoint": str(args.checkpoint), "dataset": str(target.root), **report})
    print(f"{report['images']} images, {report['pairs']} pairs, "
          f"same-person base rate {100 * report['base_rate']:.3f}%, T = {report['threshold']:.4f}")
    print(f"{'mining':<20} {'pairs':>8} {'same-id':>8} {'same-cam':>9} {'pos':>7} {'pos same-id':>12} "
          f"{'AUC agree':>10} {'AUC feat':>9}")
    for name in ("mined", "mined_cross_camera"):
        r = report[name]
        pos = "-" if r["positive_precision"] is None else f"{100 * r['positive_precision']:.1f}%"
        aucs = ["-" if r[k] is None else f"{r[k]:.3f}" for k in ("agreement_auc", "feature_auc")]
        print(f"{name:<20} {r['count']:>8} {100 * r['precision']:>7.1f}% {100 * r['same_camera']:>8.1f}% "
              f"{r['positives']:>7} {pos:>12} {aucs[0]:>10} {aucs[1]:>9}")
    print(f"wrote {path}")
    return 0


def run_gradients(args: argparse.Namespace) -> int:
    from marreid.analysis.gradients import checkpoint_gradient_shares

    cfg, state = checkpoint_config(args, args.checkpoint)
    report = checkpoint_gradient_shares(cfg, state, args.checkpoint, args.batches)
    print(f"{'term':<6} {'|grad|':>10} {'along total':>12} {'cosine':>8}   "
          f"(mean of {len(report['batches'])} batches)")
    for name, m in report["mean"].items():
        print(f"{name:<6} {m['norm']:>10.4g} {m['along_total']:>12.3f} {m['cosine']:>8.3f}")
    path = _write_report(output_dir(args), "gradients.json", {"checkpoint": str(args.checkpoint), **report})
    print(f"wrote {path}")
    return 0


def _write_report(out: Path, name: str, data: dict) -> Path:
    """``data`` as indented JSON in ``out/name`` (the folder created if needed)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def run_cluster_weights(args: argparse.Namespace) -> int:
    import numpy as np

    from marreid.analysis.clusterval import pick_row, validate_cluster_weights
    from marreid.data.split import split_identities
    from marreid.engine.extract import eval_transform, load_target, model_from_checkpoint, model_outputs, resolve_device
    from marreid.errors import CheckpointError
    from marreid.losses.multilabel import log_soft_multilabel
    from marreid.metrics.cluster import blend_cutoff

    cfg, state = checkpoint_config(args, args.checkpoint)
    radii = args.eps or [cfg.cc.eps]
    for weight in args.weights:
        for radius in radii:
            blend_cutoff(weight, radius)  # refuses a setting now, before the features are extracted
    if "kind" not in state:
        raise CheckpointError(f"{args.checkpoint}: not a marreid checkpoint, so it has no reference agents "
                              f"to compute soft multilabels against")
    out = output_dir(args)
    device = resolve_device(cfg.train.device)
    model = model_from_checkpoint(state, args.checkpoint, cfg).to(device)
    target = load_target(cfg)
    _, validation = split_identities(target.train, args.fraction, cfg.train.seed)
    held_out = {id(s) for s in validation}
    index = np.array([i for i, s in enumerate(target.train) if id(s) in held_out], dtype=np.int64)
    pids = np.array([target.train[i].pid for i in index])
    feats, logits = model_outputs(model, target.train, eval_transform(cfg), cfg.eval.batch_size,
                                  cfg.data.num_workers, device)
    cc = cfg.cc
    rows = validate_cluster_weights(feats.numpy(), log_soft_multilabel(logits).exp().numpy(), index, pids,
                                    args.weights, k1=cc.k1, k2=cc.k2, eps=radii, min_samples=cc.min_samples)
    best = pick_row(rows)
    print(f"all {len(target.train)} target training images clustered; scored on the {len(index)} images of "
          f"{len(set(pids.tolist()))} held-out identities (fraction {args.fraction}, seed {cfg.train.seed})")
    print(f"{'eps':>5} {'weight':>7} {'pair P':>7} {'pair R':>7} {'pair F':>7} {'ARI':>6} {'NMI':>6} {'clusters':>8} {'outliers':>8}")
    for row in rows:
        print(f"{row['eps']:>5.3g} {row['weight']:>7.3g} {row['pair_precision']:>7.3f} {row['pair_recall']:>7.3f} {row['pair_f']:>7.3f} "
              f"{row['ari']:>6.3f} {row['nmi']:>6.3f} {row['clusters']:>8d} {row['outlier_share']:>8.3f}")
    print(f"best pair F at eps {best['eps']:g}, weight {best['weight']:g}: "
          f"set cc.eps={best['eps']:g} cc.agreement_weight={best['weight']:g}")
    out.mkdir(parents=True, exist_ok=True)
    report = {"checkpoint": str(args.checkpoint), "fraction": args.fraction, "seed": cfg.train.seed,
              "clustered_images": len(target.train), "images": len(index), "identities": len(set(pids.tolist())), "k1": cc.k1, "k2": cc.k2,
              "min_samples": cc.min_samples, "rows": rows, "best": best}
    path = out / "cluster_weights.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    return 0
