"""Schema of the stage-2 artifact, ``multiview_checkpoint/aggregator.json``.

Stage 2 reuses stage 1's backbone + head (``checkpoint``) on several views of each image
and pools the per-view logits with one aggregator, chosen on val_select. The artifact
holds the chosen aggregator's parameters, the views it expects, the sha256 of the
stage-1 checkpoint whose logits it was fitted on (``multiview_logits`` refuses any other)
and the val_select comparison of every aggregator against the single view.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from roadwork_assets.contracts.errors import ArtifactIntegrityError

MULTIVIEW_SCHEMA_VERSION = 1
REMATERIALIZE = "re-materialize `multiview_checkpoint`"


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class AttentionParams(_Frozen):
    u: float = Field(description="weight of the view's scaled margin in its score")
    r: float = Field(description="weight of the view's scaled |margin| (confidence)")
    view_bias: list[float] = Field(description="one score bias per view position")
    margin_scale: float = Field(gt=0, description="fixed: std of train view margins")
    l2: float = Field(ge=0, description="penalty strength, selected on val_select NLL")


class ViewComparison(_Frozen):
    """One row of the val_select comparison (thresholded at p > 0.5, as the validator)."""

    aggregator: str = Field(description="single_view, mean, max or attention")
    nll: float
    auroc: float | None
    balanced_accuracy: float
    fnr: float = Field(description="miss rate at 0.5: positives with p <= 0.5")
    misses: int
    n_positive: int
    n: int


class MultiviewCheckpoint(_Frozen):
    schema_version: Literal[1] = MULTIVIEW_SCHEMA_VERSION
    aggregator: Literal["mean", "max", "attention"]
    selection_metric: Literal["val_select_nll"] = "val_select_nll"
    view_source: Literal["ten_crop", "cached_views"] = Field(
        description="ten_crop: four corners + centre, each flipped, of the cached image; "
        "cached_views: the frozen-mode feature cache's views (ten-crop skipped)")
    views: list[str] = Field(min_length=1)
    crop_scale: float | None = Field(None, gt=0, le=1)
    input_size: int = Field(gt=0, description="model input size every view is resized to")
    ten_crop_skipped_reason: str = ""
    attention: AttentionParams | None = Field(
        None, description="the fitted attention aggregator (kept even when not chosen)")
    comparison: list[ViewComparison]
    checkpoint_sha256: str = Field(min_length=64, max_length=64)
    assignment_version: str
    data_version: str
    code_version: str

    @model_validator(mode="after")
    def _consistent(self) -> MultiviewCheckpoint:
        if self.aggregator == "attention" and self.attention is None:
            raise ValueError("aggregator 'attention' needs its parameters")
        if self.attention is not None and len(self.attention.view_bias) != len(self.views):
            raise ValueError(f"attention has {len(self.attention.view_bias)} view biases "
                             f"for {len(self.views)} views")
        if self.view_source == "ten_crop" and self.crop_scale is None:
            raise ValueError("ten_crop views need their crop_scale")
        return self


def load_multiview_checkpoint(path: Path) -> MultiviewCheckpoint:
    """Read and validate; anything else is refused with the fix."""
    path = Path(path)
    if not path.exists():
        raise ArtifactIntegrityError(f"multiview checkpoint missing at {path}: "
                                     "materialize `multiview_checkpoint`")
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ArtifactIntegrityError(f"{path} is unreadable: {exc}; {REMATERIALIZE}") from exc
    if isinstance(raw, dict) and raw.get("schema_version") != MULTIVIEW_SCHEMA_VERSION:
        raise ArtifactIntegrityError(
            f"{path} has schema_version {raw.get('schema_version')!r}; this code reads "
            f"{MULTIVIEW_SCHEMA_VERSION}: {REMATERIALIZE}")
    try:
        return MultiviewCheckpoint.model_validate(raw)
    except ValidationError as exc:
        detail = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'artifact'}: {e['msg']}"
                           for e in exc.errors())
        raise ArtifactIntegrityError(f"{path} does not match MultiviewCheckpoint: {detail}; "
                                     f"{REMATERIALIZE}") from None
