"""``marreid search``: the top-k gallery images of query images, as a table and an image grid."""

from __future__ import annotations

import argparse
from pathlib import Path

from marreid.cli.common import add_config_args, add_trust_arg, check_output, checkpoint_config, output_dir


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "search",
        help="find the top-k gallery images of query images",
        description="Searches a gallery given as a folder of images or as the .npz written by `marreid "
                    "extract` (its features are used as they are). A folder's features are extracted once and "
                    "cached in --out as gallery_<folder>_<hash>.npz, reused while the checkpoint, the input "
                    "size and the images are unchanged. Writes search.png and search.csv to --out "
                    "(default: the checkpoint's folder).",
    )
    parser.add_argument("queries", nargs="+", metavar="QUERY_IMAGE", help="one or more query images")
    parser.add_argument("--gallery", required=True, metavar="FOLDER_OR_NPZ",
                        help="a folder of images (searched recursively) or a `marreid extract` .npz")
    parser.add_argument("--checkpoint", required=True, metavar="CKPT", help="a marreid checkpoint or a weight file")
    parser.add_argument("--topk", type=int, default=10, help="results per query (default: 10)")
    parser.add_argument("--tile", type=int, nargs=2, default=(128, 64), metavar=("H", "W"),
                        help="tile size in pixels (default: 128 64)")
    parser.add_argument("--out", metavar="DIR", help="output folder (default: the checkpoint's folder)")
    add_config_args(parser, positional=False)
    add_trust_arg(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from marreid.analysis.plotting import GridLayout
    from marreid.analysis.search import (Gallery, cache_key, cache_path, folder_samples, load_feature_file,
                                         read_cache, save_feature_file, search, write_search_results)
    from marreid.data import Sample
    from marreid.data.sample import is_image
    from marreid.engine.extract import eval_transform, extract_features, model_from_checkpoint, resolve_device
    from marreid.errors import ConfigError, DatasetError

    if args.topk < 1:
        raise ConfigError(f"--topk must be at least 1, got {args.topk}")
    for query in args.queries:
        if not Path(query).is_file() or not is_image(query):
            raise DatasetError(f"query image not found or not an image file: {query}")
    cfg, state = checkpoint_config(args, args.checkpoint)
    out = check_output(output_dir(args), "--out", folder=True)  # before the gallery is extracted
    device = resolve_device(cfg.train.device)
    model = model_from_checkpoint(state, args.checkpoint, cfg).to(device)
    common = dict(transform=eval_transform(cfg), batch_size=cfg.eval.batch_size,
                  num_workers=cfg.data.num_workers, device=device)
    if Path(args.gallery).is_file():
        gallery = load_feature_file(args.gallery)
        print(f"gallery: {len(gallery.paths)} precomputed features from {args.gallery}")
    else:
        samples = folder_samples(args.gallery)
        cached = cache_path(out, args.gallery)
        key = cache_key(args.checkpoint, cfg, samples)
        gallery = read_cache(cached, key)
        if gallery is not None:
            print(f"gallery: {len(gallery.paths)} features reused from the cache {cached}")
        else:
            feats, pids, camids = extract_features(model, samples, **common)
            gallery = Gallery(feats, [s.path for s in samples], pids, camids)
            save_feature_file(cached, gallery, cache_key=key)
            print(f"gallery: {len(samples)} images of {args.gallery} extracted; features cached at {cached}")
    query_feats = extract_features(model, [Sample(q, -1, -1) for q in args.queries], **common)[0]
    hits = search(query_feats, gallery, args.topk, cfg.eval.metric)
    for query, found in zip(args.queries, hits):
        print(f"query {query} ({cfg.eval.metric} distance):")
        print(f"{'rank':>6} {'distance':>10}  gallery image")
        for hit in found:
            print(f"{hit.rank:>6} {hit.distance:>10.4f}  {hit.path}")
    layout = GridLayout(rows=len(args.queries), cols=len(hits[0]), tile_h=args.tile[0], tile_w=args.tile[1])
    files = write_search_results(list(args.queries), hits, out, layout)
    print(f"wrote {files['png']} and {files['csv']}")
    return 0
