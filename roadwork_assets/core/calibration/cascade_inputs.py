"""What the cascade policy is fitted from, checked: both stages' val_calib logits of one
checkpoint and one stage 2, aligned row by row, and each stage's per-image latency
(measured on this machine unless configured)."""

from __future__ import annotations

from typing import Any

import numpy as np

from roadwork_assets.contracts.errors import ArtifactIntegrityError
from roadwork_assets.contracts.multiview_schemas import MultiviewCheckpoint


def check_stage_logits(stage1: dict[str, np.ndarray], stage2: dict[str, np.ndarray],
                       stage2_sha256: str, split: str = "val_calib") -> None:
    """logits[split] and multiview_logits[split] hold the same images in the same order
    with the same labels, from the same stage-1 checkpoint, and stage 2 is the current one."""
    fix = f"re-materialize logits[{split}] and multiview_logits[{split}]"
    if not np.array_equal(stage1["item_ids"].astype(str), stage2["item_ids"].astype(str)):
        raise ArtifactIntegrityError(
            f"logits[{split}] and multiview_logits[{split}] hold other images (or another "
            f"order): {fix}")
    if not np.array_equal(stage1["labels"], stage2["labels"]):
        raise ArtifactIntegrityError(f"logits[{split}] and multiview_logits[{split}] disagree "
                                     f"on labels: {fix}")
    if str(stage1["checkpoint_sha256"]) != str(stage2["checkpoint_sha256"]):
        raise ArtifactIntegrityError(
            f"logits[{split}] come from checkpoint {str(stage1['checkpoint_sha256'])[:12]} and "
            f"multiview_logits[{split}] from {str(stage2['checkpoint_sha256'])[:12]}: {fix}")
    if str(stage2["multiview_checkpoint_sha256"]) != stage2_sha256:
        raise ArtifactIntegrityError(
            f"multiview_logits[{split}] were pooled by another multiview_checkpoint "
            f"({str(stage2['multiview_checkpoint_sha256'])[:12]}, current {stage2_sha256[:12]}): "
            f"re-materialize multiview_logits[{split}]")


def stage_latency(payload: dict[str, Any], stage2: MultiviewCheckpoint,
                  configured: tuple[float | None, float | None], *, repeats: int = 15,
                  device: str = "cpu") -> tuple[float, float, str]:
    """(stage-1 s, stage-2 s, "configured" | "measured"): configured values win; otherwise
    both are measured at batch 1 (``core.models.latency.stage_latencies``)."""
    if configured[0] is not None and configured[1] is not None:
        return float(configured[0]), float(configured[1]), "configured"
    from roadwork_assets.core.models.latency import stage_latencies
    from roadwork_assets.core.training.multiview import stage2_model
    from roadwork_assets.core.training.pipeline import model_from_checkpoint

    model, cfg = model_from_checkpoint(payload)
    cfg.apply_threads()
    lat1, lat2 = stage_latencies(model, stage2_model(model, stage2), cfg.img_size,
                                 repeats=repeats, device=device)
    source = "measured" if configured == (None, None) else "configured"
    return (float(configured[0]) if configured[0] is not None else lat1,
            float(configured[1]) if configured[1] is not None else lat2, source)
