"""One script for a lent GPU machine (no network; < 5 minutes on one H100).

Uses whatever ``python`` runs it; prints which packages are missing and skips the
sections that need them. Run from the repository root (no install needed):

    python benchmarks/gpu_check.py [--quick]

The lent machines here have torch, timm, triton, peft, numpy, sklearn and safetensors
but not pydantic (the config layer needs it); carry its wheels (``pip download pydantic
--python-version 3.12 --only-binary=:all: -d build/gpu_wheels``) and run
``pip install --no-index --no-deps --target /tmp/pyd build/gpu_wheels/*.whl`` with
``PYTHONPATH=/tmp/pyd`` first. The whole script took 225 s on an H200 with --quick.

Sections (each prints its own numbers; a failure is printed and the next one runs):
1. environment: python, torch, timm, triton, peft, GPU.
2. kernel parity on CUDA vs SDPA: fp32 / fp16 / bf16, forward and input gradients,
   N = 50, 197, 257 (ragged tiles), D = 64 and 40.
3. the attention benchmark (``bench_attention.run_gpu``).
4. torch.compile of a random ViT-B/14 at 224 (batch 32, bf16 autocast) with sdpa and
   with the Triton kernel: graph breaks, compile time, steady-state eager vs compiled
   inference and training-step medians.
5. a random ViT-B/14 weights file, then frozen (compiled embedding + linear probe) and
   LoRA (``core.training.adapters.fit_adapters``: compile + Triton kernel + bf16, one
   epoch) on random images, if ``roadwork_assets.core.models.adapters`` is importable.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

DEVICE = "cuda"  # a CPU dry run of sections 5 sets this (and a small backbone) by hand
BACKBONE = "vit_base_patch14_dinov2.lvd142m"
TOL = {"fp32": 1e-4, "fp16": 4e-3, "bf16": 3e-2}  # max abs error vs SDPA, unit-variance inputs


def environment() -> list[str]:
    missing = []
    print(f"python {sys.version.split()[0]} at {sys.executable}")
    for name in ("torch", "timm", "triton", "peft", "numpy", "pydantic", "sklearn", "safetensors"):
        try:
            mod = importlib.import_module(name)
            print(f"  {name} {getattr(mod, '__version__', '?')}")
        except Exception as exc:  # report, do not stop
            print(f"  {name} MISSING ({type(exc).__name__}: {exc})")
            missing.append(name)
    import torch

    if torch.cuda.is_available():
        print(f"  GPU: {torch.cuda.get_device_name()}, capability {torch.cuda.get_device_capability()}")
    else:
        print("  no CUDA device visible to torch")
        missing.append("cuda")
    return missing


def kernel_parity() -> None:
    import torch
    import torch.nn.functional as F

    from roadwork_assets.core.models.triton_attention import flash_attention

    worst = {}
    for dtype_name, dtype in (("fp32", torch.float32), ("fp16", torch.float16),
                              ("bf16", torch.bfloat16)):
        for b, h, n, d in ((2, 3, 50, 64), (4, 6, 197, 64), (2, 12, 257, 64), (2, 4, 77, 40)):
            q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=dtype).requires_grad_()
                       for _ in range(3))
            g = torch.randn_like(q)
            out, ref = flash_attention(q, k, v), F.scaled_dot_product_attention(q, k, v)
            grads = torch.autograd.grad(out, (q, k, v), g)
            ref_grads = torch.autograd.grad(ref, (q, k, v), g)
            err_f = float((out - ref).float().abs().max())
            err_g = max(float((a - r).float().abs().max()) for a, r in zip(grads, ref_grads))
            ok = err_f < TOL[dtype_name] and err_g < 4 * TOL[dtype_name]
            worst[dtype_name] = max(worst.get(dtype_name, 0.0), err_f)
            print(f"  {dtype_name} B{b} H{h} N{n} D{d}: fwd {err_f:.2e} grad {err_g:.2e} "
                  f"{'ok' if ok else 'FAIL'}")
    print(f"  worst forward error per dtype: {worst} (tolerances {TOL})")


def _median_s(fn, iters: int) -> float:
    import torch

    times = []
    for _ in range(iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def compile_vit(attn_impl: str, iters: int) -> dict:
    """Eager vs compiled ViT-B/14 (random init): inference and a training step."""
    import torch

    from roadwork_assets.core.models.classifier import build_classifier
    from roadwork_assets.core.training.compile import CompileSettings, compiled, graph_break_report

    torch.manual_seed(0)
    model = build_classifier("vit_base_patch14_dinov2.lvd142m", img_size=224,
                             attn_impl=attn_impl).cuda()
    x = torch.rand(32, 3, 224, 224, device="cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    out = {"attn_impl": attn_impl}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out["breaks"] = graph_break_report(model.eval(), x[:2])
        torch._dynamo.reset()
        for label, fn in (("eager", model), ("compiled", compiled(model, CompileSettings(True)))):
            def infer(fn=fn):
                with torch.no_grad():
                    fn(x)

            def train(fn=fn):
                opt.zero_grad(set_to_none=True)
                fn(x).float().logsumexp(1).mean().backward()
                opt.step()
            model.eval()
            t0 = time.perf_counter()
            infer()
            torch.cuda.synchronize()
            out[f"{label}_first_infer_s"] = time.perf_counter() - t0
            out[f"{label}_infer_ms"] = 1e3 * _median_s(infer, iters)
            model.train()
            t0 = time.perf_counter()
            train()
            torch.cuda.synchronize()
            out[f"{label}_first_train_s"] = time.perf_counter() - t0
            out[f"{label}_train_ms"] = 1e3 * _median_s(train, iters)
    out["infer_speedup"] = out["eager_infer_ms"] / out["compiled_infer_ms"]
    out["train_speedup"] = out["eager_train_ms"] / out["compiled_train_ms"]
    return out


def random_weights_file(folder: Path) -> Path:
    import timm
    from safetensors.torch import save_file

    model = timm.create_model(BACKBONE, pretrained=False, img_size=224,
                              num_classes=0)
    path = folder / "vit_b14_random.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _random_data(n: int, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n, 3, 224, 224), dtype=np.uint8),
            np.arange(n, dtype=np.int64) % 2)


def _cfg(mode: str, weights: Path, **extra):
    from roadwork_assets.core.training.config import TrainerConfig

    fields = TrainerConfig.model_fields
    settings = {"mode": mode, "backbone": BACKBONE,
                "weights_path": str(weights), "img_size": 224, "device": DEVICE,
                "compile": True, "attn_impl": "triton", "n_views": 1, "epochs": 1, **extra}
    if "amp" in fields:
        settings["amp"] = "bf16"
    return TrainerConfig(**{k: v for k, v in settings.items() if k in fields})


def frozen_run(weights: Path, n: int) -> dict:
    import torch

    from roadwork_assets.core.training.pipeline import build_model
    from roadwork_assets.core.training.trainer import embed_views, fit_linear_probe

    cfg = _cfg("frozen", weights, batch_size=32)
    model = build_model(cfg)
    images, labels = _random_data(n, 1)
    times = []
    for _ in range(2):  # first: compile + run; second: steady state
        t0 = time.perf_counter()
        emb = embed_views(model, images, n_views=1, batch_size=32, device=torch.device(DEVICE),
                          compile_settings=cfg)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    half = n // 2
    result = fit_linear_probe(model, cfg, emb[:half], labels[:half], emb[half:], labels[half:])
    return {"images": n, "embed_first_s": times[0], "embed_steady_s": times[1],
            "images_per_s": n / times[1], "probe_select": result.select_metrics}


def lora_run(weights: Path, n: int) -> dict:
    import torch

    from roadwork_assets.core.training.adapters import fit_adapters
    from roadwork_assets.core.training.pipeline import build_model

    cfg = _cfg("lora", weights, batch_size=16, lr=1e-4)
    model = build_model(cfg)
    train_x, train_y = _random_data(n, 2)
    sel_x, sel_y = _random_data(n // 4, 3)
    t0 = time.perf_counter()
    result, record = fit_adapters(model, cfg, train_x, train_y, sel_x, sel_y)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return {"train_images": n, "wall_s": time.perf_counter() - t0, "history": result.history,
            "recipe": getattr(result, "recipe", {}), "adapter": {
                k: record[k] for k in ("n_modules", "trainable_params", "total_params",
                                       "merge_max_abs_logit_gap") if k in record}}


def _section(title: str, fn, *args):
    print(f"\n== {title}", flush=True)
    t0 = time.perf_counter()
    try:
        result = fn(*args)
        if result is not None and not isinstance(result, list):
            print(f"  {result}")
    except Exception:
        traceback.print_exc(limit=6, file=sys.stdout)
        result = None
    print(f"  ({time.perf_counter() - t0:.1f} s)", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer timing iterations")
    args = parser.parse_args()
    iters = 10 if args.quick else 30
    missing = _section("environment", environment) or []
    if {"torch", "triton", "timm", "cuda"} & set(missing):
        print("cannot run the GPU checks: missing " + ", ".join(missing))
        sys.exit(2)
    _section("kernel parity on CUDA vs SDPA", kernel_parity)
    import bench_attention

    rows = _section("attention benchmark", bench_attention.run_gpu, iters)
    print(f"  ({len(rows or [])} rows)")
    for impl in ("sdpa", "triton"):
        _section(f"torch.compile ViT-B/14, attn_impl={impl}", compile_vit, impl, iters)
    try:
        importlib.import_module("roadwork_assets.core.models.adapters")
    except Exception as exc:
        print(f"\nadapters not importable ({exc}): LoRA run skipped")
        return
    with tempfile.TemporaryDirectory() as tmp:
        weights = _section("random ViT-B/14 weights file", random_weights_file, Path(tmp))
        if weights is not None:
            _section("frozen mode (compiled embedding, Triton kernel, probe)", frozen_run,
                     weights, 256)
            _section("lora mode (fit_adapters, compile, Triton kernel, bf16)", lora_run,
                     weights, 128)


if __name__ == "__main__":
    main()
