"""Per-image latency of each cascade stage, measured where the policy is fitted.

Stage 1 serves one view (the policy's main view) of one image; stage 2 runs every view
of one image through the same network and pools them (``MultiviewModel``). Both are
measured as the serving path runs them: batch 1, eager torch, ``inference_mode``, the
median of ``repeats`` timed calls after ``warmup`` untimed ones. A median of batch-1
calls is what one validator query costs; it is machine-specific, so the policy records
where it came from (``latency_source``) and a user can configure both numbers instead.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def median_seconds(fn: Callable[[], object], *, repeats: int = 15, warmup: int = 3) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls, after ``warmup`` calls."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(statistics.median(times))


def stage_latencies(stage1: torch.nn.Module, stage2: torch.nn.Module, img_size: int, *,
                    repeats: int = 15, device: str = "cpu") -> tuple[float, float]:
    """(stage-1, stage-2) seconds per image: one random image, batch 1, median."""
    dev = torch.device(device)
    x = torch.rand(1, 3, img_size, img_size, generator=torch.Generator().manual_seed(0)).to(dev)
    out = []
    for model in (stage1, stage2):
        model.eval().to(dev)

        def call(model=model):
            with torch.inference_mode():
                model(x)
            if dev.type == "cuda":
                torch.cuda.synchronize()

        out.append(median_seconds(call, repeats=repeats))
    return out[0], out[1]
