"""The Triton attention kernel vs F.scaled_dot_product_attention at ViT shapes.

On a CUDA GPU: ViT-S/14 (B=32, H=6, N=257, D=64) and ViT-B/14 (H=12) at 224 px, in
fp16 / bf16 / fp32, forward and forward+backward; median milliseconds over ``--iters``
timed runs (CUDA events, after warm-up) and the ratio triton / sdpa (< 1: the kernel is
faster). The backward of the kernel is a float32 torch recomputation (see
``core.models.triton_attention``), so forward+backward mostly measures that. Each row
also prints the kernel's max abs error against SDPA.

Without a GPU nothing is timed (the line says so); with ``--interpret`` the kernel runs
once at a small shape under Triton's CPU interpreter as a correctness smoke test.

    .venv/bin/python benchmarks/bench_attention.py [--iters 50] [--interpret]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if "--interpret" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch
import torch.nn.functional as F

SHAPES = {"ViT-S/14": (32, 6, 257, 64), "ViT-B/14": (32, 12, 257, 64)}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def median_ms(fn, iters: int, warmup: int = 5, reps: int = 1) -> float:
    """Median over ``iters`` samples of the time per call, each sample ``reps`` calls
    back to back (reps > 1 hides the Python launch cost behind queued GPU work)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return statistics.median(times)


def _step(attn, q, k, v, grad, backward: bool):
    def run():
        out = attn(q, k, v)
        if backward:
            torch.autograd.grad(out, (q, k, v), grad)
    return run


def bench_shape(name: str, shape, dtype_name: str, iters: int) -> list[dict]:
    from roadwork_assets.core.models.triton_attention import flash_attention

    dtype = DTYPES[dtype_name]
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(*shape, device="cuda", dtype=dtype, generator=gen).requires_grad_()
               for _ in range(3))
    grad = torch.randn_like(q)
    with torch.no_grad():
        err = float((flash_attention(q, k, v).float()
                     - F.scaled_dot_product_attention(q, k, v).float()).abs().max())
    rows = []
    for backward in (False, True):
        for reps in (1, 20):
            t_tri = median_ms(_step(flash_attention, q, k, v, grad, backward), iters, reps=reps)
            t_sdpa = median_ms(_step(F.scaled_dot_product_attention, q, k, v, grad, backward),
                               iters, reps=reps)
            rows.append({"shape": name, "dtype": dtype_name, "reps": reps,
                         "pass": "fwd+bwd" if backward else "fwd", "triton_ms": t_tri,
                         "sdpa_ms": t_sdpa, "ratio": t_tri / t_sdpa, "max_abs_err": err})
    return rows


def run_gpu(iters: int) -> list[dict]:
    rows = []
    for name, shape in SHAPES.items():
        for dtype_name in DTYPES:
            rows += bench_shape(name, shape, dtype_name, iters)
    print(f"{'shape':9} {'dtype':5} {'pass':8} {'reps':>4} {'triton ms':>10} {'sdpa ms':>9} "
          f"{'triton/sdpa':>11} {'max|err|':>9}")
    for r in rows:
        print(f"{r['shape']:9} {r['dtype']:5} {r['pass']:8} {r['reps']:4d} {r['triton_ms']:10.3f} "
              f"{r['sdpa_ms']:9.3f} {r['ratio']:11.2f} {r['max_abs_err']:9.2e}")
    print(f"(medians of {iters} samples; reps 1: one call per sample, launch cost included; "
          f"reps 20: per call, back to back; {torch.cuda.get_device_name()}, "
          f"torch {torch.__version__})")
    return rows


def interpreter_smoke() -> None:
    from roadwork_assets.core.models.triton_attention import flash_attention

    q, k, v = (torch.randn(2, 3, 50, 64) for _ in range(3))
    err = float((flash_attention(q, k, v, block_m=16, block_n=16)
                 - F.scaled_dot_product_attention(q, k, v)).abs().max())
    print(f"interpreter smoke test (B=2, H=3, N=50, D=64, fp32): max |triton - sdpa| = {err:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--interpret", action="store_true",
                        help="CPU: run the kernel once under TRITON_INTERPRET=1 (no timing)")
    args = parser.parse_args()
    if torch.cuda.is_available() and not args.interpret:
        run_gpu(args.iters)
        return
    print("no CUDA device: Triton vs SDPA speed NOT measured (the kernel needs a GPU; "
          "Triton's CPU interpreter is for correctness only)")
    if args.interpret:
        interpreter_smoke()


if __name__ == "__main__":
    main()
