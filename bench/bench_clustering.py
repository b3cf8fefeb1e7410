"""Time and peak memory of cluster contrast's per-epoch clustering, plain and blended with MAR's agreement.

At Market-1501 size by default: 12,936 training images, 751 identities, 1,280-D features (the
MobileNetV2 of the real-data experiment). Random identity-clustered features
(``bench_eval.make_problem``) stand in for a model's, and random soft multilabels over 767
reference agents (CUHK03's training identities) for MAR's: each identity has its own agent
profile, each image a noisy copy of it. Measured:

(a) ``k_reciprocal_jaccard`` (k1 = 30, k2 = 6): dense, and sparse as each method needs it
    (cluster contrast: the pairs with d_J <= eps; the hybrid: d_J <= eps / (1 - w), ``blend_cutoff``);
(b) ``pseudo_labels`` (DBSCAN, eps 0.6, min_samples 4) on the dense and the sparse Jaccard;
(c) ``blended_distance`` (weight w) on the dense and the sparse Jaccard, then DBSCAN on it;
(d) with ``--extract``: the feature extraction that precedes them, a randomly initialised
    MobileNetV2 on ``--extract-images`` random 128x64 images (eval mode, batches of 128),
    extrapolated linearly to the whole set.

Each clustering is scored against the features' identities (pairwise F, NMI). Times and peak
RSS growth above the level at the start of each call; ratios to the dense Jaccard at the end.

Usage: python bench/bench_clustering.py [--size 12936] [--ids 751] [--dim 1280] [--agents 767]
                                        [--weight 0.3] [--extract] [--extract-images 1024] [--seed 0]
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch
from bench_eval import GIB, make_problem, timed

from marreid.metrics.cluster import blend_cutoff, blended_distance, clustering_scores, pseudo_labels
from marreid.metrics.rerank import k_reciprocal_jaccard
from marreid.models.backbones import build_backbone

MARKET_TRAIN = (12936, 751)  # images, identities
EPS, MIN_SAMPLES, K1, K2 = 0.6, 4, 30, 6


def make_multilabels(pids: np.ndarray, agents: int, seed: int) -> np.ndarray:
    """Soft multilabels softmax(s (profile_pid + noise)), float32 [N, agents]; s = 4: peaked, not one-hot rows."""
    rng = np.random.default_rng(seed)
    profiles = rng.standard_normal((int(pids.max()) + 1, agents), dtype=np.float32)
    logits = 4.0 * (profiles[pids] + 0.5 * rng.standard_normal((len(pids), agents), dtype=np.float32))
    logits -= logits.max(1, keepdims=True)
    y = np.exp(logits)
    return y / y.sum(1, keepdims=True)


def stored_bytes(distance) -> int:
    """Bytes a dense array or a CSR matrix holds."""
    if isinstance(distance, np.ndarray):
        return distance.nbytes
    return distance.data.nbytes + distance.indices.nbytes + distance.indptr.nbytes


def describe(distance) -> str:
    size = f"{stored_bytes(distance) / GIB:.3f} GiB"
    return size if isinstance(distance, np.ndarray) else f"{size}, {distance.nnz:,} pairs"


def cluster(label: str, distance, pids: np.ndarray, seconds: dict) -> None:
    labels, seconds[f"dbscan {label}"], memory = timed(pseudo_labels, distance, EPS, MIN_SAMPLES)
    s = clustering_scores(labels, pids)
    print(f"  DBSCAN on {label}: {seconds[f'dbscan {label}']:.1f} s, {memory}; {s['clusters']} clusters, "
          f"{s['outlier_share']:.1%} outliers; pair F {s['pair_f']:.3f}, NMI {s['nmi']:.3f}")


def bench_extract(size: int, images: int, seed: int) -> float:
    """Seconds for MobileNetV2 to embed ``images`` random 128x64 images, extrapolated to ``size``."""
    model = build_backbone("mobilenet_v2").eval()
    generator = torch.Generator().manual_seed(seed)

    def run() -> None:
        with torch.no_grad():
            for start in range(0, images, 128):
                model(torch.randn(min(128, images - start), 3, 128, 64, generator=generator))

    _, seconds, memory = timed(run)
    total = seconds / images * size
    print(f"\n== (d) MobileNetV2 128x64 extraction: {images:,} images in {seconds:.1f} s "
          f"({images / seconds:.0f} images/s), {memory}; {size:,} images: about {total:.0f} s")
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=MARKET_TRAIN[0], help="training images (Market: 12,936)")
    parser.add_argument("--ids", type=int, default=MARKET_TRAIN[1], help="identities (Market: 751)")
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--agents", type=int, default=767)
    parser.add_argument("--weight", type=float, default=0.3, help="the hybrid's blend weight, < 1 - eps")
    parser.add_argument("--extract", action="store_true", help="also time MobileNetV2 feature extraction")
    parser.add_argument("--extract-images", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads, "
          f"load average {os.getloadavg()[0]:.1f}")
    problem = make_problem(0, args.size, args.ids, 6, args.dim, args.seed)
    features, pids = problem.gf, problem.g_pids
    multilabels = make_multilabels(pids, args.agents, args.seed + 1)
    print(f"{args.size:,} images, {args.ids} identities, {args.dim}-D features, {args.agents} agents; "
          f"k1 {K1}, k2 {K2}, eps {EPS}, min_samples {MIN_SAMPLES}, weight {args.weight}")
    seconds: dict[str, float] = {}

    print("\n== (a) k-reciprocal Jaccard distance")
    jaccards = {}
    cutoff = blend_cutoff(args.weight, EPS)
    hybrid_sparse = f"sparse d_J <= {cutoff:.3f}"
    for label, cut in (("dense", None), ("sparse d_J <= eps", EPS), (hybrid_sparse, cutoff)):
        jaccards[label], seconds[f"jaccard {label}"], memory = timed(
            k_reciprocal_jaccard, features, K1, K2, max_distance=cut
        )
        print(f"  {label}: {seconds[f'jaccard {label}']:.1f} s, {memory} (result {describe(jaccards[label])})")

    print("\n== (b) cluster contrast: DBSCAN on the Jaccard distance")
    cluster("dense", jaccards["dense"], pids, seconds)
    cluster("sparse d_J <= eps", jaccards.pop("sparse d_J <= eps"), pids, seconds)

    print(f"\n== (c) hybrid: blended distance (1 - w) d_J + w (1 - A), w = {args.weight}, then DBSCAN")
    for label in ("dense", hybrid_sparse):
        blended, seconds[f"blend {label}"], memory = timed(blended_distance, jaccards.pop(label), multilabels,
                                                            args.weight, eps=EPS)
        print(f"  blend {label}: {seconds[f'blend {label}']:.1f} s, {memory} (result {describe(blended)})")
        cluster(f"blended {label}", blended, pids, seconds)
        del blended

    extract = bench_extract(args.size, args.extract_images, args.seed) if args.extract else None

    base = seconds["jaccard dense"]
    plain = base + seconds["dbscan dense"]
    hybrid = base + seconds["blend dense"] + seconds["dbscan blended dense"]
    print("\n== ratios")
    print(f"  dense path: DBSCAN / Jaccard {seconds['dbscan dense'] / base:.2f}, blend / Jaccard "
          f"{seconds['blend dense'] / base:.2f}")
    print(f"  clustering step: cluster contrast {plain:.1f} s, hybrid {hybrid:.1f} s (x{hybrid / plain:.2f})")
    sparse_plain = seconds["jaccard sparse d_J <= eps"] + seconds["dbscan sparse d_J <= eps"]
    sparse_hybrid = sum(seconds[f"{stage} {hybrid_sparse}"] for stage in ("jaccard", "blend", "dbscan blended"))
    print(f"  sparse path: cluster contrast {sparse_plain:.1f} s, hybrid {sparse_hybrid:.1f} s "
          f"(x{sparse_hybrid / sparse_plain:.2f})")
    if extract is not None:
        print(f"  extraction / cluster contrast's clustering: {extract / plain:.2f}")


if __name__ == "__main__":
    main()
