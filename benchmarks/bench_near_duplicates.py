"""Near-duplicate search scales ~linearly: time 10k vs 100k random pHashes.

Random 64-bit hashes stand in for pHashes; some pairs are planted at 0..max_distance
bits apart in different splits, and every one must be found. Prints the median of 3
runs per size and the 100k / 10k ratio (quadratic would be ~100x, linear ~10x).

    .venv/bin/python benchmarks/bench_near_duplicates.py
"""

from __future__ import annotations

import statistics
import sys
import time

import numpy as np
import pandas as pd

from roadwork_assets.core.data.dedup import DEFAULT_MAX_DISTANCE, _chunk_plan, find_near_duplicates

SPLITS = np.array(["train", "val_select", "val_calib", "val_test"], dtype=object)


def make_table(n: int, n_planted: int, max_distance: int, seed: int) -> tuple[pd.DataFrame, set]:
    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, 2**64, size=n, dtype=np.uint64, endpoint=False)
    splits = SPLITS[rng.integers(0, len(SPLITS), size=n)]
    sources = rng.choice(n // 2, size=n_planted, replace=False)
    targets = n // 2 + sources  # disjoint from sources
    planted = set()
    for source, target in zip(sources, targets):
        bits = rng.choice(64, size=rng.integers(0, max_distance + 1), replace=False)
        flip = np.uint64(sum(1 << int(b) for b in bits))
        hashes[target] = hashes[source] ^ flip
        splits[target] = SPLITS[(list(SPLITS).index(splits[source]) + 1) % len(SPLITS)]
        planted.add((f"img{source:07d}", f"img{target:07d}"))
    table = pd.DataFrame({
        "item_id": [f"img{i:07d}" for i in range(n)],
        "split": splits,
        "phash": [f"{int(h):016x}" for h in hashes],
        "pixel_sha256": [f"sha{i}" for i in range(n)],  # all pixels distinct
    })
    return table, planted


def bench(n: int, max_distance: int, repeats: int = 3) -> float:
    table, planted = make_table(n, n_planted=200, max_distance=max_distance, seed=n)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        pairs = find_near_duplicates(table, max_distance)
        times.append(time.perf_counter() - start)
    found = set(zip(pairs["item_id_a"], pairs["item_id_b"]))
    missing = planted - found
    chunks, radius = _chunk_plan(n, max_distance)
    print(f"n={n:>7,}  median {statistics.median(times):.3f} s  (runs: "
          f"{', '.join(f'{t:.3f}' for t in times)})  plan: {len(chunks)} chunks, radius "
          f"{radius}  planted found {len(planted) - len(missing)}/{len(planted)}, "
          f"other pairs reported {len(found - planted)}")
    if missing:
        sys.exit(f"FAILED: {len(missing)} planted pairs not found, e.g. {sorted(missing)[:3]}")
    return statistics.median(times)


def main() -> None:
    for max_distance in (DEFAULT_MAX_DISTANCE, 8, 10):
        print(f"max_distance={max_distance}")
        small, large = bench(10_000, max_distance), bench(100_000, max_distance)
        print(f"  ratio 100k / 10k = {large / small:.1f}x  (linear 10x, n log n ~12.5x, quadratic 100x)")


if __name__ == "__main__":
    main()
