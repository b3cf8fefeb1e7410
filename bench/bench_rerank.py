"""Time and peak memory of k-reciprocal re-ranking and of cluster contrast's clustering step, at Market-1501 size.

Random identity-clustered features (default 2,048-D, ``bench_eval.make_problem``) stand in
for a model's:

(a) ``rerank`` of 3,368 queries x 15,913 gallery images (k1 = 20, k2 = 6, lambda = 0.3), with
    the plain and re-ranked mAP, against the memory a dense implementation needs (the
    reference code holds the N x N float32 distances and their int64 argsort at once,
    N = Q + G, before its float16 V matrices).
(b) the per-epoch clustering step of cluster contrast on Market's 12,936 training images:
    ``k_reciprocal_jaccard`` (k1 = 30, k2 = 6) then scikit-learn's
    ``DBSCAN(eps=0.6, min_samples=4, metric="precomputed")``, on the dense float32 result
    and on the sparse one (only pairs with d_J <= 0.6 kept).

At the end the MSMT17-size cost of (a) (11,659 + 82,161 = 93,820 points) is extrapolated:
time as N^2 (the neighbour search's share; the sparse stages grow as N), memory as N for
the sparse stages plus the Q x G float32 result.

Usage: python bench/bench_rerank.py [--dim 2048] [--seed 0]
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from bench_eval import GIB, make_problem, timed
from sklearn.cluster import DBSCAN

from marreid.metrics import evaluate_features, evaluate_rank_detailed
from marreid.metrics.rerank import k_reciprocal_jaccard, rerank

MARKET = (3368, 15913, 751, 6)  # queries, gallery, identities, cameras
MARKET_TRAIN = (12936, 751)  # images, identities
MSMT = (11659, 82161)


def dense_bytes(n: int) -> int:
    """The least a dense implementation holds at once: N x N float32 distances and their int64 argsort."""
    return n * n * (4 + 8)


def bench_rerank(dim: int, seed: int) -> tuple[float, int]:
    num_q, num_g, num_ids, num_cams = MARKET
    n = num_q + num_g
    print(f"\n== (a) rerank: {num_q:,} queries x {num_g:,} gallery, {dim}-D, k1 20, k2 6, lambda 0.3")
    p = make_problem(num_q, num_g, num_ids, num_cams, dim, seed)
    ids = (p.q_pids, p.g_pids, p.q_cams, p.g_cams)
    distances, seconds, memory = timed(rerank, p.qf, p.gf)
    result_bytes = distances.nbytes
    print(f"rerank: {seconds:.1f} s, {memory} (of which the float32 result {result_bytes / GIB:.2f} GiB)")
    dense = dense_bytes(n)
    print(f"dense implementation: >= {dense / GIB:.2f} GiB (N = {n:,}: N^2 float32 + N^2 int64); "
          f"ratio dense / measured RSS peak {dense / max(memory.rss_peak, 1):.1f}x")
    plain = evaluate_features(p.qf, p.gf, *ids)
    reranked = evaluate_rank_detailed(distances, *ids)
    print(f"plain:     {plain.summary()}")
    print(f"re-ranked: {reranked.summary()}")
    return seconds, memory.rss_peak - result_bytes


def bench_cluster(dim: int, seed: int) -> None:
    num, num_ids = MARKET_TRAIN
    print(f"\n== (b) clustering step: {num:,} training features, {dim}-D, k1 30, k2 6, DBSCAN eps 0.6, min_samples 4")
    feats = make_problem(0, num, num_ids, 6, dim, seed + 1).gf
    dbscan = DBSCAN(eps=0.6, min_samples=4, metric="precomputed")
    for label, options in (("dense", {}), ("sparse (d_J <= 0.6)", {"max_distance": 0.6})):
        jaccard, seconds, memory = timed(k_reciprocal_jaccard, feats, 30, 6, **options)
        size = jaccard.nbytes if isinstance(jaccard, np.ndarray) else jaccard.data.nbytes + jaccard.indices.nbytes
        print(f"{label}: k_reciprocal_jaccard {seconds:.1f} s, {memory} "
              f"(result {size / GIB:.3f} GiB{'' if isinstance(jaccard, np.ndarray) else f', {jaccard.nnz:,} pairs'})")
        labels, seconds, memory = timed(dbscan.fit_predict, jaccard)
        clusters = int(labels.max()) + 1
        print(f"{label}: DBSCAN {seconds:.1f} s, {memory}; {clusters} clusters, "
              f"{int((labels == -1).sum()):,} outliers ({num_ids} identities)")
        del jaccard


def extrapolate(seconds: float, sparse_bytes: int) -> None:
    num_q, num_g = MARKET[:2]
    n_market, n_msmt = num_q + num_g, sum(MSMT)
    growth = n_msmt / n_market
    result = MSMT[0] * MSMT[1] * 4
    print(f"\n== MSMT17 size ({MSMT[0]:,} + {MSMT[1]:,} = {n_msmt:,} points), extrapolated from (a)")
    print(f"time <= {seconds * growth ** 2 / 60:.0f} min (x{growth ** 2:.1f}, as N^2); memory about "
          f"{sparse_bytes * growth / GIB:.2f} GiB of sparse stages (x{growth:.2f}) + the {result / GIB:.2f} GiB "
          f"float32 result; a dense implementation: >= {dense_bytes(n_msmt) / GIB:.0f} GiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPU cores")
    seconds, sparse_bytes = bench_rerank(args.dim, args.seed)
    bench_cluster(args.dim, args.seed)
    extrapolate(seconds, sparse_bytes)


if __name__ == "__main__":
    main()
