"""The three training-phase steps as plain functions the Dagster layer calls.

- ``compute_embeddings``: the output of the frozen stage for one split. In frozen
  mode that is the pretrained backbone's features per test-time view, [N, V, D]; in
  end_to_end mode the frozen stage is only the deterministic preprocessing, so the
  cache holds the decoded, resized images, uint8 [N, 3, S, S]. Either way it is
  computed once per split and reused by training and inference. It is decoded,
  embedded and written batch by batch, and read back memory-mapped
  (``read_embeddings``, ``core.data.array_cache``): memory follows the batch size, not
  the split's size.
- ``train_checkpoint``: fit on train, select on val_select, write the checkpoint.
- ``compute_logits``: [N, V, 2] logits for one split from a checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from roadwork_assets.contracts.errors import BadInputError, LeakageError
from roadwork_assets.core.artifacts import (
    atomic_write_npz,
    code_version,
    combine_versions,
    file_sha256,
)
from roadwork_assets.core.data.array_cache import open_npz, streaming_npz
from roadwork_assets.core.data.transforms import DECODE_STAGE, iter_model_batches
from roadwork_assets.core.models.classifier import RoadworkClassifier, build_classifier
from roadwork_assets.core.progress import Progress, no_progress
from roadwork_assets.core.training.adapted_backbone import adapted_state_for
from roadwork_assets.core.training.adapter_config import ADAPTER_MODES, PRETRAINED_MODES
from roadwork_assets.core.training.adapters import fit_adapters
from roadwork_assets.core.training.checkpoint import save_checkpoint
from roadwork_assets.core.training.config import TrainerConfig
from roadwork_assets.core.training.embed_engine import choose_embedder, no_embedding_metadata
from roadwork_assets.core.training.trainer import (
    TrainResult,
    fit_end_to_end,
    fit_linear_probe,
    head_view_logits,
    mc_dropout_variance,
    predict_view_logits,
)


def build_model(cfg: TrainerConfig, *, with_weights: bool = True) -> RoadworkClassifier:
    return build_classifier(
        cfg.backbone,
        img_size=cfg.img_size,
        weights_path=cfg.weights_path if (with_weights and cfg.mode in PRETRAINED_MODES) else None,
        head_dropout=cfg.head_dropout,
        attn_impl=cfg.attn_impl,
        head=cfg.head,
    )


def weights_fingerprint(cfg: TrainerConfig) -> str:
    """sha256 of the pretrained backbone's weights file ('' when training from scratch)."""
    if cfg.mode not in PRETRAINED_MODES or not cfg.weights_path:
        return ""
    return file_sha256(Path(cfg.weights_path).expanduser())


def compute_embeddings(manifest: pd.DataFrame, cfg: TrainerConfig, dest: Path,
                       split: str, data_version: str, assignment_version: str,
                       progress: Progress = no_progress) -> dict[str, Any]:
    """Write the per-split feature cache (an uncompressed npz whose ``features`` are
    written and read batch by batch) and return summary numbers."""
    cfg.apply_threads()
    n = len(manifest)
    if cfg.mode == "frozen":
        model = build_model(cfg)
        embed = choose_embedder(model, cfg, n_images=n)  # torch or ONNX Runtime (trainer.embed_engine)
        kind, stage = "backbone_features", "decode + embed"
        shape, dtype = (n, cfg.n_views, model.num_features), np.float32
    else:
        embed, kind, stage = None, "preprocessed_images", DECODE_STAGE
        shape, dtype = (n, 3, cfg.img_size, cfg.img_size), np.uint8
    batches = iter_model_batches(manifest["uri"].tolist(), manifest["item_id"].tolist(),
                                 cfg.img_size, batch_size=cfg.batch_size, progress=progress,
                                 stage=stage)
    with streaming_npz(dest) as out:
        with out.rows("features", shape, dtype) as rows:
            for _, batch in batches:
                rows.write(batch if embed is None else embed(batch))
        out.put(
            labels=manifest["label"].to_numpy(np.int8),
            item_ids=manifest["item_id"].to_numpy(dtype=str),
            kind=np.array(kind),
            split=np.array(split),
            backbone=np.array(cfg.backbone),
            img_size=np.array(cfg.img_size),
            n_views=np.array(cfg.n_views),
            weights_sha256=np.array(weights_fingerprint(cfg)),
            group_keys=manifest["group_key"].astype(str).to_numpy(dtype=str)
            if "group_key" in manifest else manifest["item_id"].to_numpy(dtype=str),
            data_version=np.array(data_version),
            assignment_version=np.array(assignment_version),
            code_version=np.array(code_version()),
            # train draw weights of dataset.source_balance (core.data.balance), when set
            **({"sample_weight": manifest["sample_weight"].to_numpy(np.float64)}
               if "sample_weight" in manifest else {}),
        )
    n_pos = int((manifest["label"] == 1).sum())
    return {"kind": kind, "shape": list(shape), "dtype": str(np.dtype(dtype)),
            "n_positive": n_pos, "n_negative": int(n - n_pos),
            "embed_engine": no_embedding_metadata(cfg.mode) if embed is None else embed.metadata()}


def read_embeddings(path: Path, split: str) -> dict[str, Any]:
    """The embeddings cache of ``split``: ``features`` memory-mapped (``MappedRows``:
    indexing copies just those rows), every other array in memory."""
    return open_npz(path, mapped=("features",), what=f"embeddings[{split}]",
                    fix=f"re-materialize embeddings for partition {split} (its file is "
                    "rewritten whole; `roadwork run` does it)")


def _as_arrays(cache: dict[str, Any], cfg: TrainerConfig, split: str,
               weights_sha256: str | None = None):
    """The cache's arrays, refusing a cache made with other settings than ``cfg``."""
    expected = {
        "kind": "backbone_features" if cfg.mode == "frozen" else "preprocessed_images",
        "backbone": cfg.backbone,
        "img_size": str(cfg.img_size),
        "n_views": str(cfg.n_views) if cfg.mode == "frozen" else str(cache["n_views"]),
        "weights_sha256": weights_fingerprint(cfg) if weights_sha256 is None else weights_sha256,
    }
    found = {k: str(cache[k]) for k in expected}
    stale = {k: (found[k], v) for k, v in expected.items() if found[k] != v}
    if stale:
        detail = ", ".join(f"{k}: cache {a!r} vs trainer {b!r}" for k, (a, b) in stale.items())
        raise BadInputError(
            f"embeddings[{split}] were computed with other settings ({detail}): "
            "re-materialize embeddings for every split with the current trainer config"
        )
    features = cache["features"]
    if cfg.mode == "frozen":  # [N, V, D] features: small, and the probe (sklearn) needs them whole
        features = np.asarray(features)
    return features, cache["labels"].astype(np.int64)


def train_checkpoint(
    caches: dict[str, dict[str, np.ndarray]],
    cfg: TrainerConfig,
    dest: Path,
    log: Callable[[dict[str, float]], None] | None = None,
    adapted_backbone: Path | None = None,
    progress: Progress = no_progress,
) -> TrainResult:
    """Train on ``caches['train']``, select on ``caches['val_select']``; write checkpoint.

    ``caches`` must hold exactly those two splits: anything else is refused.
    ``adapted_backbone``: the adapted_backbone artifact, read in mode explora only.
    """
    if set(caches) != {"train", "val_select"}:
        raise BadInputError(f"training reads train and val_select only, got {sorted(caches)}")
    cfg.apply_threads()
    torch.manual_seed(cfg.seed)
    weights_sha256 = weights_fingerprint(cfg)
    train_x, train_y = _as_arrays(caches["train"], cfg, "train", weights_sha256)
    sel_x, sel_y = _as_arrays(caches["val_select"], cfg, "val_select", weights_sha256)
    for split, y in (("train", train_y), ("val_select", sel_y)):
        if len(np.unique(y)) < 2:
            raise BadInputError(f"{split} has only one class ({np.unique(y)}): cannot train")
    data_version = combine_versions({s: str(c["data_version"]) for s, c in caches.items()})
    assignment = {str(c["assignment_version"]) for c in caches.values()}
    if len(assignment) != 1:
        raise LeakageError(
            "embeddings[train] and embeddings[val_select] come from different split "
            "assignments: re-materialize split_manifest and embeddings for both splits"
        )
    model = build_model(cfg)
    adapter = None
    source_w = caches["train"].get("sample_weight")  # dataset.source_balance, when set
    if cfg.mode == "frozen":
        result = fit_linear_probe(model, cfg, train_x, train_y, sel_x, sel_y, log=log,
                                  source_weights=source_w, progress=progress)
    elif cfg.mode in ADAPTER_MODES:  # lora / dora / explora: adapters, merged (core.training.adapters)
        adapted = {}
        if cfg.mode == "explora":
            state, adapted = adapted_state_for(adapted_backbone, cfg, next(iter(assignment)))
            model.backbone.load_state_dict(state)
        result, adapter = fit_adapters(model, cfg, train_x, train_y, sel_x, sel_y, log=log,
                                       source_weights=source_w, progress=progress)
        adapter.update(adapted)
    else:
        result = fit_end_to_end(model, cfg, train_x, train_y, sel_x, sel_y, log=log,
                                progress=progress, source_weights=source_w)
    save_checkpoint(
        dest,
        model_state_dict=result.model.state_dict(),
        epoch=result.epoch,
        best_metric=result.best_metric,
        best_metric_name=result.best_metric_name,
        config=cfg.model_dump(),
        backbone_name=cfg.backbone,
        mode=cfg.mode,
        data_version=data_version,
        code_version=code_version(),
        assignment_version=assignment.pop(),
        weights_sha256=weights_sha256,
        img_size=cfg.img_size,
        select_metrics=result.select_metrics,
        adapter=adapter,
        training_recipe=result.recipe,
    )
    return result


def model_from_checkpoint(payload: dict[str, Any]) -> tuple[RoadworkClassifier, TrainerConfig]:
    """Rebuild the architecture (no weight file needed) and load the checkpoint's state."""
    cfg = TrainerConfig(**payload["config"])
    model = build_model(cfg, with_weights=False)
    model.load_state_dict(payload["model_state_dict"])
    return model.eval(), cfg


def compute_logits(payload: dict[str, Any], cache: dict[str, np.ndarray], split: str,
                   dest: Path, checkpoint_sha256: str,
                   override: TrainerConfig | None = None,
                   progress: Progress = no_progress) -> dict[str, Any]:
    """Logits of one split, refusing a split assignment other than the checkpoint's.

    If the assignment changed since training (new seed, fractions, or merged
    near-duplicate groups), this split may now hold the checkpoint's training images.
    """
    model, cfg = model_from_checkpoint(payload)
    if str(cache["assignment_version"]) != payload["assignment_version"]:
        raise LeakageError(
            f"embeddings[{split}] come from a different split assignment than the one the "
            "checkpoint was trained on, so this split may contain training images: "
            "re-materialize checkpoint (and everything after it) on the current splits"
        )
    run_cfg = override or cfg
    run_cfg.apply_threads()
    x, y = _as_arrays(cache, cfg, split, weights_sha256=payload["weights_sha256"])
    if cfg.mode == "frozen":
        logits = head_view_logits(model, x, compile_settings=run_cfg)
    else:
        logits = predict_view_logits(model, x, n_views=cfg.n_views,
                                     batch_size=run_cfg.batch_size * 2,
                                     device=run_cfg.resolved_device(),
                                     compile_settings=run_cfg, progress=progress)
    # optional uncertainty signal stored next to the logits (readers that do not know it
    # ignore the extra array): variance of P(roadwork) over T head-dropout passes
    extra = {}
    if run_cfg.mc_dropout_passes > 0:
        extra["mc_dropout_var"] = mc_dropout_variance(
            model, x[:, 0] if cfg.mode == "frozen" else x, passes=run_cfg.mc_dropout_passes,
            batch_size=run_cfg.batch_size * 2, device=run_cfg.resolved_device(), seed=cfg.seed)
    data_version = combine_versions({"checkpoint": payload["data_version"],
                                     f"embeddings[{split}]": str(cache["data_version"])})
    atomic_write_npz(dest, logits=logits, labels=y.astype(np.int8), item_ids=cache["item_ids"], **extra,
                     group_keys=cache["group_keys"], split=np.array(split),
                     data_version=np.array(data_version),
                     checkpoint_sha256=np.array(checkpoint_sha256),
                     code_version=np.array(code_version()))
    return {"n": len(y), "n_positive": int(y.sum()), "n_negative": int(len(y) - y.sum()),
            "n_views": int(logits.shape[1]), "finite": bool(np.isfinite(logits).all())}
