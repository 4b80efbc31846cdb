"""Throughput of ``mediround.metrics.counts``: 10,000 random 256x256 mask pairs, scored in chunks.

Run: ``python benchmarks/metrics_throughput.py [--masks N] [--size S] [--chunk C]``. Prints masks/s and
the ratio of the vectorised batch path to scoring the same pairs one at a time with ``pair_counts``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from mediround.metrics import counts, pair_counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--masks", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=500)
    parser.add_argument("--pairs-sample", type=int, default=1_000, help="pairs timed with pair_counts")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    pred = rng.random((args.chunk, args.size, args.size)) < 0.3
    gt = rng.random((args.chunk, args.size, args.size)) < 0.3

    start = time.perf_counter()
    scored = 0
    while scored < args.masks:
        n = min(args.chunk, args.masks - scored)
        counts(pred[:n], gt[:n])
        scored += n
    batch_seconds = time.perf_counter() - start
    batch_rate = args.masks / batch_seconds

    sample = min(args.pairs_sample, args.chunk)
    start = time.perf_counter()
    for index in range(sample):
        pair_counts(pred[index], gt[index])
    pair_rate = sample / (time.perf_counter() - start)

    print(f"batch counts(): {args.masks} masks of {args.size}x{args.size} in {batch_seconds:.2f} s "
          f"= {batch_rate:,.0f} masks/s")
    print(f"pair_counts():  {pair_rate:,.0f} masks/s")
    print(f"batch / pair speed ratio: {batch_rate / pair_rate:.2f}x")


if __name__ == "__main__":
    main()
