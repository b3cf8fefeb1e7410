"""Time and peak memory of CMC / mAP evaluation at Market-1501 and MSMT17 sizes, against a per-query loop.

Random identity-clustered features (default 2,048-D) stand in for a model's. For each
problem: ``evaluate_features`` (distances computed block by block, never the whole
matrix), for Market also ``evaluate_rank`` on a precomputed matrix, and the ranking
step alone against a torchreid-style per-query numpy loop (stable argsort of each
row), both run on the same first ``--naive-queries`` distance rows; the loop's time
is extrapolated linearly to all queries.

Usage: python bench/bench_eval.py [--problems market msmt] [--dim 2048] [--naive-queries 200]
"""

from __future__ import annotations

import argparse
import os
import resource
import threading
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from marreid.metrics import compute_distance_matrix, evaluate_features, evaluate_rank_detailed

PROBLEMS = {
    # name: (queries, gallery, identities, cameras)
    "market": (3368, 15913, 751, 6),
    "msmt": (11659, 82161, 3060, 15),
}
GIB = 1 << 30


def _rss_anon() -> int:
    """Anonymous resident memory of this process in bytes (file-backed pages such as memmaps excluded)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status (this benchmark needs Linux)")


class PeakMemory:
    """Peak growth, above the level at entry, of anonymous RSS (sampled every 2 ms) and of tracemalloc.

    tracemalloc sees numpy buffers and Python objects but not torch's own allocations;
    RSS sees everything the process holds, memmap pages excluded.
    """

    def __enter__(self) -> PeakMemory:
        tracemalloc.start()
        self._base = _rss_anon()
        self.rss_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.rss_peak = max(self.rss_peak, _rss_anon() - self._base)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.rss_peak = max(self.rss_peak, _rss_anon() - self._base)
        self.traced_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()

    def __str__(self) -> str:
        return f"peak +{self.rss_peak / GIB:.2f} GiB RSS, +{self.traced_peak / GIB:.2f} GiB tracemalloc"


@dataclass
class Problem:
    qf: np.ndarray
    gf: np.ndarray
    q_pids: np.ndarray
    g_pids: np.ndarray
    q_cams: np.ndarray
    g_cams: np.ndarray


def make_problem(num_q: int, num_g: int, num_ids: int, num_cams: int, dim: int, seed: int) -> Problem:
    """Features = identity centre + noise, so rankings are neither perfect nor random.

    A same-identity cosine is about 1 / (1 + noise^2) against chance cosines of about
    1 / sqrt(dim), so noise grows as dim^(1/4); 4.0 at 2,048-D gives Market-size rank-1 near 80%.
    """
    rng = np.random.default_rng(seed)
    noise = 4.0 * (dim / 2048) ** 0.25
    centres = rng.standard_normal((num_ids, dim), dtype=np.float32)
    g_pids = rng.integers(0, num_ids, num_g)
    q_pids = rng.integers(0, num_ids, num_q)
    gf = centres[g_pids] + noise * rng.standard_normal((num_g, dim), dtype=np.float32)
    qf = centres[q_pids] + noise * rng.standard_normal((num_q, dim), dtype=np.float32)
    return Problem(qf, gf, q_pids, g_pids, rng.integers(0, num_cams, num_q), rng.integers(0, num_cams, num_g))


def naive_loop(dist, q_pids, g_pids, q_cams, g_cams, max_rank: int = 50) -> tuple[np.ndarray, float]:
    """Per-query loop as torchreid's Python fallback does it (plain AP, stable sort for ties)."""
    cmc_sum, aps = np.zeros(max_rank), []
    for i in range(dist.shape[0]):
        order = np.argsort(dist[i], kind="stable")
        ranked_pids, ranked_cams = g_pids[order], g_cams[order]
        keep = (ranked_pids != -1) & ~((ranked_pids == q_pids[i]) & (ranked_cams == q_cams[i]))
        matches = ranked_pids[keep] == q_pids[i]
        if not matches.any():
            continue
        first = int(np.argmax(matches))
        if first < max_rank:
            cmc_sum[first:] += 1
        hit_ranks = np.flatnonzero(matches) + 1
        aps.append(float(np.mean(np.arange(1, hit_ranks.size + 1) / hit_ranks)))
    return cmc_sum / len(aps), float(np.mean(aps))


def timed(fn, *args, **kwargs):
    """(result, seconds, PeakMemory) of one call."""
    with PeakMemory() as memory:
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        seconds = time.perf_counter() - start
    return result, seconds, memory


def run(name: str, dim: int, naive_queries: int, seed: int) -> None:
    num_q, num_g, num_ids, num_cams = PROBLEMS[name]
    print(f"\n== {name}: {num_q:,} queries x {num_g:,} gallery, {num_ids} identities, "
          f"{num_cams} cameras, {dim}-D")
    p = make_problem(num_q, num_g, num_ids, num_cams, dim, seed)
    ids = (p.q_pids, p.g_pids, p.q_cams, p.g_cams)
    print(f"full float32 distance matrix would be {num_q * num_g * 4 / GIB:.2f} GiB; gallery features "
          f"{p.gf.nbytes / GIB:.2f} GiB")

    result, seconds, memory = timed(evaluate_features, p.qf, p.gf, *ids)
    print(f"evaluate_features (cosine, plain):   {seconds:7.1f} s   {memory}")
    print(f"  {result.summary()}")

    if name == "market":
        dist, d_seconds, d_memory = timed(compute_distance_matrix, p.qf, p.gf)
        print(f"compute_distance_matrix:             {d_seconds:7.1f} s   {d_memory}")
        precomputed, r_seconds, r_memory = timed(evaluate_rank_detailed, dist, *ids)
        print(f"evaluate_rank on that matrix:        {r_seconds:7.1f} s   {r_memory}")
        assert abs(precomputed.mAP - result.mAP) < 1e-6
        del dist

    n = min(naive_queries, num_q)
    rows = compute_distance_matrix(p.qf[:n], p.gf)
    sub = (p.q_pids[:n], p.g_pids, p.q_cams[:n], p.g_cams)
    fast, fast_seconds, _ = timed(evaluate_rank_detailed, rows, *sub)
    start = time.perf_counter()
    naive_cmc, naive_map = naive_loop(rows, *sub)
    naive_seconds = time.perf_counter() - start
    assert np.abs(naive_cmc - fast.cmc).max() < 1e-9 and abs(naive_map - fast.mAP) < 1e-9
    print(f"ranking only, first {n} queries (results equal): vectorised {fast_seconds:.2f} s, "
          f"per-query loop {naive_seconds:.2f} s -> {naive_seconds / fast_seconds:.1f}x")
    naive_all = naive_seconds / n * num_q
    print(f"per-query loop extrapolated to {num_q:,} queries: {naive_all:.0f} s ranking alone "
          f"(+ distances); evaluate_features does both in {seconds:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", nargs="+", choices=sorted(PROBLEMS), default=["market", "msmt"])
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--naive-queries", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"load average at start (2 shared cores): {os.getloadavg()[0]:.1f}")
    for name in args.problems:
        run(name, args.dim, args.naive_queries, args.seed)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)
    print(f"\nload average at end: {os.getloadavg()[0]:.1f}")
    print(f"process peak RSS (ru_maxrss, everything incl. the random features): {peak:.2f} GiB")


if __name__ == "__main__":
    main()
