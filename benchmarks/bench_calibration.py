"""Time the calibration core on 1M scores: calibrators, CRC/LTT thresholds, metrics.

    .venv/bin/python benchmarks/bench_calibration.py [--n 1000000] [--repeats 3]

Prints the median wall time of each step over the repeats. Everything timed is
vectorised numpy / scipy (sorting-based, O(n log n) at worst); no Python loop
runs over samples.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
from scipy.special import expit

from roadwork_assets.core.calibration.calibrators import CALIBRATORS
from roadwork_assets.core.calibration.metrics import aurc, auroc, brier, decision_confidence, ece, nll
from roadwork_assets.core.calibration.policies import remap_probability
from roadwork_assets.core.calibration.risk_control import (
    crc_fnr_threshold,
    ltt_fnr_threshold,
    ltt_positive_exit_threshold,
)


def _median_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    x = rng.uniform(-3, 3, args.n)
    y = (rng.uniform(size=args.n) < expit(2 * x)).astype(np.int64)
    z = 3.0 * x + 0.5 + rng.normal(0, 1, args.n)
    logits = np.stack([-0.4 * z, 0.6 * z], axis=1)
    p = expit(2 * x)
    pos = p[y == 1]
    t_lo = crc_fnr_threshold(pos, 0.02).t_lo
    dec = (p > t_lo).astype(np.int8)

    steps: list[tuple[str, Callable[[], object]]] = [
        *[(f"fit {m}", (lambda m=m: CALIBRATORS[m]().fit(logits, y))) for m in CALIBRATORS],
        *[(f"predict {m}", (lambda c=CALIBRATORS[m]().fit(logits[:10_000], y[:10_000]): c.predict_proba(logits)))
          for m in CALIBRATORS],
        ("crc_fnr_threshold (a=0.02)", lambda: crc_fnr_threshold(pos, 0.02)),
        ("ltt_fnr_threshold fixed_sequence", lambda: ltt_fnr_threshold(pos, 0.02, 0.1)),
        ("ltt_fnr_threshold bonferroni", lambda: ltt_fnr_threshold(pos, 0.02, 0.1, fwer="bonferroni")),
        ("ltt_positive_exit_threshold", lambda: ltt_positive_exit_threshold(
            p, y, t_lo=t_lo, fdr_target=0.05, delta=0.1, reference_scores=p[:100_000], reference_labels=y[:100_000])),
        ("ece (15 bins)", lambda: ece(p, y, 15)),
        ("auroc (sklearn)", lambda: auroc(p, y)),
        ("aurc", lambda: aurc(decision_confidence(p, dec), (dec != y).astype(float))),
        ("brier + nll", lambda: (brier(p, y), nll(p, y))),
        ("remap_probability", lambda: remap_probability(p, t_lo, t_lo, p <= t_lo, p > t_lo)),
    ]
    print(f"n = {args.n:,} scores ({int(y.sum()):,} positives), median of {args.repeats} repeats")
    print(f"{'step':<40}{'median s':>10}")
    print("-" * 50)
    for name, fn in steps:
        print(f"{name:<40}{_median_time(fn, args.repeats):>10.3f}")


if __name__ == "__main__":
    main()
