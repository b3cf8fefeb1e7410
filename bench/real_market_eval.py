"""The rank metrics on the real Market-1501 query / gallery, checked against a per-query loop.

Embedding (no training, fixed): each image resized to 16x32 (width x height) RGB,
flattened to 1,536 values in [0, 1], projected to 128-D by a Gaussian matrix drawn with
a fixed seed. Cosine distances; ``evaluate_rank`` (plain AP) must equal the per-query
loop of bench_eval.py on the same distance matrix to 1e-9. Skips with a message when
the data is absent.

Usage: python bench/real_market_eval.py [--root ../shared/data/Market-1501]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bench_eval import naive_loop
from marreid.data import Sample, load_dataset
from marreid.metrics import AP_RULES, compute_distance_matrix, evaluate_rank, evaluate_rank_detailed

DEFAULT_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "Market-1501"
SIZE = (16, 32)
DIM = 128


def embed(samples: list[Sample], projection: np.ndarray) -> np.ndarray:
    """Random projection of each image's downsampled pixels, float32 [N, DIM]."""
    pixels = np.empty((len(samples), projection.shape[0]), np.float32)
    for i, sample in enumerate(samples):
        with Image.open(sample.path) as image:
            small = image.convert("RGB").resize(SIZE, Image.BILINEAR)
        pixels[i] = np.asarray(small, np.float32).ravel() / 255.0
    return pixels @ projection


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not (args.root / "query").is_dir():
        print(f"skipped: no Market-1501 at {args.root}")
        return 0

    data = load_dataset("market1501", args.root)
    print(f"Market-1501 at {data.root}: {len(data.query)} queries, {len(data.gallery)} gallery "
          f"({data.junk} junk images left out by the reader)")
    projection = np.random.default_rng(args.seed).standard_normal((SIZE[0] * SIZE[1] * 3, DIM))
    projection = (projection / np.sqrt(DIM)).astype(np.float32)
    start = time.perf_counter()
    qf, gf = embed(data.query, projection), embed(data.gallery, projection)
    print(f"embedded in {time.perf_counter() - start:.1f} s")

    ids = [np.array([getattr(s, field) for s in split]) for field, split in
           (("pid", data.query), ("pid", data.gallery), ("camid", data.query), ("camid", data.gallery))]
    dist = compute_distance_matrix(qf, gf)

    start = time.perf_counter()
    cmc, mAP = evaluate_rank(dist, *ids)
    fast_seconds = time.perf_counter() - start
    start = time.perf_counter()
    naive_cmc, naive_map = naive_loop(dist, *ids)
    naive_seconds = time.perf_counter() - start
    print(f"evaluate_rank (plain): rank-1 {cmc[0]:.6f} rank-5 {cmc[4]:.6f} rank-10 {cmc[9]:.6f} "
          f"mAP {mAP:.9f}  ({fast_seconds:.2f} s)")
    print(f"per-query loop:        rank-1 {naive_cmc[0]:.6f} rank-5 {naive_cmc[4]:.6f} "
          f"rank-10 {naive_cmc[9]:.6f} mAP {naive_map:.9f}  ({naive_seconds:.2f} s)")
    cmc_gap, map_gap = float(np.abs(cmc - naive_cmc).max()), abs(mAP - naive_map)
    print(f"max |difference|: CMC {cmc_gap:.1e}, mAP {map_gap:.1e}")
    for ap_rule in AP_RULES:
        print(f"  {evaluate_rank_detailed(dist, *ids, ap_rule=ap_rule).summary()}")
    if cmc_gap > 1e-9 or map_gap > 1e-9:
        print("MISMATCH between evaluate_rank and the per-query loop")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
