"""Near-duplicate search scales ~linearly: time 10k vs 100k random pHashes; and what the
thumbnail confirmation of pHash candidates costs on look-alike (low-texture) data.

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

from roadwork_assets.core.data.dedup import (
    DEFAULT_MAX_DISTANCE,
    _chunk_plan,
    find_near_duplicates,
    near_duplicate_pairs,
    phash_array,
)

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
    plan = _chunk_plan(n, max_distance)
    print(f"  n={n:>7,}  median {statistics.median(times):.3f} s  (runs: "
          f"{', '.join(f'{t:.3f}' for t in times)})  plan: widths {[w for _, w, _ in plan]} "
          f"radii {[r for _, _, r in plan]}  planted found {len(planted) - len(missing)}/"
          f"{len(planted)}, other pairs reported {len(found - planted)}")
    if missing:
        sys.exit(f"FAILED: {len(missing)} planted pairs not found, e.g. {sorted(missing)[:3]}")
    return statistics.median(times)


def bench_textbook(n: int, max_distance: int) -> float:
    """The plain split into d + 1 exact-match chunks, for comparison (one run)."""
    table, _ = make_table(n, n_planted=200, max_distance=max_distance, seed=n)
    m = max_distance + 1
    widths = [64 // m + (1 if k < 64 % m else 0) for k in range(m)]
    plan = [(sum(widths[:k]), w, 0) for k, w in enumerate(widths)]
    start = time.perf_counter()
    near_duplicate_pairs(phash_array(table["phash"]), max_distance, plan=plan)
    return time.perf_counter() - start


def bench_confirmation(n: int) -> None:
    """Split the awkward test data (a fifth low-texture look-alikes): pHash candidates,
    their thumbnail confirmation, and the split itself. Median of 3."""
    from roadwork_assets.core.data.images import perceptual_hash, pixel_sha256
    from roadwork_assets.core.data.similarity import NearDuplicateRule, thumbnail
    from roadwork_assets.core.data.splits import split_images
    from roadwork_assets_tests.awkward_data import generate_awkward

    items = generate_awkward(n, seed=3, image_size=96, n_copies=n // 20)
    rgb = [it.image.convert("RGB") if it.image.mode != "RGB" else it.image for it in items]
    frame = pd.DataFrame({
        "item_id": [it.item_id for it in items], "label": [it.label for it in items],
        "pixel_sha256": [pixel_sha256(im) for im in rgb],
        "phash": [f"{perceptual_hash(im):016x}" for im in rgb],
        "thumb": [thumbnail(im) for im in rgb],
    })
    rule = NearDuplicateRule()
    i, _, _ = near_duplicate_pairs(phash_array(frame["phash"]), rule.max_distance)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        result = split_images(frame, rule=rule)
        times.append(time.perf_counter() - start)
    t = statistics.median(times)
    biggest = result.assignment.groupby("group_key").size().max()
    print(f"  awkward n={len(frame):>6,}: {len(i):,} pHash candidates, split (with confirmation) "
          f"median {t:.2f} s = {len(i) / t:,.0f} candidate pairs/s; largest group {biggest}")


def main() -> None:
    distances = [int(a) for a in sys.argv[1:]] or [DEFAULT_MAX_DISTANCE, 8]
    for max_distance in distances:
        print(f"max_distance={max_distance}")
        small, large = bench(10_000, max_distance), bench(100_000, max_distance)
        print(f"  ratio 100k / 10k = {large / small:.1f}x  (linear 10x, n log n ~12.5x, quadratic 100x)")
    d = distances[0]
    small, large = bench_textbook(10_000, d), bench_textbook(100_000, d)
    print(f"textbook d+1 exact-match chunks, max_distance={d}: 10k {small:.3f} s, "
          f"100k {large:.3f} s, ratio {large / small:.1f}x")
    print("thumbnail confirmation (core.data.similarity) on look-alike data:")
    bench_confirmation(1000)
    bench_confirmation(2000)


if __name__ == "__main__":
    main()
