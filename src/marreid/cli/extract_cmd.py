"""``marreid extract``: features of a dataset split or an image folder, saved as .npz.

The archive holds ``feats`` (float32 [N, D], L2-normalised), ``paths`` (str [N]),
``pids`` and ``camids`` (int64 [N]; -1 for a plain image folder).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from marreid.cli.common import add_config_args, add_trust_arg
from marreid.data.sample import SPLITS


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "extract",
        help="save L2-normalised features of a split or an image folder (.npz)",
        description="Writes an .npz with feats (float32 [N, D], L2-normalised), paths, pids and camids "
                    "(int64; -1 for --images). The configuration is the checkpoint's own unless --config.",
    )
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="a marreid checkpoint or a weight file")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--split", choices=SPLITS, help="a split of --dataset-root (default root: the target)")
    source.add_argument("--images", metavar="FOLDER", help="every image under FOLDER (recursively)")
    parser.add_argument("--dataset-format", metavar="F", help="format of --dataset-root (default: detected)")
    parser.add_argument("--dataset-root", metavar="R", help="the dataset that --split refers to")
    parser.add_argument("--out", metavar="FEATS.npz", required=True, help="where to write the features")
    add_config_args(parser, positional=False)
    add_trust_arg(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from marreid.cli.common import check_output, checkpoint_config
    from marreid.data import Sample
    from marreid.data.sample import is_image
    from marreid.engine.extract import eval_transform, extract_features, load_target, model_from_checkpoint, resolve_device
    from marreid.errors import DatasetError

    check_output(args.out, "--out")  # before the features are computed
    cfg, state = checkpoint_config(args, args.checkpoint)
    if args.images:
        folder = Path(args.images)
        if not folder.is_dir():
            raise DatasetError(f"--images: not a folder: {folder}")
        samples = [Sample(str(p), -1, -1) for p in sorted(folder.rglob("*")) if p.is_file() and is_image(p.name)]
        if not samples:
            raise DatasetError(f"--images: no images under {folder}")
    else:
        dataset = load_target(cfg, args.dataset_format, args.dataset_root) if args.dataset_root else load_target(cfg)
        samples = getattr(dataset, args.split)
    device = resolve_device(cfg.train.device)
    model = model_from_checkpoint(state, args.checkpoint, cfg).to(device)
    feats, pids, camids = extract_features(model, samples, eval_transform(cfg), cfg.eval.batch_size,
                                           cfg.data.num_workers, device)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("wb") as fh:  # a handle, so numpy does not append a second .npz suffix
        np.savez(fh, feats=feats, paths=np.array([s.path for s in samples]), pids=pids, camids=camids)
    print(f"{len(samples)} features of dimension {feats.shape[1]} written to {out}")
    return 0
