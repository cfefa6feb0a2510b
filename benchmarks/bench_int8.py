"""fp32 vs INT8 (ONNX Runtime dynamic quantization) bundle (issue 12, point 5).

On a materialized ROADWORK_HOME (``roadwork run``): the fp32 bundle (``bundles/LATEST``)
and the INT8 one (``bundles_int8/LATEST``, the `bundle_int8` asset; built here with the
fp32 policy's own alpha, latencies and budget when absent, into a temporary folder).
Reports, each policy on its own model's scores (fp32: logits / multiview_logits; INT8:
ORT on the decoded images, one image per call, as served):

- accuracy, MCC, FNR, FPR and stage-2 share on val_calib (what both policies were fitted
  on: in-sample) and on val_test (held out; a benchmark may read it, the asset never does);
- ONNX file sizes;
- ORT batch-1 latency of each network (median of ``--repeats``);
- stage-1 throughput (img/s, median of 5): fp32 at batch 1 and ``--batch``, INT8 at batch
  1 (served so: its scores depend on the batch), and the int8/fp32 ratios.

    .venv/bin/python benchmarks/bench_int8.py --home ROADWORK_HOME [--repeats 15]
        [--batch 32] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pandas as pd

from roadwork_assets.core.artifacts import ArtifactRegistry, read_npz
from roadwork_assets.core.calibration.cascade import CascadeConfig
from roadwork_assets.core.calibration.policy_config import PolicyFitConfig
from roadwork_assets.core.export.bundle import load_bundle
from roadwork_assets.core.export.cascade_serving import is_cascade
from roadwork_assets.core.export.engines import OnnxEngine
from roadwork_assets.core.export.int8_bundle import Int8Fit, build_int8_bundle
from roadwork_assets.core.export.quantize import (
    CalibScores,
    decoder,
    ort_latency,
    score_images,
    served_metrics,
)


def split_inputs(reg: ArtifactRegistry, split: str):
    """(manifest rows in logits order, logits npz, multiview_logits npz or None)."""
    z = read_npz(reg.logits(split))
    manifest = pd.read_parquet(reg.split_manifest(split)).set_index("item_id", drop=False)
    manifest = manifest.loc[z["item_ids"].astype(str)]
    mv = reg.multiview_logits(split)
    return manifest, z, (read_npz(mv) if mv.exists() else None)


def int8_scores(engine, manifest: pd.DataFrame, z, size: int, n_views: int,
                cascade: bool) -> CalibScores:
    ids = manifest["item_id"].astype(str).tolist()
    load = decoder(manifest["uri"].astype(str).tolist(), ids, size)
    z1, z2 = score_images(engine, load, len(ids), n_views, cascade, 32)
    return CalibScores(view_logits=z1, stage2_logits=z2, labels=z["labels"], item_ids=ids,
                       group_keys=z["group_keys"].astype(str).tolist())


def int8_bundle(reg: ArtifactRegistry, fp32, tmp: Path):
    """bundles_int8/LATEST, else one built here with the fp32 policy's own settings."""
    pointer = reg.root / "bundles_int8" / "LATEST"
    if pointer.exists():
        return load_bundle(pointer.parent / pointer.read_text().strip()), "bundles_int8/LATEST"
    manifest, z, _ = split_inputs(reg, "val_calib")
    p = fp32.policy
    cascade = is_cascade(p)
    fit = Int8Fit(
        scores_fn=lambda eng: int8_scores(eng, manifest, z, fp32.manifest.img_size,
                                          fp32.manifest.n_views, cascade),
        policy_config=PolicyFitConfig(alpha=p.alpha, fit_fraction=p.fit_fraction),
        cascade_config=CascadeConfig(alpha=p.alpha, fit_fraction=p.fit_fraction,
                                     latency_stage1_s=0.0, latency_stage2_s=0.0,
                                     latency_budget_s=p.latency_budget_s, alphas=())
        if cascade else None,
        configured_latency=(None, None) if cascade else None, data_version="bench")
    result = build_int8_bundle(fp32, tmp / "bundles_int8", fit)
    return load_bundle(result.directory), "built by this benchmark"


def throughput(engine, images: np.ndarray, n_views: int, batch: int) -> float:
    engine.view_logits(images[:batch], n_views, batch)  # warm-up
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        engine.view_logits(images, n_views, batch)
        times.append(time.perf_counter() - t0)
    return len(images) / statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", required=True, help="a materialized ROADWORK_HOME")
    ap.add_argument("--repeats", type=int, default=15, help="timed calls per latency median")
    ap.add_argument("--batch", type=int, default=32, help="fp32 batch for the throughput row")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    reg = ArtifactRegistry(Path(args.home))
    fp32 = load_bundle(reg.latest_bundle())
    cascade, size, v = is_cascade(fp32.policy), fp32.manifest.img_size, fp32.manifest.n_views
    out: dict = {"fp32_bundle": fp32.manifest.bundle_id}
    with tempfile.TemporaryDirectory() as tmp:
        int8, where = int8_bundle(reg, fp32, Path(tmp))
        out.update(int8_bundle=int8.manifest.bundle_id, int8_source=where,
                   quantization=int8.manifest.quantization)
        eng8 = OnnxEngine(int8.directory, cascade, per_image=True)
        eng32 = OnnxEngine(fp32.directory, cascade)
        for split in ("val_calib", "val_test"):
            manifest, z, mv = split_inputs(reg, split)
            s8 = int8_scores(eng8, manifest, z, size, v, cascade)
            z2 = mv["logits"] if cascade else None
            out[split] = {"n": len(manifest),
                          "fp32": served_metrics(fp32.policy, z["logits"], z2, z["labels"]),
                          "int8": served_metrics(int8.policy, s8.view_logits,
                                                 s8.stage2_logits, z["labels"])}
        for name in ("model.onnx", "stage2.onnx") if cascade else ("model.onnx",):
            a, b = fp32.directory / name, int8.directory / name
            out[name] = {"mb_fp32": a.stat().st_size / 1e6, "mb_int8": b.stat().st_size / 1e6,
                         "latency_ms_fp32": 1e3 * ort_latency(a, size, args.repeats),
                         "latency_ms_int8": 1e3 * ort_latency(b, size, args.repeats)}
        manifest, _, _ = split_inputs(reg, "val_test")
        n = min(64, len(manifest))
        images = decoder(manifest["uri"].astype(str).tolist(),
                         manifest["item_id"].astype(str).tolist(), size)(0, n)
        tp = {"fp32_b1": throughput(eng32, images, v, 1),
              f"fp32_b{args.batch}": throughput(eng32, images, v, args.batch),
              "int8_b1": throughput(eng8, images, v, 1)}
        tp["ratio_int8_b1_over_fp32_b1"] = tp["int8_b1"] / tp["fp32_b1"]
        tp[f"ratio_int8_b1_over_fp32_b{args.batch}"] = tp["int8_b1"] / tp[f"fp32_b{args.batch}"]
        out["stage1_throughput_img_s"] = tp
        out["int8_policy"] = {k: getattr(int8.policy, k, None) for k in (
            "alpha", "crc_bound", "lam", "routing_rate", "latency_stage1_s", "latency_stage2_s")}
        out["fp32_policy"] = {k: getattr(fp32.policy, k, None) for k in out["int8_policy"]}
    print(json.dumps(out, indent=2, default=float))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
