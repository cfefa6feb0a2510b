"""Ablation of the training-recipe switches on a small generated dataset.

    .venv/bin/python benchmarks/bench_recipe.py [--n 1500] [--size 64] [--epochs 10]
        [--seeds 0 1 2 3] [--only baseline focal ...] [--out results.json]
        [--from-json results.json]   # table of an earlier (possibly cut-short) run

About 9 minutes on 2 idle cores with the defaults (10 s per run, 27 s with the
validator augmentation); a busy machine can be 20-80x slower.

Each switch is turned on alone over the default end-to-end recipe and trained with the
same seeds as the baseline. Every run is scored on val_select twice: the clean images
(what selection sees by default) and one fixed validator-style copy (levels L0-L3 drawn
uniformly, JPEG q75; ``core.training.augment``), because the bundle is served on the
latter. The interval is the paired difference to the baseline of the same seed, mean
+- t(0.975, s-1) * sd / sqrt(s) over the s seeds (training noise dominates; one set of
val_select images). A switch "helps" only where the whole interval is on the good side.

Data: the project's synthetic generator (``generate_default_dataset``), scenes grouped
(both frames of a scene in one split): 60% train, 20% val_select, 20% val_calib (used
by ``bench_uncertainty.py``, never here).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from roadwork_assets.core.data.synthetic.dataset import generate_default_dataset
from roadwork_assets.core.data.transforms import load_model_arrays
from roadwork_assets.core.models.classifier import build_classifier
from roadwork_assets.core.training.augment import validator_selection_copy
from roadwork_assets.core.training.config import TrainerConfig
from roadwork_assets.core.training.trainer import _selection_metrics, fit_end_to_end, predict_view_logits

SWITCHES: dict[str, dict] = {  # run in this order (most consequential first)
    "baseline": {},
    "validator_aug": {"augment": "validator"},
    "ema_0.95": {"ema_decay": 0.95},
    "evidential": {"head": "evidential"},
    "class_balanced": {"sampler": "class_balanced"},
    "focal_g2": {"focal_gamma": 2.0},
    "label_smooth_0.1": {"label_smoothing": 0.1},
    "mixup_0.2": {"mixup_alpha": 0.2},
    "cutmix_1.0": {"cutmix_alpha": 1.0},
    "hard_neg_x3": {"hard_negative_factor": 3.0},
    "grad_accum_2": {"grad_accum_steps": 2},
}
# bigger is better for these; NLL is smaller-is-better
METRICS = ("balanced_accuracy", "auroc", "nll")


def make_splits(root: Path, n: int, size: int, positive_fraction: float = 0.25,
                seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Generate (or reuse) the dataset; grouped 60/20/20 split by scene."""
    manifest = generate_default_dataset(root, n_images=n, seed=seed, image_size=size,
                                        positive_fraction=positive_fraction)
    df = pd.read_csv(manifest)
    uris = [str(Path(manifest).parent / p) for p in df["path"]]
    x = load_model_arrays(uris, [str(p) for p in df["path"]], size)
    y = df["label"].to_numpy(np.int64)
    groups = df["group_id"].astype(str).to_numpy()
    uniq = np.unique(groups)
    u = np.random.default_rng(seed).permutation(len(uniq))
    part = {g: ("train" if r < 0.6 * len(uniq) else "val_select" if r < 0.8 * len(uniq)
                else "val_calib") for g, r in zip(uniq, u, strict=True)}
    where = np.array([part[g] for g in groups])
    out: dict = {s: (x[where == s], y[where == s]) for s in ("train", "val_select", "val_calib")}
    out["val_calib_groups"] = groups[where == "val_calib"]
    return out


def run_one(cfg: TrainerConfig, data: dict, aug_select: np.ndarray) -> dict[str, float]:
    import torch

    torch.manual_seed(cfg.seed)
    model = build_classifier(cfg.backbone, img_size=cfg.img_size, head_dropout=cfg.head_dropout,
                             head=cfg.head)
    t0 = time.perf_counter()
    res = fit_end_to_end(model, cfg, *data["train"], *data["val_select"])
    seconds = time.perf_counter() - t0
    sel_y = data["val_select"][1]
    out = {f"clean_{k}": v for k, v in res.select_metrics.items()}
    if cfg.augment == "validator":  # fit_end_to_end already selected on the aug copy
        clean = predict_view_logits(res.model, data["val_select"][0], n_views=1, batch_size=256,
                                    device=torch.device("cpu"))[:, 0]
        out = {f"clean_{k}": v for k, v in _selection_metrics(clean, sel_y).items()}
    z = predict_view_logits(res.model, aug_select, n_views=1, batch_size=256,
                            device=torch.device("cpu"))[:, 0]
    out.update({f"aug_{k}": v for k, v in _selection_metrics(z, sel_y).items()})
    out.update(seconds=seconds, epoch=res.epoch)
    return out


def summarise(results: dict[str, list[dict]]) -> list[dict]:
    """Paired (same seed) difference to the baseline, mean and t interval over seeds."""
    base = results["baseline"]
    rows = []
    for name, runs in results.items():
        row: dict = {"switch": name, "seconds": float(np.mean([r["seconds"] for r in runs]))}
        for view in ("clean", "aug"):
            for m in METRICS:
                key = f"{view}_{m}"
                vals = np.array([r[key] for r in runs])
                d = vals - np.array([b[key] for b in base])
                half = (stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
                        if len(d) > 1 else math.nan)
                row[key] = float(vals.mean())
                row[f"{key}_delta"] = float(d.mean())
                row[f"{key}_ci"] = [float(d.mean() - half), float(d.mean() + half)]
        rows.append(row)
    return rows


def _fmt(row: dict, key: str) -> str:
    lo, hi = row[f"{key}_ci"]
    return f"{row[key]:.3f} ({row[f'{key}_delta']:+.3f} [{lo:+.3f}, {hi:+.3f}])"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1500)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--only", nargs="+", default=list(SWITCHES))
    ap.add_argument("--data", type=Path, default=Path("/tmp/roadwork_bench_recipe"))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--from-json", type=Path, default=None,
                    help="only print the table of a (possibly cut-short) earlier --out")
    args = ap.parse_args()
    if args.from_json:
        runs = json.loads(args.from_json.read_text())["runs"]
        n = min(len(v) for v in runs.values())  # pair seeds the baseline also ran
        report({k: v[:n] for k, v in runs.items()}, argparse.Namespace(out=None))
        return
    data = make_splits(args.data, args.n, args.size)
    print({s: (len(data[s][1]), int(data[s][1].sum())) for s in ("train", "val_select")},
          flush=True)
    aug_select = validator_selection_copy(data["val_select"][0], seed=12345)
    results: dict[str, list[dict]] = {}
    for name in ["baseline"] + [s for s in args.only if s != "baseline"]:
        results[name] = []
        for seed in args.seeds:
            cfg = TrainerConfig(img_size=args.size, epochs=args.epochs, seed=seed, threads=2,
                                **SWITCHES[name])
            results[name].append(run_one(cfg, data, aug_select))
            print(name, seed, {k: round(v, 4) for k, v in results[name][-1].items()}, flush=True)
            if args.out:  # after every run: a cut-short ablation keeps what it measured
                args.out.write_text(json.dumps({"runs": results}, indent=1))
    report(results, args)


def report(results: dict[str, list[dict]], args: argparse.Namespace) -> None:
    rows = summarise(results)
    print("\n| switch | s/run | clean bal.acc | clean NLL | clean AUROC | val-aug bal.acc "
          "| val-aug NLL | val-aug AUROC |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        cells = [_fmt(r, f"{v}_{m}") for v in ("clean", "aug")
                 for m in ("balanced_accuracy", "nll", "auroc")]
        print(f"| {r['switch']} | {r['seconds']:.0f} | " + " | ".join(cells) + " |")
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                        "runs": results, "summary": rows}, indent=1))


if __name__ == "__main__":
    main()
