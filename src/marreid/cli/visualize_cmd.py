"""``marreid visualize``: ranked-list grids of a checkpoint (``ranks``), a run's training curves
(``curves``) and several runs' evaluations against steps (``compare``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from marreid.cli.common import add_config_args, add_trust_arg, checkpoint_config, output_dir
from marreid.errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("visualize", help="ranked-list grids and training curves",
                                   description="ranks: query / top-k gallery grids; curves: a run's training curves; "
                                               "compare: several runs' evaluations against steps.")
    sub = parser.add_subparsers(dest="view", metavar="VIEW", required=True)

    ranks = sub.add_parser(
        "ranks",
        help="grid of queries and their top-k gallery images, true matches green, false red",
        description="For random (--queries) or chosen (--query-index) queries: the query framed blue, then its "
                    "top-k gallery images by distance, true matches framed green, false ones red, and images "
                    "the Market-1501 protocol ignores (same identity and camera, junk) grey with a label. "
                    "Writes ranks.png and ranks.csv to --out (default: the checkpoint's folder).",
    )
    ranks.add_argument("checkpoint", metavar="CHECKPOINT", help="a marreid checkpoint or a weight file")
    ranks.add_argument("--dataset-root", "--dataset", dest="dataset_root", metavar="R",
                       help="dataset whose query / gallery to use (default: the configuration's target)")
    ranks.add_argument("--dataset-format", metavar="F", help="format of --dataset-root (default: detected)")
    which = ranks.add_mutually_exclusive_group()
    which.add_argument("--queries", type=int, metavar="N", help="N random queries (default: 8)")
    which.add_argument("--query-index", type=int, nargs="+", metavar="I", help="these rows of the query split")
    ranks.add_argument("--topk", type=int, default=10, help="gallery images per query (default: 10)")
    ranks.add_argument("--seed", type=int, default=0, help="seed of the random query choice (default: 0)")
    ranks.add_argument("--tile", type=int, nargs=2, default=(128, 64), metavar=("H", "W"),
                       help="tile size in pixels (default: 128 64)")
    ranks.add_argument("--out", metavar="DIR", help="output folder (default: the checkpoint's folder)")
    add_config_args(ranks, positional=False)
    add_trust_arg(ranks)
    ranks.set_defaults(func=run_ranks)

    curves = sub.add_parser(
        "curves",
        help="plot every loss term, mined-pair counts and evaluations of a run",
        description="Reads RUN_DIR/log.jsonl (the last record of each step, when a resumed run repeated "
                    "steps) and writes curves.png, curves_steps.csv and curves_eval.csv to --out "
                    "(default: RUN_DIR).",
    )
    curves.add_argument("run_dir", metavar="RUN_DIR", help="a pretrain or MAR run folder")
    curves.add_argument("--out", metavar="DIR", help="output folder (default: RUN_DIR)")
    curves.set_defaults(func=run_curves)

    compare = sub.add_parser(
        "compare",
        help="rank-1 and mAP against steps of several runs, in one plot and one CSV",
        description="Reads each RUN_DIR/log.jsonl's evaluations (train.eval_every_epochs and the final "
                    "one) and writes NAME.png (rank-1 and mAP against steps, one line per run) and NAME.csv "
                    "to --out. Runs that started from the same checkpoint can share its metrics as step 0 "
                    "(--start, e.g. the direct-transfer JSON of `marreid evaluate --out`).",
    )
    compare.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="MAR run folders")
    compare.add_argument("--label", action="append", metavar="NAME",
                         help="a name per run, in order (default: the folder names)")
    compare.add_argument("--start", metavar="JSON", help="metrics of the common starting checkpoint, as step 0")
    compare.add_argument("--out", metavar="DIR", required=True, help="output folder")
    compare.add_argument("--name", default="compare", help="file name stem (default: compare)")
    compare.set_defaults(func=run_compare)


def run_ranks(args: argparse.Namespace) -> int:
    from marreid.analysis.plotting import GridLayout
    from marreid.analysis.ranklist import FALSE, MATCH, choose_queries, ranked_lists, write_ranked_lists
    from marreid.engine.extract import (eval_transform, extract_features, load_target, model_from_checkpoint,
                                        resolve_device)
    from marreid.errors import ConfigError, DatasetError

    if args.topk < 1:
        raise ConfigError(f"--topk must be at least 1, got {args.topk}")
    cfg, state = checkpoint_config(args, args.checkpoint)
    dataset = load_target(cfg, args.dataset_format, args.dataset_root) if args.dataset_root else load_target(cfg)
    if not dataset.query or not dataset.gallery:
        raise DatasetError(f"{dataset.root}: ranked lists need query and gallery splits")
    count = args.queries if args.queries is not None else 8
    chosen = choose_queries(len(dataset.query), count, args.query_index, args.seed)
    layout = GridLayout(rows=len(chosen), cols=min(args.topk, len(dataset.gallery)),
                        tile_h=args.tile[0], tile_w=args.tile[1])
    device = resolve_device(cfg.train.device)
    model = model_from_checkpoint(state, args.checkpoint, cfg).to(device)
    common = dict(transform=eval_transform(cfg), batch_size=cfg.eval.batch_size,
                  num_workers=cfg.data.num_workers, device=device)
    qf = extract_features(model, [dataset.query[i] for i in chosen], **common)[0]
    gf = extract_features(model, dataset.gallery, **common)[0]
    lists = ranked_lists(qf, gf, dataset.query, dataset.gallery, chosen, args.topk, cfg.eval.metric)
    out = output_dir(args)
    files = write_ranked_lists(lists, dataset.query, dataset.gallery, out, layout)
    for ranked in lists:
        marks = "".join({MATCH: "+", FALSE: "-"}.get(s, ".") for s in ranked.statuses)
        first = next((i + 1 for i, s in enumerate(ranked.statuses) if s == MATCH), None)
        print(f"query {ranked.query_index:>5} ({Path(dataset.query[ranked.query_index].path).name}): {marks}  "
              f"first true match at rank {first if first else f'> {len(ranked.statuses)}'}")
    print(f"(+ true match, - false, . ignored by the protocol; {cfg.eval.metric} distance)")
    print(f"wrote {files['png']} and {files['csv']}")
    return 0


def run_curves(args: argparse.Namespace) -> int:
    from marreid.analysis.curves import write_curves

    run_dir = Path(args.run_dir)
    result = write_curves(run_dir / "log.jsonl", Path(args.out) if args.out else run_dir)
    print(f"{result['steps']} steps and {result['evals']} evaluations in {result['panels']} panels")
    print(f"wrote {result['png']}, {result['steps_csv']} and {result['eval_csv']}")
    return 0


def run_compare(args: argparse.Namespace) -> int:
    from marreid.analysis.curves import write_eval_comparison

    runs = [Path(d) for d in args.run_dirs]
    labels = args.label or [d.name for d in runs]
    if len(labels) != len(runs):
        raise ConfigError(f"--label: {len(labels)} names for {len(runs)} runs (give one per RUN_DIR)")
    start = None
    if args.start:
        try:
            start = json.loads(Path(args.start).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"--start {args.start}: not a readable metrics JSON ({exc})") from None
        if not isinstance(start, dict) or "mAP" not in start:
            raise ConfigError(f"--start {args.start}: no mAP in it (expected `marreid evaluate --out` output)")
    result = write_eval_comparison([(label, d / "log.jsonl") for label, d in zip(labels, runs)], args.out,
                                   start, args.name)
    print(f"{result['rows']} evaluations of {len(runs)} runs")
    print(f"wrote {result['png']} and {result['csv']}")
    return 0
