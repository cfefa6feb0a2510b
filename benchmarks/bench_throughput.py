"""Throughput of the model path against the machine's limit (issue 12, point 4).

In one run, every figure a median of ``--repeats`` timed calls after a warm-up:

1. matmul peak, fp32 (n x n, 2n^3 FLOP); bf16 only where ``recipe.measure_cpu_bf16``
   (the trainer's own probe) says bf16 is faster here, else reported as skipped;
2. ViT-S/14 at 224, random weights, embedding a batch: eager (no_grad), inference_mode,
   channels-last, torch.compile, ONNX Runtime at the served level (BASIC) and at ALL,
   bf16 autocast (where faster) -- img/s, GFLOP/s (FLOPs counted by
   torch.utils.flop_counter on one image) and % of the peak of the precision used;
3. `roadwork predict` on a default-architecture cascade bundle (``--bundle`` /
   ``ROADWORK_HOME``'s latest, else a tiny real one built as the tests build it):
   BundlePredictor torch and onnx engines on 224 px JPEG files (decode included), img/s
   and batch-1 latency, plus the CLI's wall time as a process (bundle load included);
4. a one-image-at-a-time loop like the reference miner's (decode one JPEG, preprocess,
   one forward) on the ViT, against the batched figure;
5. bf16 autocast score parity on the bundle: served probabilities fp32 vs bf16;
6. the graph's embedding step (``compute_embeddings``, frozen mode: decode + every view
   through the backbone) on the same ``--embed-images`` JPEG files with
   ``trainer.embed_engine`` torch, onnx and auto: the step's img/s (wall, ONNX export,
   parity probe and auto's timing included; each engine exports afresh), the engine's
   own img/s (its embed calls only) and both against torch, plus what auto chose and why.

    .venv/bin/python benchmarks/bench_throughput.py [--batch 16] [--repeats 3]
        [--skip-compile] [--bundle DIR] [--embed-images 64] [--json out.json]

Default runtime: a few minutes on 2 cores (torch.compile and the ONNX export dominate).
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from PIL import Image

from roadwork_assets.core.models.latency import median_seconds as _median_seconds

VIT = "vit_small_patch14_dinov2.lvd142m"


def median_seconds(fn, repeats: int, warmup: int = 1) -> float:
    """The project's median timer (``core.models.latency``), one warm-up call by default."""
    return _median_seconds(fn, repeats=repeats, warmup=warmup)




def matmul_peak(dtype: torch.dtype, n: int, repeats: int) -> float:
    """GFLOP/s of an n x n matmul in ``dtype`` (median)."""
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=gen).to(dtype) for _ in range(2))
    return 2 * n**3 / median_seconds(lambda: a @ b, repeats) / 1e9


def peaks(n: int, repeats: int) -> dict:
    from roadwork_assets.core.training.recipe import measure_cpu_bf16

    out = {"fp32_gflops": matmul_peak(torch.float32, n, repeats)}
    decision = measure_cpu_bf16()
    out["bf16_reason"] = decision.reason
    out["bf16_gflops"] = (matmul_peak(torch.bfloat16, n, repeats)
                          if decision.dtype == "bfloat16" else None)
    return out


def vit_model():
    from roadwork_assets.core.models.classifier import build_classifier

    torch.manual_seed(0)
    return build_classifier(VIT, img_size=224).eval()


def gflop_per_image(model) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model.features(torch.rand(1, 3, 224, 224))
    return counter.get_total_flops() / 1e9


def _onnx_fn(model, x: torch.Tensor, opt_level: str, workdir: Path):
    from roadwork_assets.core.export.onnx_export import export_onnx, ort_session

    path = workdir / "vit.onnx"
    if not path.exists():
        export_onnx(model, 224, path)
    session = ort_session(path, opt_level=opt_level)
    feed = {"images": x.numpy()}
    return lambda: session.run(["logits"], feed)


def vit_variants(model, batch: int, repeats: int, *, bf16: bool, compile_: bool,
                 workdir: Path) -> dict[str, float]:
    """Seconds per batch of ``batch`` images, by variant."""
    x = torch.rand(batch, 3, 224, 224)
    out = {}
    with torch.no_grad():
        out["eager (no_grad)"] = median_seconds(lambda: model(x), repeats)
    with torch.inference_mode():
        out["inference_mode"] = median_seconds(lambda: model(x), repeats)
        cl_model = model.to(memory_format=torch.channels_last)
        xc = x.contiguous(memory_format=torch.channels_last)
        out["channels_last + inference_mode"] = median_seconds(lambda: cl_model(xc), repeats)
        model.to(memory_format=torch.contiguous_format)
        if bf16:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out["bf16 autocast + inference_mode"] = median_seconds(lambda: model(x), repeats)
            m16, x16 = copy.deepcopy(model).to(torch.bfloat16), x.to(torch.bfloat16)
            out["bf16 weights + inference_mode"] = median_seconds(lambda: m16(x16), repeats)
    if compile_:
        compiled = torch.compile(model)
        with torch.no_grad():
            t0 = time.perf_counter()
            compiled(x)
            print(f"  torch.compile first call (compile): {time.perf_counter() - t0:.0f} s",
                  flush=True)
            out["torch.compile"] = median_seconds(lambda: compiled(x), repeats, warmup=0)
    for level in ("ORT_ENABLE_BASIC", "ORT_ENABLE_ALL"):
        name = "onnxruntime BASIC (served)" if level.endswith("BASIC") else "onnxruntime ALL"
        out[name] = median_seconds(_onnx_fn(model, x, level, workdir), repeats)
    return out


def jpeg_bytes(n: int, size: int = 224, seed: int = 0) -> list[bytes]:
    """Random smooth-ish 224 px JPEGs at PIL's default quality, as the validator sends."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
        noisy = np.clip(np.asarray(img, dtype=np.int16) + rng.integers(-20, 21, (size, size, 3)),
                        0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(noisy).save(buf, format="JPEG")
        out.append(buf.getvalue())
    return out


def miner_loop(model, jpegs: list[bytes]) -> float:
    """Seconds per image, one at a time: decode, preprocess, one forward (batch 1)."""
    from roadwork_assets.core.data.images import decode_image
    from roadwork_assets.core.data.transforms import to_float, to_model_array

    def one(data: bytes) -> float:
        arr = to_model_array(decode_image(data, "x"), 224)
        x = to_float(torch.from_numpy(arr)[None])
        return float(torch.softmax(model(x), 1)[0, 1])

    with torch.inference_mode():
        one(jpegs[0])
        t0 = time.perf_counter()
        for data in jpegs:
            one(data)
    return (time.perf_counter() - t0) / len(jpegs)


def build_default_bundle(workdir: Path, img_size: int) -> Path:
    """A real cascade bundle of the default architecture (random weights), built as the
    export tests build theirs (``roadwork_assets_tests/core/export/conftest.py``)."""
    from roadwork_assets.core.artifacts import ArtifactRegistry
    from roadwork_assets.core.export.bundle import build_bundle
    from roadwork_assets_tests.core.export import conftest

    conftest.IMG = img_size  # the fixtures' image size, read at call time
    reg = ArtifactRegistry(workdir / "home")
    conftest.save_tiny_checkpoint(reg.checkpoint)
    policy_path, stage2_path = conftest.fit_cascade_artifacts(reg, n=160)
    directory, _m, extra = build_bundle(
        reg.bundles_dir, checkpoint_path=reg.checkpoint, policy_path=policy_path,
        policy_asset="cascade_policy", export_onnx_model=True, stage2_path=stage2_path)
    assert extra["onnx_parity"].passed, extra["onnx_parity"].summary()
    return directory


def find_bundle(args: argparse.Namespace, workdir: Path) -> Path:
    if args.bundle:
        return Path(args.bundle)
    if os.environ.get("ROADWORK_HOME"):
        from roadwork_assets.core.artifacts import ArtifactRegistry

        return ArtifactRegistry(Path(os.environ["ROADWORK_HOME"])).latest_bundle()
    return build_default_bundle(workdir, args.bundle_img_size)


def predict_figures(bundle_dir: Path, n_images: int, repeats: int, workdir: Path) -> dict:
    """BundlePredictor img/s and batch-1 latency by engine, and the CLI as a process."""
    from roadwork_assets.core.export.predictor import BundlePredictor

    files = []
    for i, data in enumerate(jpeg_bytes(n_images, seed=1)):
        files.append(workdir / f"img{i}.jpg")
        files[-1].write_bytes(data)
    out = {}
    for engine in ("torch", "onnx"):
        p = BundlePredictor.from_dir(bundle_dir, engine=engine)
        batch_s = median_seconds(lambda p=p: p.predict_paths(files), repeats)
        one_s = median_seconds(lambda p=p: p.predict_paths(files[:1]), max(repeats, 5))
        out[engine] = {"img_per_s": n_images / batch_s, "batch1_ms": one_s * 1e3,
                       "stage2_share": p.stage2_rows / max(1, n_images * (repeats + 1))}
    auto = BundlePredictor.from_dir(bundle_dir, engine="auto")
    out["auto_choice"] = auto.engine_reason
    cli = [sys.executable, "-m", "roadwork_assets.cli", "predict", "--bundle", str(bundle_dir)]
    t0 = time.perf_counter()
    subprocess.run([*cli, *map(str, files)], check=True, capture_output=True)
    out["cli_wall_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    subprocess.run([*cli, str(files[0])], check=True, capture_output=True)
    out["cli_one_image_wall_s"] = time.perf_counter() - t0
    return out


def vit_bf16_parity(model, n_images: int = 8) -> dict:
    """ViT features under bf16 autocast against fp32: relative L2 error, worst cosine, of
    the input-dependent part (features minus their batch mean): a random-init ViT's
    features are mostly its cls token and position embedding, which no matmul touches."""
    x = torch.rand(n_images, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        f32 = model.features(x).double()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            f16 = model.features(x).double()
    f32, f16 = f32 - f32.mean(0), f16 - f32.mean(0)
    rel = ((f16 - f32).norm(dim=1) / f32.norm(dim=1)).max()
    cos = torch.nn.functional.cosine_similarity(f16, f32, dim=1).min()
    return {"max_rel_l2": float(rel), "min_cosine": float(cos)}


def bf16_parity(bundle_dir: Path, n_images: int) -> dict:
    """Served probabilities of the bundle under bf16 autocast against fp32."""
    from roadwork_assets.core.export.predictor import BundlePredictor

    p = BundlePredictor.from_dir(bundle_dir, engine="torch")
    size = p.bundle.manifest.img_size
    images = np.random.default_rng(2).integers(0, 256, (n_images, 3, size, size), dtype=np.uint8)
    prob32, dec32, _ = p.predict_arrays(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        prob16, dec16, _ = p.predict_arrays(images)
    return {"max_abs_dp": float(np.abs(prob16 - prob32).max()),
            "decision_flips": int((dec16 != dec32).sum()), "n": n_images}


def embedding_step(model, n_images: int, batch: int, workdir: Path) -> dict[str, dict]:
    """``compute_embeddings`` as the embeddings asset runs it, once per ``embed_engine``,
    on the same JPEG files: wall and engine img/s, and the engine's summary."""
    import pandas as pd
    from safetensors.torch import save_file

    from roadwork_assets.core.training import embed_engine
    from roadwork_assets.core.training.config import TrainerConfig
    from roadwork_assets.core.training.pipeline import compute_embeddings

    weights = workdir / "vit_embed.safetensors"
    save_file({k: v.contiguous() for k, v in model.backbone.state_dict().items()}, str(weights))
    rows = []
    for i, data in enumerate(jpeg_bytes(n_images, seed=5)):
        path = workdir / f"embed{i}.jpg"
        path.write_bytes(data)
        rows.append({"item_id": f"e{i}", "uri": str(path), "label": i % 2})
    manifest = pd.DataFrame(rows)
    out = {}
    for engine in ("torch", "onnx", "auto"):
        embed_engine.forget_exports()  # each engine exports and times afresh, as a first split
        cfg = TrainerConfig(mode="frozen", backbone=VIT, weights_path=str(weights), img_size=224,
                            batch_size=batch, threads=torch.get_num_threads(),
                            embed_engine=engine)
        t0 = time.perf_counter()
        summary = compute_embeddings(manifest, cfg, workdir / f"emb_{engine}.npz", "bench",
                                     "bench", "bench")
        wall = time.perf_counter() - t0
        out[engine] = {"wall_img_per_s": n_images / wall, "wall_s": wall,
                       **summary["embed_engine"]}
    return out


def embedding_table(figures: dict[str, dict], n_images: int, n_views: int) -> list[str]:
    base = figures["torch"]
    lines = [f"embedding step, {n_images} JPEGs x {n_views} views (decode included):",
             f"{'embed_engine':12s} {'ran':5s} {'step img/s':>10s} {'x torch':>8s} "
             f"{'engine img/s':>12s} {'x torch':>8s}"]
    for name, f in figures.items():
        lines.append(f"{name:12s} {f['embed_engine']:5s} {f['wall_img_per_s']:10.2f} "
                     f"{f['wall_img_per_s'] / base['wall_img_per_s']:8.2f} "
                     f"{f['embed_img_per_s']:12.2f} "
                     f"{f['embed_img_per_s'] / base['embed_img_per_s']:8.2f}")
    lines.append(f"auto chose: {figures['auto']['embed_engine_reason']}")
    return lines


def vit_table(seconds: dict[str, float], batch: int, gflop: float, pk: dict) -> list[str]:
    base = seconds["eager (no_grad)"]
    lines = [f"{'variant':34s} {'img/s':>7s} {'GFLOP/s':>8s} {'% peak':>7s} {'x eager':>8s}"]
    for name, s in seconds.items():
        peak = pk["bf16_gflops"] if name.startswith("bf16") else pk["fp32_gflops"]
        rate = batch * gflop / s
        lines.append(f"{name:34s} {batch / s:7.2f} {rate:8.1f} {100 * rate / peak:6.0f}% "
                     f"{base / s:8.2f}")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=16, help="ViT batch size (default 16)")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per figure (median)")
    ap.add_argument("--matmul-n", type=int, default=1024)
    ap.add_argument("--skip-compile", action="store_true", help="skip torch.compile (~1 min)")
    ap.add_argument("--bundle", help="bundle to time (default: ROADWORK_HOME's latest, else a "
                    "tiny default-architecture bundle built here)")
    ap.add_argument("--bundle-img-size", type=int, default=128,
                    help="img_size of the built bundle (TrainerConfig's default 128)")
    ap.add_argument("--predict-images", type=int, default=64)
    ap.add_argument("--miner-images", type=int, default=16)
    ap.add_argument("--embed-images", type=int, default=64,
                    help="JPEGs the embedding step embeds per engine (0 skips it)")
    ap.add_argument("--json", help="also write every figure here")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    result: dict = {"load_before": os.getloadavg()[0], "threads": torch.get_num_threads()}
    pk = result["peaks"] = peaks(args.matmul_n, max(args.repeats, 5))
    bf16 = pk["bf16_gflops"] is not None
    print(f"matmul peak fp32 {pk['fp32_gflops']:.1f} GFLOP/s; bf16: "
          + (f"{pk['bf16_gflops']:.1f} GFLOP/s ({pk['bf16_gflops'] / pk['fp32_gflops']:.2f}x fp32)"
             if bf16 else f"skipped ({pk['bf16_reason']})"), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model = vit_model()
        gflop = result["vit_gflop_per_image"] = gflop_per_image(model)
        print(f"ViT-S/14 224: {gflop:.2f} GFLOP per image (flop_counter); batch {args.batch}",
              flush=True)
        secs = vit_variants(model, args.batch, args.repeats, bf16=bf16,
                            compile_=not args.skip_compile, workdir=workdir)
        result["vit_seconds_per_batch"] = secs
        print("\n".join(vit_table(secs, args.batch, gflop, pk)), flush=True)
        miner = miner_loop(model, jpeg_bytes(args.miner_images))
        best = min(secs.values()) / args.batch
        result["miner_loop_img_per_s"] = 1 / miner
        print(f"one-image-at-a-time loop (decode + preprocess + batch-1 forward, eager): "
              f"{1 / miner:.2f} img/s, {miner * 1e3:.0f} ms/img; batched best is "
              f"{miner / best:.2f}x faster", flush=True)
        bundle_dir = find_bundle(args, workdir)
        pred = result["predict"] = predict_figures(bundle_dir, args.predict_images,
                                                   args.repeats, workdir)
        for engine in ("torch", "onnx"):
            f = pred[engine]
            print(f"predict ({engine:5s}): {f['img_per_s']:7.1f} img/s ({args.predict_images} "
                  f"JPEGs, decode included), batch-1 latency {f['batch1_ms']:.1f} ms", flush=True)
        print(f"predict onnx/torch throughput {pred['onnx']['img_per_s'] / pred['torch']['img_per_s']:.2f}x,"
              f" latency torch/onnx {pred['torch']['batch1_ms'] / pred['onnx']['batch1_ms']:.2f}x;"
              f" {pred['auto_choice']}")
        print(f"`roadwork predict` as a process: {pred['cli_wall_s']:.1f} s for "
              f"{args.predict_images} images, {pred['cli_one_image_wall_s']:.1f} s for one "
              "(bundle load and checks included)", flush=True)
        if bf16:
            vp = result["vit_bf16_parity"] = vit_bf16_parity(model)
            print(f"bf16 autocast vs fp32, ViT features: max relative L2 error "
                  f"{vp['max_rel_l2']:.2e}, min cosine {vp['min_cosine']:.5f}")
            par = result["bf16_parity"] = bf16_parity(bundle_dir, 64)
            print(f"bf16 autocast vs fp32 on the bundle: max |dp| {par['max_abs_dp']:.2e}, "
                  f"{par['decision_flips']} decision flips of {par['n']}")
        else:
            print("bf16 autocast parity: skipped (bf16 is not faster on this CPU)")
        if args.embed_images:
            emb = result["embedding_step"] = embedding_step(model, args.embed_images,
                                                            args.batch, workdir)
            print("\n".join(embedding_table(emb, args.embed_images, 2)), flush=True)
    again = matmul_peak(torch.float32, args.matmul_n, max(args.repeats, 5))
    print(f"matmul peak fp32 again at the end: {again:.1f} GFLOP/s (the table used the first)")
    pk["fp32_gflops_end"] = again
    result["load_after"] = os.getloadavg()[0]
    print(f"load average after: {result['load_after']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
