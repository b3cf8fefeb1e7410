"""Cost of the pre-training image scan (``data.verify_images``) on real Market-1501 images.

Decodes the first ``--images`` training images of Market-1501 as training reads them,
once with one thread and once with ``--threads`` (the scan's default is up to 8),
and prints images/s, the speed-up, and the extrapolated time for the whole of
Market-1501 (36,036 images: train, query, gallery) and for MSMT17 (126,441 images,
assuming the same per-image cost; its crops are larger, so take it as a lower bound).
The page cache is warmed first, so this is decoding, not disk.

Usage: python bench/bench_preflight.py [--root ../shared/data/Market-1501] [--images 3000] [--threads 8]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from marreid.data import Sample
from marreid.data.loaders import find_bad_images

MARKET_IMAGES = 36_036
MSMT_IMAGES = 126_441


def timed_scan(samples: list[Sample], workers: int) -> float:
    start = time.perf_counter()
    bad = find_bad_images(samples, workers)
    elapsed = time.perf_counter() - start
    assert not bad, bad[:3]
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(Path(__file__).resolve().parents[2] / "shared/data/Market-1501"))
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args()
    folder = Path(args.root) / "bounding_box_train"
    if not folder.is_dir():
        print(f"skipped: no Market-1501 at {args.root}")
        return
    samples = [Sample(str(p), 0, 0) for p in sorted(folder.glob("*.jpg"))[: args.images]]
    for s in samples:
        Path(s.path).read_bytes()
    one = timed_scan(samples, 1)
    many = timed_scan(samples, args.threads)
    n = len(samples)
    print(f"{n} images of {folder}")
    print(f"1 thread     {n / one:8.0f} images/s")
    print(f"{args.threads} threads    {n / many:8.0f} images/s   speed-up x{one / many:.2f}")
    per_image = many / n
    print(f"extrapolated scan with {args.threads} threads: Market-1501 {MARKET_IMAGES * per_image:.1f} s, "
          f"MSMT17 >= {MSMT_IMAGES * per_image:.1f} s")


if __name__ == "__main__":
    main()
