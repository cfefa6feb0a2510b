"""Adapter fine-tuning (modes lora, dora, explora): attach adapters, train them and the
head on train with the epoch chosen on val_select NLL (``fit_end_to_end``, the same loop
as end_to_end mode, over the same cached uint8 images), then merge.

Only the adapters (and DoRA's magnitude vectors) and the head train; the pretrained
weights stay frozen. The merged model must reproduce the adapted model's logits on a
few val_select images before it may be saved: the gap is measured and recorded.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from roadwork_assets.contracts.errors import BadInputError
from roadwork_assets.core.data.transforms import to_float
from roadwork_assets.core.models.adapters import (
    add_adapters,
    max_logit_gap,
    merge_adapters,
    trainable_parameters,
)
from roadwork_assets.core.models.classifier import RoadworkClassifier
from roadwork_assets.core.progress import Progress, no_progress
from roadwork_assets.core.training.config import TrainerConfig
from roadwork_assets.core.training.trainer import TrainResult, fit_end_to_end

# merged vs adapted logits, fp32: a merge folds B A into W, one rounding per weight
MERGE_TOLERANCE = 1e-3
_MERGE_PROBE_IMAGES = 8


def attach_adapters(model: RoadworkClassifier, cfg: TrainerConfig,
                    blocks: list[int] | None = None) -> dict[str, Any]:
    """Wrap ``model``'s ViT linears per ``cfg`` (DoRA for mode dora); returns what was
    attached (module names and parameter counts)."""
    names = add_adapters(model, rank=cfg.lora_rank, alpha=cfg.lora_alpha,
                         dropout=cfg.lora_dropout, targets=cfg.lora_targets,
                         dora=cfg.mode == "dora", blocks=blocks)
    return {"modules": names, **trainable_parameters(model)}


def fit_adapters(
    model: RoadworkClassifier,
    cfg: TrainerConfig,
    train_x: np.ndarray,
    train_y: np.ndarray,
    select_x: np.ndarray,
    select_y: np.ndarray,
    log: Any = None,
    source_weights: np.ndarray | None = None,
    progress: Progress = no_progress,
) -> tuple[TrainResult, dict[str, Any]]:
    """Train adapters + head, select the epoch on val_select, merge; returns the result
    (its model merged, plain timm) and the adapter record for the checkpoint."""
    attached = attach_adapters(model, cfg)
    result = fit_end_to_end(model, cfg, train_x, train_y, select_x, select_y, log=log,
                            source_weights=source_weights, progress=progress)
    probe = to_float(torch.from_numpy(np.ascontiguousarray(select_x[:_MERGE_PROBE_IMAGES])))
    with torch.no_grad():
        adapted = result.model.eval()(probe)
    merge_adapters(result.model)
    gap = max_logit_gap(result.model, adapted, probe)
    if not gap <= MERGE_TOLERANCE:
        raise BadInputError(
            f"merged model differs from the adapted one by {gap:.3g} logits on val_select "
            f"(tolerance {MERGE_TOLERANCE}): the adapters did not merge cleanly; rerun with "
            "trainer.lora_dropout=0 or a smaller trainer.lr")
    record = {**cfg.adapter_record(cfg.mode), "n_modules": len(attached["modules"]),
              "trainable_params": attached["trainable"], "total_params": attached["total"],
              "merge_max_abs_logit_gap": gap}
    return result, record
