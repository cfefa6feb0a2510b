"""Which uncertainty signals detect stage-1 errors better than max-prob?

    .venv/bin/python benchmarks/bench_uncertainty.py [--n 1500] [--size 48] [--epochs 5]

Trains the default end-to-end model (softmax head, head_dropout as configured) and an
evidential-head model on train (selected on val_select), then on the val_calib *fit*
part (half of val_calib's scene groups, as policy fitting splits it) scores each signal
of ``core.calibration.uncertainty`` by the AUROC of detecting wrong decisions (argmax),
against max-prob, with a paired bootstrap interval of the gain. ``select_signals`` is
the rule the gate should follow: keep a signal iff the gain's lower bound is > 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_recipe import make_splits

from roadwork_assets.core.calibration.uncertainty import (
    select_signals,
    uncertainty_signals,
)
from roadwork_assets.core.models.classifier import build_classifier
from roadwork_assets.core.training.config import TrainerConfig
from roadwork_assets.core.training.trainer import (
    fit_end_to_end,
    mc_dropout_variance,
    predict_view_logits,
)


def train(cfg: TrainerConfig, data: dict):
    torch.manual_seed(cfg.seed)
    model = build_classifier(cfg.backbone, img_size=cfg.img_size, head_dropout=cfg.head_dropout,
                             head=cfg.head)
    return fit_end_to_end(model, cfg, *data["train"], *data["val_select"]).model


def score(model, cfg: TrainerConfig, x: np.ndarray, y: np.ndarray, passes: int) -> dict:
    cpu = torch.device("cpu")
    views = predict_view_logits(model, x, n_views=4, batch_size=256, device=cpu)
    mc = mc_dropout_variance(model, x, passes=passes, batch_size=256, device=cpu) \
        if cfg.head_dropout > 0 else None
    sig = uncertainty_signals(views, evidential=cfg.head == "evidential", mc_dropout_var=mc)
    wrong = views[:, 0].argmax(1) != y
    helps, scores = select_signals(sig, wrong, n_boot=1000, level=0.9)
    return {"n": int(len(y)), "n_wrong": int(wrong.sum()), "helps": helps,
            "scores": [{"signal": s.name, "auroc": s.auroc, "max_prob_auroc": s.baseline_auroc,
                        "gain": s.gain, "gain_90ci": [s.gain_low, s.gain_high],
                        "helps": s.helps} for s in scores]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1500)
    ap.add_argument("--size", type=int, default=48)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--passes", type=int, default=16)
    ap.add_argument("--head-dropout", type=float, default=0.1)
    ap.add_argument("--data", type=Path, default=Path("/tmp/roadwork_bench_uncertainty"))
    args = ap.parse_args()
    data = make_splits(args.data, args.n, args.size)
    xc, yc = data["val_calib"]
    groups = data["val_calib_groups"]
    uniq = np.unique(groups)
    fit_groups = set(uniq[np.random.default_rng(1).permutation(len(uniq))[: len(uniq) // 2]])
    fit = np.array([g in fit_groups for g in groups])  # half of the scenes: the fit part
    out = {}
    for head in ("linear", "evidential"):
        cfg = TrainerConfig(img_size=args.size, epochs=args.epochs, head=head,
                            head_dropout=args.head_dropout, threads=2)
        model = train(cfg, data)
        out[head] = score(model, cfg, xc[fit], yc[fit], args.passes)
        print(head, json.dumps(out[head], indent=1), flush=True)
    print("\n| head | signal | AUROC(err) | max-prob AUROC | gain [90% CI] | helps |\n"
          "|---|---|---|---|---|---|")
    for head, res in out.items():
        for s in res["scores"]:
            lo, hi = s["gain_90ci"]
            print(f"| {head} (n={res['n']}, wrong={res['n_wrong']}) | {s['signal']} | "
                  f"{s['auroc']:.3f} | {s['max_prob_auroc']:.3f} | {s['gain']:+.3f} "
                  f"[{lo:+.3f}, {hi:+.3f}] | {s['helps']} |")


if __name__ == "__main__":
    main()
