"""One trainer, two backbone modes.

``fit`` reads only what it is given: training data and a selection set. The Dagster
layer guarantees those are the train and val_select partitions; nothing here can
reach another split.

- end_to_end: AdamW + one-cycle schedule over cached uint8 images with light
  augmentation (flip, small translation, brightness/contrast) or the validator-faithful
  one (``augment='validator'``, also used to score val_select); the recipe switches of
  ``core.training.recipe`` (focal / smoothed / mixed targets, class-balanced and
  hard-negative sampling, gradient accumulation, EMA, AMP) are off by default. The
  epoch with the lowest val_select NLL is kept (early stopping with ``patience``); with
  EMA on, the EMA weights are the ones scored, selected and returned.
- frozen: the classic linear-probe recipe — L2 logistic regression (scikit-learn) on
  cached embeddings, the regularisation swept on val_select; the fitted weights are
  written into the two-logit head so the exported model is backbone + head.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, log_loss, roc_auc_score

from roadwork_assets.contracts.errors import BadInputError
from roadwork_assets.core.data.transforms import make_views, to_float
from roadwork_assets.core.models.classifier import RoadworkClassifier, freeze_backbone
from roadwork_assets.core.progress import Progress, no_progress
from roadwork_assets.core.training import distributed
from roadwork_assets.core.training.augment import (
    light_augment,
    validator_augment_batch,
    validator_selection_copy,
)
from roadwork_assets.core.training.compile import CompileSettings, compiled
from roadwork_assets.core.training.config import TrainerConfig
from roadwork_assets.core.training.recipe import (
    AmpDecision,
    WeightEMA,
    epoch_indices,
    evidential_loss,
    mix_batch,
    recipe_loss,
    resolve_amp,
    sample_weights,
    soft_targets,
)


@dataclass
class TrainResult:
    model: RoadworkClassifier
    epoch: int
    best_metric: float
    best_metric_name: str
    history: list[dict[str, float]] = field(default_factory=list)
    select_metrics: dict[str, float] = field(default_factory=dict)
    # what the recipe resolved to at run time (AMP dtype and why, EMA, ...)
    recipe: dict[str, Any] = field(default_factory=dict)


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


@torch.no_grad()
def _map_views(fn, images_uint8: np.ndarray, n_views: int, batch_size: int, dim: int,
               progress: Progress = no_progress, stage: str = "images") -> np.ndarray:
    """Apply ``fn`` to every deterministic view of every batch: [N, 3, S, S] -> [N, V, dim]."""
    out = np.empty((len(images_uint8), n_views, dim), dtype=np.float32)
    for start in range(0, len(images_uint8), batch_size):
        progress(stage, start, len(images_uint8))
        batch = to_float(torch.from_numpy(images_uint8[start : start + batch_size]))
        for v, view in enumerate(make_views(batch, n_views)):
            out[start : start + len(batch), v] = fn(view).float().cpu().numpy()
    progress(stage, len(images_uint8), len(images_uint8))
    return out


def predict_view_logits(model: RoadworkClassifier, images_uint8: np.ndarray, *, n_views: int,
                        batch_size: int, device: torch.device,
                        compile_settings: CompileSettings | TrainerConfig | None = None,
                        progress: Progress = no_progress) -> np.ndarray:
    """[N, 3, S, S] uint8 -> [N, V, 2] float32 logits over deterministic views."""
    model.eval().to(device)
    fn = compiled(model, compile_settings)
    return _map_views(lambda x: fn(x.to(device)), images_uint8, n_views, batch_size, 2,
                      progress, "logits")


@torch.no_grad()
def mc_dropout_variance(model: RoadworkClassifier, inputs: np.ndarray, *, passes: int,
                        batch_size: int, device: torch.device, seed: int = 0) -> np.ndarray:
    """[N] variance of P(roadwork) over ``passes`` passes with the dropout modules in
    train mode (BatchNorm stays in eval). ``inputs`` are uint8 images [N, 3, S, S] or
    frozen features [N, D] (then only the head runs). 0 when dropout is 0."""
    model.eval().to(device)
    drops = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    out = np.empty(len(inputs), dtype=np.float64)
    try:
        for m in drops:
            m.train()
        for start in range(0, len(inputs), batch_size):
            chunk = torch.from_numpy(np.ascontiguousarray(inputs[start : start + batch_size]))
            if chunk.ndim == 4:  # images: the backbone runs once, dropout sits in the head
                feats = model.features(to_float(chunk).to(device))
            else:
                feats = chunk.float().to(device)
            p = torch.stack([torch.softmax(model.forward_head(feats).double(), dim=1)[:, 1]
                             for _ in range(passes)])
            out[start : start + len(chunk)] = p.var(dim=0, unbiased=False).cpu().numpy()
    finally:
        for m in drops:
            m.eval()
        torch.random.set_rng_state(gen_state)
    return out


def embed_views(model: RoadworkClassifier, images_uint8: np.ndarray, *, n_views: int,
                batch_size: int, device: torch.device,
                compile_settings: CompileSettings | TrainerConfig | None = None,
                progress: Progress = no_progress) -> np.ndarray:
    """Frozen-backbone features: [N, 3, S, S] uint8 -> [N, V, D] float32."""
    model.eval().to(device)
    fn = compiled(model.features, compile_settings)
    return _map_views(lambda x: fn(x.to(device)), images_uint8, n_views,
                      batch_size, model.num_features, progress, "embed")


def view_embedder(model: RoadworkClassifier, *, n_views: int, device: torch.device,
                  compile_settings: CompileSettings | TrainerConfig | None = None,
                  features: Callable[[torch.Tensor], torch.Tensor] | None = None):
    """``embed(batch)``: uint8 [b, 3, S, S] -> [b, V, D] float32 features, one (compiled)
    model for every batch of a stream (``compute_embeddings``, through
    ``core.training.embed_engine``). ``features``: the float-views -> features function
    (an ONNX Runtime session's); default ``model.features`` under ``compile_settings``.
    Both engines share this loop, so they see the same uint8 -> float views."""
    model.eval().to(device)
    fn = features or compiled(model.features, compile_settings)
    return lambda batch: _map_views(lambda x: fn(x.to(device)), batch, n_views,
                                    max(1, len(batch)), model.num_features)


@torch.no_grad()
def head_view_logits(model: RoadworkClassifier, embeddings: np.ndarray,
                     compile_settings: CompileSettings | TrainerConfig | None = None) -> np.ndarray:
    """[N, V, D] embeddings -> [N, V, 2] logits through the head only."""
    model.eval().cpu()
    feats = torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32))
    return compiled(model.forward_head, compile_settings)(feats).numpy().astype(np.float32)


@dataclass
class _Loop:
    """What one end-to-end run's steps share."""

    cfg: TrainerConfig
    model: RoadworkClassifier
    step_model: Any
    opt: torch.optim.Optimizer
    sched: Any
    device: torch.device
    amp: AmpDecision
    scaler: Any
    class_weights: torch.Tensor
    gen: torch.Generator
    ema: WeightEMA | None


def _class_weights(cfg: TrainerConfig, train_y: np.ndarray, device: torch.device) -> torch.Tensor:
    """Balanced loss weights (the StreetVision score is balanced: MCC, 50/50 labels);
    ones when the sampler already balances the classes."""
    if cfg.sampler == "class_balanced":
        return torch.ones(2, device=device)
    counts = np.bincount(train_y, minlength=2).astype(np.float64)
    return torch.tensor(len(train_y) / (2 * np.maximum(counts, 1)), dtype=torch.float32,
                        device=device)


def _make_loop(model: RoadworkClassifier, cfg: TrainerConfig, train_y: np.ndarray) -> _Loop:
    device = cfg.resolved_device()
    model.to(device)
    # under torchrun: DDP replica (gradients averaged over ranks); else the model itself
    step_model = compiled(distributed.wrap(model, device), cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(distributed.shard_len(len(train_y))
                                / (cfg.batch_size * cfg.grad_accum_steps))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr,
                                                total_steps=steps_per_epoch * cfg.epochs,
                                                pct_start=0.15)
    amp = resolve_amp(cfg.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp.dtype == "float16")
    return _Loop(cfg=cfg, model=model, step_model=step_model, opt=opt, sched=sched,
                 device=device, amp=amp, scaler=scaler,
                 class_weights=_class_weights(cfg, train_y, device),
                 gen=torch.Generator().manual_seed(cfg.seed),
                 ema=WeightEMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None)


def _micro_batch(loop: _Loop, xs: np.ndarray, ys: torch.Tensor, idx: torch.Tensor,
                 epoch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(augmented images, soft targets, loss normaliser) of one micro-batch. ``xs`` may
    be a memory-mapped cache: only this micro-batch's rows are read."""
    cfg = loop.cfg
    rows = np.asarray(xs[idx.numpy()])  # a memmap's rows, an array's, or a tensor's
    if cfg.augment == "validator":
        raw = validator_augment_batch(rows, seed=cfg.seed, epoch=epoch, indices=idx.tolist())
        xb = to_float(torch.from_numpy(raw))
    else:
        xb = light_augment(to_float(torch.from_numpy(rows)), loop.gen)
    tb = soft_targets(ys[idx], cfg.label_smoothing)
    if cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0:
        xb, tb, _ = mix_batch(xb, tb, mixup_alpha=cfg.mixup_alpha,
                              cutmix_alpha=cfg.cutmix_alpha, gen=loop.gen)
    xb, tb = xb.to(loop.device), tb.to(loop.device)
    return xb, tb, (tb * loop.class_weights.view(1, -1)).sum()


def _loss_sum(loop: _Loop, logits: torch.Tensor, targets: torch.Tensor, epoch: int) -> torch.Tensor:
    cfg = loop.cfg
    if cfg.head == "evidential":
        per = evidential_loss(logits, targets, epoch=epoch,
                              anneal_epochs=cfg.evidential_anneal_epochs, kind=cfg.evidential_loss)
        return (per * (targets * loop.class_weights.view(1, -1)).sum(dim=1)).sum()
    return recipe_loss(logits, targets, loop.class_weights, cfg.focal_gamma)[0]


def _train_epoch(loop: _Loop, xs: np.ndarray, ys: torch.Tensor, order: torch.Tensor,
                 epoch: int) -> float:
    """One epoch; returns the mean training loss. k micro-batches per optimizer step,
    each divided by the whole step's normaliser: the gradient of one k-times batch."""
    cfg = loop.cfg
    loop.model.train()
    step = cfg.batch_size * cfg.grad_accum_steps
    total, total_norm = 0.0, 0.0
    for start in range(0, len(order), step):
        chunk = order[start : start + step]
        micro = [_micro_batch(loop, xs, ys, chunk[i : i + cfg.batch_size], epoch)
                 for i in range(0, len(chunk), cfg.batch_size)]
        norm = sum(m[2] for m in micro)
        loop.opt.zero_grad(set_to_none=True)
        for xb, tb, _ in micro:
            with loop.amp.autocast(loop.device):
                logits = loop.step_model(xb)
            loss_sum = _loss_sum(loop, logits.float(), tb, epoch)
            loop.scaler.scale(loss_sum / norm).backward()
            total += float(loss_sum.detach())
        loop.scaler.step(loop.opt)
        loop.scaler.update()
        loop.sched.step()
        if loop.ema is not None:
            loop.ema.update(loop.model)
        total_norm += float(norm)
    return total / max(total_norm, 1e-12)


def _train_false_positives(model: RoadworkClassifier, cfg: TrainerConfig, train_x: np.ndarray,
                           train_y: np.ndarray, device: torch.device) -> np.ndarray:
    """Hard-negative pass: train negatives (un-augmented) the model calls roadwork."""
    z = predict_view_logits(model, train_x, n_views=1, batch_size=cfg.batch_size * 2,
                            device=device)[:, 0]
    return (train_y == 0) & (z[:, 1] > z[:, 0])


def fit_end_to_end(
    model: RoadworkClassifier,
    cfg: TrainerConfig,
    train_x: np.ndarray,
    train_y: np.ndarray,
    select_x: np.ndarray,
    select_y: np.ndarray,
    log: Any = None,
    progress: Progress = no_progress,
    source_weights: np.ndarray | None = None,
) -> TrainResult:
    torch.manual_seed(cfg.seed)
    loop = _make_loop(model, cfg, train_y)
    progress("train epochs", 0, cfg.epochs)
    ys = torch.from_numpy(train_y.astype(np.int64))
    # validator-faithful selection: one fixed augmented copy of val_select, every epoch
    # (held in memory: the one O(N_select) buffer left, and only with augment=validator)
    select_views = validator_selection_copy(np.asarray(select_x), cfg.seed) \
        if cfg.augment == "validator" else select_x
    best: dict[str, Any] = {"nll": math.inf}
    history: list[dict[str, float]] = []
    stale, hard, n_hard = 0, None, 0
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        weights = sample_weights(train_y, class_balanced=cfg.sampler == "class_balanced",
                                 hard_negatives=hard, hard_negative_factor=cfg.hard_negative_factor,
                                 base=source_weights)
        train_loss = _train_epoch(loop, train_x, ys,
                                  distributed.shard(epoch_indices(weights, loop.gen)), epoch)
        scored = loop.ema.model if loop.ema is not None else model
        sel_logits = predict_view_logits(scored, select_views, n_views=1,
                                         batch_size=cfg.batch_size * 2, device=loop.device,
                                         compile_settings=cfg)[:, 0]
        if not (math.isfinite(train_loss) and np.isfinite(sel_logits).all()):
            raise BadInputError(
                f"training diverged at epoch {epoch} (loss or val_select logits are NaN/inf) "
                f"with lr={cfg.lr}: lower trainer.lr (e.g. {cfg.lr / 3:.1e}) and rerun checkpoint"
            )
        if cfg.hard_negative_factor > 1:
            hard = _train_false_positives(scored, cfg, train_x, train_y, loop.device)
            n_hard = int(hard.sum())
        metrics = _selection_metrics(sel_logits, select_y)
        row = {"epoch": epoch, "train_loss": train_loss, "seconds": time.perf_counter() - t0,
               **({"hard_negatives": n_hard} if cfg.hard_negative_factor > 1 else {}),
               **{f"val_select_{k}": v for k, v in metrics.items()}}
        history.append(row)
        progress("train epochs", epoch, cfg.epochs)
        if log is not None:
            log(row)
        if metrics["nll"] < best["nll"]:
            best = {"nll": metrics["nll"], "epoch": epoch, "metrics": metrics,
                    "state": copy.deepcopy(scored.state_dict())}
            stale = 0
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    model.load_state_dict(best["state"])
    model.cpu().eval()
    return TrainResult(model=model, epoch=best["epoch"], best_metric=best["nll"],
                       best_metric_name="val_select_nll", history=history,
                       select_metrics=best["metrics"], recipe=_recipe_record(loop))


def _recipe_record(loop: _Loop) -> dict[str, Any]:
    cfg = loop.cfg
    return {"amp_dtype": loop.amp.dtype, "amp_reason": loop.amp.reason,
            "ema_selected": loop.ema is not None, "augment": cfg.augment,
            "selection_views": "validator_l0_l3" if cfg.augment == "validator" else "clean"}


def fit_linear_probe(
    model: RoadworkClassifier,
    cfg: TrainerConfig,
    train_emb: np.ndarray,
    train_y: np.ndarray,
    select_emb: np.ndarray,
    select_y: np.ndarray,
    log: Any = None,
    source_weights: np.ndarray | None = None,
    progress: Progress = no_progress,
) -> TrainResult:
    """L2 logistic regression on frozen embeddings; C swept on val_select NLL.

    Every stored view of a training image is a training sample (free augmentation);
    selection uses view 0, the view the model is served with.
    """
    if cfg.head != "linear":
        raise BadInputError(f"mode='frozen' fits a linear probe; head={cfg.head!r} needs "
                            "mode='end_to_end'")
    freeze_backbone(model)
    n, v, d = train_emb.shape
    xtr = train_emb.reshape(n * v, d)
    ytr = np.repeat(train_y, v)
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    xsel = select_emb[:, 0]
    best: dict[str, Any] = {"nll": math.inf}
    history = []
    progress("probe C sweep", 0, len(cfg.probe_cs))
    for i, c in enumerate(cfg.probe_cs, start=1):
        clf = LogisticRegression(C=c, max_iter=2000, class_weight="balanced")
        clf.fit((xtr - mu) / sd, ytr,
                sample_weight=None if source_weights is None else np.repeat(source_weights, v))
        z = clf.decision_function((xsel - mu) / sd)
        metrics = _selection_metrics(np.stack([np.zeros_like(z), z], axis=1), select_y)
        row = {"epoch": i, "C": c, **{f"val_select_{k}": val for k, val in metrics.items()}}
        history.append(row)
        progress("probe C sweep", i, len(cfg.probe_cs))
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
