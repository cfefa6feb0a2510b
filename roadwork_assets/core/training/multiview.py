"""Stage 2 as plain functions the Dagster layer calls: per-view logits of the stage-1
checkpoint, the aggregator fitted on train and chosen on val_select, and the aggregated
logits of one split.

- end_to_end mode: the feature cache holds the decoded uint8 images, so the views are
  the ten-crop of each cached image (``core.models.multiview.ten_crop``), resized back to
  the checkpoint's input size.
- frozen mode: the cache holds backbone features of the ``n_views`` cached views only
  (identity, h-flip, centre zoom, ...), not images. Ten-crop would mean decoding every
  image again and ten ViT passes per image, so it is skipped, with the reason recorded
  in the artifact, and stage 2 aggregates over the cached views instead.

Training the attention aggregator on train-split view logits (as the graph's rule for
model fitting says) sees logits of images stage 1 was fitted on, which are more
confident than on unseen images; the l2 strength, and the choice between mean, max and
attention, are made on val_select NLL, which does not share that bias.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import balanced_accuracy_score, log_loss, roc_auc_score

from roadwork_assets.contracts.errors import ArtifactIntegrityError, BadInputError, LeakageError
from roadwork_assets.contracts.multiview_schemas import (
    AttentionParams,
    MultiviewCheckpoint,
    ViewComparison,
)
from roadwork_assets.core.artifacts import (
    atomic_write_json,
    atomic_write_npz,
    code_version,
    combine_versions,
)
from roadwork_assets.core.data.transforms import to_float
from roadwork_assets.core.models.multiview import (
    AGGREGATORS,
    DEFAULT_CROP_SCALE,
    TEN_CROP_VIEWS,
    AttentionAggregator,
    MultiviewModel,
    aggregate,
    ten_crop,
)
from roadwork_assets.core.progress import Progress, no_progress
from roadwork_assets.core.training.pipeline import _as_arrays, model_from_checkpoint
from roadwork_assets.core.training.trainer import head_view_logits

CACHED_VIEWS = ("identity", "hflip", "centre_zoom", "centre_zoom_hflip")  # make_views order
FROZEN_SKIP_REASON = (
    "frozen mode caches backbone features of the {n} test-time view(s) {names}, not "
    "images; ten-crop would decode every image again and run the ViT ten times per "
    "image, so stage 2 aggregates over the cached views")
ATTENTION_L2S = (1e-3, 1e-2, 1e-1, 1.0)


@torch.no_grad()
def _ten_crop_logits(model, images_uint8: np.ndarray, crop_scale: float, size: int,
                     batch_size: int, device: torch.device,
                     progress: Progress = no_progress) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [N, 3, S, S] -> (ten-crop logits [N, 10, 2], full-view logits [N, 2])."""
    model.eval().to(device)
    views = np.empty((len(images_uint8), len(TEN_CROP_VIEWS), 2), dtype=np.float32)
    single = np.empty((len(images_uint8), 2), dtype=np.float32)
    for start in range(0, len(images_uint8), batch_size):
        progress("ten-crop views", start, len(images_uint8))
        batch = to_float(torch.from_numpy(images_uint8[start:start + batch_size])).to(device)
        stop = start + len(batch)
        single[start:stop] = model(batch).float().cpu().numpy()
        crops = ten_crop(batch, crop_scale, out_size=size)
        # one forward pass over every view of the batch
        out = model(torch.cat(crops)).float().cpu().numpy().reshape(len(crops), len(batch), 2)
        views[start:stop] = out.transpose(1, 0, 2)
    progress("ten-crop views", len(images_uint8), len(images_uint8))
    return views, single


def view_logits(payload: dict[str, Any], cache: dict[str, np.ndarray], split: str,
                crop_scale: float = DEFAULT_CROP_SCALE,
                batch_size: int | None = None,
                progress: Progress = no_progress) -> dict[str, Any]:
    """Per-view logits of one split's cache under the stage-1 checkpoint ``payload``."""
    if str(cache["assignment_version"]) != payload["assignment_version"]:
        raise LeakageError(
            f"embeddings[{split}] come from a different split assignment than the one the "
            "checkpoint was trained on, so this split may contain training images: "
            "re-materialize checkpoint (and everything after it) on the current splits")
    model, cfg = model_from_checkpoint(payload)
    cfg.apply_threads()
    x, y = _as_arrays(cache, cfg, split, weights_sha256=payload["weights_sha256"])
    if cfg.mode == "frozen":
        z = head_view_logits(model, x)
        names = list(CACHED_VIEWS[:z.shape[1]])
        return {"views": z, "single": z[:, 0], "labels": y, "names": names,
                "source": "cached_views", "crop_scale": None, "input_size": cfg.img_size,
                "skipped": FROZEN_SKIP_REASON.format(n=len(names), names=names)}
    z, single = _ten_crop_logits(model, x, crop_scale, cfg.img_size,
                                 batch_size or cfg.batch_size, cfg.resolved_device(),
                                 progress)
    return {"views": z, "single": single, "labels": y, "names": list(TEN_CROP_VIEWS),
            "source": "ten_crop", "crop_scale": crop_scale, "input_size": cfg.img_size,
            "skipped": ""}


def compare(name: str, logits: np.ndarray, labels: np.ndarray) -> ViewComparison:
    """Metrics of [N, 2] logits, binarised as the validator does (p > 0.5 is roadwork)."""
    margin = logits[:, 1].astype(np.float64) - logits[:, 0]
    p = np.clip(1.0 / (1.0 + np.exp(-margin)), 1e-7, 1 - 1e-7)
    pred = margin > 0
    pos = labels == 1
    misses = int((pos & ~pred).sum())
    both = len(np.unique(labels)) == 2
    return ViewComparison(
        aggregator=name, nll=float(log_loss(labels, p, labels=[0, 1])),
        auroc=float(roc_auc_score(labels, p)) if both else None,
        balanced_accuracy=float(balanced_accuracy_score(labels, pred)),
        fnr=misses / max(int(pos.sum()), 1), misses=misses, n_positive=int(pos.sum()),
        n=len(labels))


def compute_view_logits(payload: dict[str, Any], cache: dict[str, np.ndarray], split: str,
                        dest: Path, checkpoint_sha256: str,
                        crop_scale: float = DEFAULT_CROP_SCALE,
                        progress: Progress = no_progress) -> dict[str, Any]:
    """Per-view logits [N, V, 2] of one split (``view_logits``), written once so that the
    aggregator fit (train, val_select) and every split's pooled logits reuse them: the
    views are stage 2's whole cost (ten forward passes per image)."""
    part = view_logits(payload, cache, split, crop_scale, progress=progress)
    y = part["labels"]
    data_version = combine_versions({"checkpoint": payload["data_version"],
                                     f"embeddings[{split}]": str(cache["data_version"])})
    atomic_write_npz(
        dest, logits=part["views"].astype(np.float32), single=part["single"].astype(np.float32),
        labels=y.astype(np.int8), item_ids=cache["item_ids"], group_keys=cache["group_keys"],
        split=np.array(split), view_names=np.array(part["names"]),
        view_source=np.array(part["source"]),
        crop_scale=np.array(np.nan if part["crop_scale"] is None else part["crop_scale"]),
        input_size=np.array(part["input_size"]), skipped=np.array(part["skipped"]),
        data_version=np.array(data_version), checkpoint_sha256=np.array(checkpoint_sha256),
        assignment_version=np.array(payload["assignment_version"]),
        code_version=np.array(code_version()))
    return {"n": len(y), "n_views": len(part["names"]), "view_source": part["source"],
            "finite": bool(np.isfinite(part["views"]).all())}


def _from_npz(views: dict[str, np.ndarray]) -> dict[str, Any]:
    """A written view-logits artifact as ``view_logits`` returns it."""
    scale = float(views["crop_scale"])
    return {"views": views["logits"], "single": views["single"],
            "labels": views["labels"].astype(np.int64),
            "names": [str(n) for n in views["view_names"]], "source": str(views["view_source"]),
            "crop_scale": None if np.isnan(scale) else scale,
            "input_size": int(views["input_size"]), "skipped": str(views["skipped"])}


def fit_multiview(payload: dict[str, Any], caches: dict[str, dict[str, np.ndarray]],
                  checkpoint_sha256: str, dest: Path,
                  crop_scale: float = DEFAULT_CROP_SCALE) -> MultiviewCheckpoint:
    """Stage 2 from the feature caches (computes the views in memory; the graph writes them
    once as ``multiview_views`` and calls ``fit_aggregator``)."""
    if set(caches) != {"train", "val_select"}:
        raise BadInputError(f"stage 2 reads train and val_select only, got {sorted(caches)}")
    parts = {s: view_logits(payload, c, s, crop_scale) for s, c in caches.items()}
    data_version = combine_versions({
        "checkpoint": payload["data_version"],
        **{f"embeddings[{s}]": str(c["data_version"]) for s, c in caches.items()}})
    return _fit(parts, checkpoint_sha256, payload["assignment_version"], data_version, dest)


def fit_aggregator(views: dict[str, dict[str, np.ndarray]], dest: Path) -> MultiviewCheckpoint:
    """Stage 2 from the written view logits of train and val_select (``compute_view_logits``),
    which must come from one checkpoint and one split assignment."""
    if set(views) != {"train", "val_select"}:
        raise BadInputError(f"stage 2 reads train and val_select only, got {sorted(views)}")
    found = {k: {str(v[k]) for v in views.values()}
             for k in ("checkpoint_sha256", "assignment_version")}
    for key, values in found.items():
        if len(values) != 1:
            raise ArtifactIntegrityError(
                f"multiview_views[train] and multiview_views[val_select] disagree on {key} "
                f"({sorted(v[:12] for v in values)}): re-materialize multiview_views for both")
    data_version = combine_versions({f"multiview_views[{s}]": str(v["data_version"])
                                     for s, v in views.items()})
    return _fit({s: _from_npz(v) for s, v in views.items()}, found["checkpoint_sha256"].pop(),
                found["assignment_version"].pop(), data_version, dest)


def _fit(parts: dict[str, dict[str, Any]], checkpoint_sha256: str, assignment_version: str,
         data_version: str, dest: Path) -> MultiviewCheckpoint:
    """Attention fitted on train, its l2 and the aggregator chosen on val_select NLL."""
    train, select = parts["train"], parts["val_select"]
    for split, part in (("train", train), ("val_select", select)):
        if len(np.unique(part["labels"])) < 2:
            raise BadInputError(f"{split} has only one class: cannot fit stage 2")
    attention, best_nll = None, np.inf
    for l2 in ATTENTION_L2S:
        candidate = AttentionAggregator(l2=l2).fit(train["views"], train["labels"])
        nll = compare("attention", candidate.aggregate(select["views"]), select["labels"]).nll
        if nll < best_nll:
            attention, best_nll = candidate, nll
    rows = [compare("single_view", select["single"], select["labels"])]
    rows += [compare(name, aggregate(name, select["views"], attention), select["labels"])
             for name in AGGREGATORS]
    chosen = min(rows[1:], key=lambda r: r.nll).aggregator
    artifact = MultiviewCheckpoint(
        aggregator=chosen, view_source=train["source"], views=train["names"],
        crop_scale=train["crop_scale"], input_size=train["input_size"],
        ten_crop_skipped_reason=train["skipped"],
        attention=AttentionParams(**attention.to_params()), comparison=rows,
        checkpoint_sha256=checkpoint_sha256, assignment_version=assignment_version,
        data_version=data_version, code_version=code_version())
    atomic_write_json(dest, artifact)
    return artifact


def compute_multiview_logits(stage2: MultiviewCheckpoint, views: dict[str, np.ndarray],
                             split: str, dest: Path, multiview_sha256: str) -> dict[str, Any]:
    """[N, 1, 2] pooled logits of one split from its written view logits, stamped with both
    checkpoints' sha256."""
    found = str(views["checkpoint_sha256"])
    if stage2.checkpoint_sha256 != found:
        raise ArtifactIntegrityError(
            f"multiview_checkpoint was fitted on the views of another stage-1 checkpoint "
            f"(sha256 {stage2.checkpoint_sha256[:12]}…, multiview_views[{split}] "
            f"{found[:12]}…): re-materialize multiview_views and multiview_checkpoint")
    part = _from_npz(views)
    if part["names"] != stage2.views:
        raise ArtifactIntegrityError(
            f"multiview_checkpoint expects views {stage2.views}, multiview_views[{split}] "
            f"holds {part['names']}: re-materialize multiview_checkpoint")
    attention = (AttentionAggregator.from_params(stage2.attention.model_dump())
                 if stage2.attention is not None else None)
    pooled = aggregate(stage2.aggregator, part["views"], attention)[:, None, :]
    y = part["labels"]
    data_version = combine_versions({"multiview_checkpoint": stage2.data_version,
                                     f"multiview_views[{split}]": str(views["data_version"])})
    atomic_write_npz(dest, logits=pooled.astype(np.float32), labels=y.astype(np.int8),
                     item_ids=views["item_ids"], group_keys=views["group_keys"],
                     split=np.array(split), aggregator=np.array(stage2.aggregator),
                     data_version=np.array(data_version), checkpoint_sha256=np.array(found),
                     multiview_checkpoint_sha256=np.array(multiview_sha256),
                     code_version=np.array(code_version()))
    return {"n": len(y), "n_positive": int(y.sum()), "n_negative": int(len(y) - y.sum()),
            "n_views_aggregated": len(part["names"]), "aggregator": stage2.aggregator,
            "finite": bool(np.isfinite(pooled).all())}


def stage2_model(base: torch.nn.Module, stage2: MultiviewCheckpoint) -> MultiviewModel:
    """Stage 2 as one eval-mode network over the stage-1 model ``base`` (``MultiviewModel``)."""
    return MultiviewModel(
        base, view_source=stage2.view_source, n_views=len(stage2.views),
        crop_scale=stage2.crop_scale, input_size=stage2.input_size,
        aggregator=stage2.aggregator,
        attention=None if stage2.attention is None else stage2.attention.model_dump()).eval()


@torch.no_grad()
def predict_stage2_logits(model: MultiviewModel, images_uint8: np.ndarray, *,
                          batch_size: int = 32, device: torch.device | str = "cpu") -> np.ndarray:
    """uint8 [N, 3, S, S] -> stage-2 pooled logits [N, 2] (float32)."""
    device = torch.device(device)
    model.eval().to(device)
    out = np.empty((len(images_uint8), 2), dtype=np.float32)
    for start in range(0, len(images_uint8), batch_size):
        batch = to_float(torch.from_numpy(np.ascontiguousarray(
            images_uint8[start:start + batch_size]))).to(device)
        out[start:start + len(batch)] = model(batch).float().cpu().numpy()
    return out
