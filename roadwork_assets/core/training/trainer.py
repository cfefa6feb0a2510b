"""One trainer, two backbone modes.

``fit`` reads only what it is given: training data and a selection set. The Dagster
layer guarantees those are the train and val_select partitions; nothing here can
reach another split.

- end_to_end: AdamW + cosine schedule over cached uint8 images with light
  augmentation (flip, small translation, brightness/contrast); the epoch with the
  lowest val_select NLL is kept (early stopping with ``patience``).
- frozen: the classic linear-probe recipe — L2 logistic regression (scikit-learn) on
  cached embeddings, the regularisation swept on val_select; the fitted weights are
  written into the two-logit head so the exported model is backbone + head.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, log_loss, roc_auc_score

from roadwork_assets.contracts.errors import BadInputError
from roadwork_assets.core.data.transforms import make_views, to_float
from roadwork_assets.core.models.classifier import RoadworkClassifier, freeze_backbone
from roadwork_assets.core.training.compile import CompileSettings, compiled
from roadwork_assets.core.training.config import TrainerConfig


@dataclass
class TrainResult:
    model: RoadworkClassifier
    epoch: int
    best_metric: float
    best_metric_name: str
    history: list[dict[str, float]] = field(default_factory=list)
    select_metrics: dict[str, float] = field(default_factory=dict)


def _selection_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    p = torch.softmax(torch.from_numpy(logits).double(), dim=1)[:, 1].numpy()
    p = np.clip(p, 1e-7, 1 - 1e-7)
    out = {
        "nll": float(log_loss(labels, p, labels=[0, 1])),
        "balanced_accuracy": float(balanced_accuracy_score(labels, p > 0.5)),
    }
    if len(np.unique(labels)) == 2:
        out["auroc"] = float(roc_auc_score(labels, p))
    return out


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Light augmentation on a float batch; avoids crops that could drop the object."""
    b, _, h, w = x.shape
    flip = torch.rand(b, generator=gen) < 0.5
    x = torch.where(flip.view(b, 1, 1, 1), torch.flip(x, dims=[3]), x)
    pad = max(1, h // 16)
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    dx, dy = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,), generator=gen))
    x = padded[:, :, dy : dy + h, dx : dx + w]
    bright = 1.0 + (torch.rand(b, 1, 1, 1, generator=gen) - 0.5) * 0.4
    contrast = 1.0 + (torch.rand(b, 1, 1, 1, generator=gen) - 0.5) * 0.4
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * contrast + mean * bright).clamp_(0.0, 1.0)


@torch.no_grad()
def _map_views(fn, images_uint8: np.ndarray, n_views: int, batch_size: int, dim: int) -> np.ndarray:
    """Apply ``fn`` to every deterministic view of every batch: [N, 3, S, S] -> [N, V, dim]."""
    out = np.empty((len(images_uint8), n_views, dim), dtype=np.float32)
    for start in range(0, len(images_uint8), batch_size):
        batch = to_float(torch.from_numpy(images_uint8[start : start + batch_size]))
        for v, view in enumerate(make_views(batch, n_views)):
            out[start : start + len(batch), v] = fn(view).float().cpu().numpy()
    return out


def predict_view_logits(model: RoadworkClassifier, images_uint8: np.ndarray, *, n_views: int,
                        batch_size: int, device: torch.device,
                        compile_settings: CompileSettings | TrainerConfig | None = None) -> np.ndarray:
    """[N, 3, S, S] uint8 -> [N, V, 2] float32 logits over deterministic views."""
    model.eval().to(device)
    fn = compiled(model, compile_settings)
    return _map_views(lambda x: fn(x.to(device)), images_uint8, n_views, batch_size, 2)


def embed_views(model: RoadworkClassifier, images_uint8: np.ndarray, *, n_views: int,
                batch_size: int, device: torch.device,
                compile_settings: CompileSettings | TrainerConfig | None = None) -> np.ndarray:
    """Frozen-backbone features: [N, 3, S, S] uint8 -> [N, V, D] float32."""
    model.eval().to(device)
    fn = compiled(model.features, compile_settings)
    return _map_views(lambda x: fn(x.to(device)), images_uint8, n_views,
                      batch_size, model.num_features)


@torch.no_grad()
def head_view_logits(model: RoadworkClassifier, embeddings: np.ndarray,
                     compile_settings: CompileSettings | TrainerConfig | None = None) -> np.ndarray:
    """[N, V, D] embeddings -> [N, V, 2] logits through the head only."""
    model.eval().cpu()
    feats = torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32))
    return compiled(model.forward_head, compile_settings)(feats).numpy().astype(np.float32)


def fit_end_to_end(
    model: RoadworkClassifier,
    cfg: TrainerConfig,
    train_x: np.ndarray,
    train_y: np.ndarray,
    select_x: np.ndarray,
    select_y: np.ndarray,
    log: Any = None,
) -> TrainResult:
    torch.manual_seed(cfg.seed)
    device = cfg.resolved_device()
    model.to(device)
    step_model = compiled(model, cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(train_x) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total,
                                                pct_start=0.15)
    gen = torch.Generator().manual_seed(cfg.seed)
    # class-balanced loss weights: the StreetVision score is balanced (MCC, 50/50 labels)
    counts = np.bincount(train_y, minlength=2).astype(np.float64)
    weights = torch.tensor(len(train_y) / (2 * np.maximum(counts, 1)), dtype=torch.float32,
                           device=device)
    xs = torch.from_numpy(train_x)
    ys = torch.from_numpy(train_y.astype(np.int64))
    best: dict[str, Any] = {"nll": math.inf}
    history: list[dict[str, float]] = []
    stale = 0
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        t0 = time.perf_counter()
        perm = torch.randperm(len(xs), generator=gen)
        total_loss = 0.0
        for start in range(0, len(perm), cfg.batch_size):
            idx = perm[start : start + cfg.batch_size]
            xb = _augment(to_float(xs[idx]), gen).to(device)
            yb = ys[idx].to(device)
            loss = F.cross_entropy(step_model(xb), yb, weight=weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total_loss += float(loss.detach()) * len(idx)
        sel_logits = predict_view_logits(model, select_x, n_views=1,
                                         batch_size=cfg.batch_size * 2, device=device,
                                         compile_settings=cfg)[:, 0]
        if not (math.isfinite(total_loss) and np.isfinite(sel_logits).all()):
            raise BadInputError(
                f"training diverged at epoch {epoch} (loss or val_select logits are NaN/inf) "
                f"with lr={cfg.lr}: lower trainer.lr (e.g. {cfg.lr / 3:.1e}) and rerun checkpoint"
            )
        metrics = _selection_metrics(sel_logits, select_y)
        row = {"epoch": epoch, "train_loss": total_loss / len(perm),
               "seconds": time.perf_counter() - t0,
               **{f"val_select_{k}": v for k, v in metrics.items()}}
        history.append(row)
        if log is not None:
            log(row)
        if metrics["nll"] < best["nll"]:
            best = {"nll": metrics["nll"], "epoch": epoch, "metrics": metrics,
                    "state": copy.deepcopy(model.state_dict())}
            stale = 0
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    model.load_state_dict(best["state"])
    model.cpu().eval()
    return TrainResult(model=model, epoch=best["epoch"], best_metric=best["nll"],
                       best_metric_name="val_select_nll", history=history,
                       select_metrics=best["metrics"])


def fit_linear_probe(
    model: RoadworkClassifier,
    cfg: TrainerConfig,
    train_emb: np.ndarray,
    train_y: np.ndarray,
    select_emb: np.ndarray,
    select_y: np.ndarray,
    log: Any = None,
) -> TrainResult:
    """L2 logistic regression on frozen embeddings; C swept on val_select NLL.

    Every stored view of a training image is a training sample (free augmentation);
    selection uses view 0, the view the model is served with.
    """
    freeze_backbone(model)
    n, v, d = train_emb.shape
    xtr = train_emb.reshape(n * v, d)
    ytr = np.repeat(train_y, v)
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    xsel = select_emb[:, 0]
    best: dict[str, Any] = {"nll": math.inf}
    history = []
    for i, c in enumerate(cfg.probe_cs, start=1):
        clf = LogisticRegression(C=c, max_iter=2000, class_weight="balanced")
        clf.fit((xtr - mu) / sd, ytr)
        z = clf.decision_function((xsel - mu) / sd)
        metrics = _selection_metrics(np.stack([np.zeros_like(z), z], axis=1), select_y)
        row = {"epoch": i, "C": c, **{f"val_select_{k}": val for k, val in metrics.items()}}
        history.append(row)
        if log is not None:
            log(row)
        if metrics["nll"] < best["nll"]:
            best = {"nll": metrics["nll"], "epoch": i, "clf": clf, "metrics": metrics}
    # z = w·(x-mu)/sd + b, split symmetrically over the two logits (z1 - z0 = z).
    w = best["clf"].coef_[0]
    b = float(best["clf"].intercept_[0])
    with torch.no_grad():
        model.feat_mean.copy_(torch.tensor(mu, dtype=torch.float32))
        model.feat_std.copy_(torch.tensor(sd, dtype=torch.float32))
        model.head.weight.copy_(torch.tensor(np.stack([-w / 2, w / 2]), dtype=torch.float32))
        model.head.bias.copy_(torch.tensor([-b / 2, b / 2], dtype=torch.float32))
    model.cpu().eval()
    return TrainResult(model=model, epoch=best["epoch"], best_metric=best["nll"],
                       best_metric_name="val_select_nll", history=history,
                       select_metrics=best["metrics"])
