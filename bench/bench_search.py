"""Time and peak memory of exact top-k search over 100k and 1M synthetic gallery vectors.

Each gallery is written as a float32 memmap in a temporary folder (1M x 2,048-D is
8 GB on disk, 100k is 0.8 GB), then ``topk_search`` streams over it. Galleries up to
``--baseline-max`` rows are also searched the plain way (whole gallery in memory, full
distance matrix, stable argsort of every row) to check the answers and give a ratio.
The file was just written, so it is mostly in the page cache: times are warm-cache times.

Usage: python bench/bench_search.py [--sizes 100000 1000000] [--dim 2048] [--queries 100] [--k 50]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from bench_eval import PeakMemory
from marreid.metrics import compute_distance_matrix, topk_search

WRITE_ROWS = 1 << 16


def write_gallery(path: Path, rows: int, dim: int, seed: int) -> np.memmap:
    """A float32 [rows, dim] memmap of standard normal vectors, written block by block, reopened read-only."""
    rng = np.random.default_rng(seed)
    out = np.memmap(path, dtype=np.float32, mode="w+", shape=(rows, dim))
    for start in range(0, rows, WRITE_ROWS):
        stop = min(start + WRITE_ROWS, rows)
        out[start:stop] = rng.standard_normal((stop - start, dim), dtype=np.float32)
    out.flush()
    del out
    return np.memmap(path, dtype=np.float32, mode="r", shape=(rows, dim))


def plain_search(query: np.ndarray, gallery: np.memmap, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The baseline: load everything, compute every distance, sort every row."""
    dist = compute_distance_matrix(query, np.array(gallery))
    indices = np.argsort(dist, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(dist, indices, 1), indices


def run(rows: int, args: argparse.Namespace, folder: Path) -> None:
    size_gb = rows * args.dim * 4 / 1e9
    free_gb = shutil.disk_usage(folder).free / 1e9
    print(f"\n== gallery {rows:,} x {args.dim}-D float32 ({size_gb:.1f} GB memmap), "
          f"{args.queries} queries, top-{args.k}, cosine")
    if size_gb > free_gb - 2:
        print(f"skipped: {free_gb:.1f} GB free in {folder}")
        return
    path = folder / f"gallery_{rows}.f32"
    start = time.perf_counter()
    gallery = write_gallery(path, rows, args.dim, args.seed)
    print(f"written in {time.perf_counter() - start:.1f} s")
    query = np.random.default_rng(args.seed + 1).standard_normal((args.queries, args.dim), dtype=np.float32)
    try:
        with PeakMemory() as memory:
            start = time.perf_counter()
            distances, indices = topk_search(query, gallery, args.k, backend=args.backend)
            seconds = time.perf_counter() - start
        print(f"topk_search ({args.backend}): {seconds:7.1f} s  {rows / seconds:,.0f} vectors/s  {memory}")
        if rows <= args.baseline_max:
            with PeakMemory() as base_memory:
                start = time.perf_counter()
                base_distances, base_indices = plain_search(query, gallery, args.k)
                base_seconds = time.perf_counter() - start
            same = float((base_indices == indices).mean())
            print(f"plain in-memory search: {base_seconds:7.1f} s  {base_memory}")
            print(f"  same indices: {100 * same:.2f}%, max |distance difference| "
                  f"{np.abs(base_distances - distances).max():.1e}; streaming is "
                  f"{base_seconds / seconds:.2f}x the speed; anonymous memory growth plain / streaming "
                  f"{base_memory.rss_peak / max(memory.rss_peak, 1):.1f}x")
    finally:
        del gallery
        path.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--backend", choices=["exact", "faiss"], default="exact")
    parser.add_argument("--baseline-max", type=int, default=200_000,
                        help="largest gallery also searched the plain in-memory way")
    parser.add_argument("--tmpdir", type=Path, default=None,
                        help="where the memmaps go (default: system temp)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"load average at start (2 shared cores): {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory(dir=args.tmpdir) as folder:
        for rows in args.sizes:
            run(rows, args, Path(folder))
    print(f"\nload average at end: {os.getloadavg()[0]:.1f}")
    print(f"process peak RSS (ru_maxrss: includes the baseline and the memmap pages read, "
          f"which are file-backed and reclaimable): "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20):.2f} GiB")


if __name__ == "__main__":
    main()
