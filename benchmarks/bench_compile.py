"""torch.compile: compile time against steady-state speed-up, and the graph breaks.

Models: the default ``test_resnet`` classifier at 128 px and a ViT-S/14-shaped random
model (``vit_small_patch14_dinov2``, 224 px, 257 tokens); batch 8, float32, on the
device torch picks (CPU here). For each: graph breaks (``torch._dynamo.explain``), then
eager vs compiled (``core.training.compile.compiled``, mode default) for inference and
for a training step (forward, backward, AdamW step): the first call's seconds (compile
included) and the median of ``--iters`` later calls; ratios eager / compiled (> 1:
compiled is faster) and the number of steady-state calls that pay the compile back.

    .venv/bin/python benchmarks/bench_compile.py [--iters 5] [--models resnet,vit]

Measured: on the 2-core CPU machine (shared, load average ~9 while it ran) the compiled
test_resnet was ~5x *slower* than eager (inference 714 vs 130 ms, training step 2429 vs
478 ms; compile 30 s / 58 s), while the ViT-S/14 gained 1.05x inference (3682 vs 3873 ms)
and 1.07x training (8707 vs 9286 ms) for 28 s / 70 s of compile (paid back after ~100
calls). Do not read the resnet result as inductor's CPU speed; rerun on an idle machine. On an H200 (``gpu_check.py``, ViT-B/14, batch 32, bf16 autocast) compile took
11 s (inference) and 18-23 s (training step) for a 1.16-1.45x inference and 1.10-1.87x
training-step speed-up over eager SDPA (two runs, two machines).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from roadwork_assets.core.models.classifier import build_classifier
from roadwork_assets.core.training.compile import (
    CompileSettings,
    compiled,
    graph_break_report,
)

MODELS = {"resnet": ("test_resnet.r160_in1k", 128), "vit": ("vit_small_patch14_dinov2.lvd142m", 224)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device: torch.device, iters: int) -> tuple[float, float]:
    """(first call seconds, median seconds of the next ``iters`` calls)."""
    t0 = time.perf_counter()
    fn()
    _sync(device)
    first = time.perf_counter() - t0
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def bench_model(key: str, iters: int, device: torch.device) -> dict:
    name, size = MODELS[key]
    torch.manual_seed(0)
    model = build_classifier(name, img_size=size).to(device)
    x = torch.rand(8, 3, size, size, device=device)
    y = torch.arange(8, device=device) % 2
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    row = {"model": f"{key} ({name}, {size} px)", "breaks": graph_break_report(model.eval(), x)}
    torch._dynamo.reset()
    for label, fn in (("eager", model), ("compiled", compiled(model, CompileSettings(True)))):
        def infer(fn=fn):
            with torch.no_grad():
                fn(x)

        def train(fn=fn):
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(fn(x), y).backward()
            opt.step()
        model.eval()
        row[f"{label}_infer"] = _time(infer, device, iters)
        model.train()
        row[f"{label}_train"] = _time(train, device, iters)
    return row


def report(row: dict) -> None:
    b = row["breaks"]
    print(f"\n{row['model']}: {b['graphs']} graph(s), {b['graph_breaks']} graph break(s)"
          + "".join(f"\n  break: {r}" for r in b["reasons"]))
    for kind in ("infer", "train"):
        (e_first, e_med), (c_first, c_med) = row[f"eager_{kind}"], row[f"compiled_{kind}"]
        gain = e_med - c_med
        payback = f"{(c_first - e_first) / gain:.0f} calls" if gain > 0 else "never"
        print(f"  {kind:5}: eager median {1e3 * e_med:8.1f} ms | compiled median "
              f"{1e3 * c_med:8.1f} ms | speed-up x{e_med / c_med:.2f} | first call eager "
              f"{e_first:.2f} s, compiled {c_first:.1f} s | compile paid back after {payback}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--models", default="resnet,vit")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads, "
          f"batch 8, float32, medians of {args.iters}")
    for key in args.models.split(","):
        report(bench_model(key, args.iters, device))


if __name__ == "__main__":
    main()
