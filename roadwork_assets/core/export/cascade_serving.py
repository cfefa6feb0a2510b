"""What a bundle serves, stage by stage, and stage 2's torch / ONNX logits on a probe batch.

A one-stage bundle serves ``apply_policy``. A cascade bundle serves ``apply_cascade``:
stage 1 (the checkpoint's network) on every image, stage 2 (``MultiviewModel``: the same
network on the ten crops, pooled by the aggregator of ``stage2.json``) on the images
stage 1 routes only. Parity (torch vs ONNX Runtime, or torch now vs the stored probe
outputs) is judged on what each stage serves, with ``onnx_export.judge_served``:

- stage 1 of a cascade serves p1 (calibrated main view) and an exit: negative (0),
  positive (1) or routed (-1), ``stage1_served``;
- stage 2 serves the remapped p2 and its decision as if the image were routed
  (``stage2_served``), compared on EVERY probe image, routed or not, so the check is
  never vacuous when stage 1 happens to exit the whole probe batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from roadwork_assets.core.calibration.cascade import (
    apply_cascade,
    cascade_stage1_probability,
    cascade_stage2_probability,
)
from roadwork_assets.core.calibration.policies import apply_policy, remap_probability
from roadwork_assets.core.data.transforms import to_float
from roadwork_assets.core.export.onnx_export import (
    PARITY_OPT_LEVEL,
    ParityReport,
    fp32_logit_tolerance,
)

Stage2Source = np.ndarray | Callable[[np.ndarray], np.ndarray]


def is_cascade(policy: Any) -> bool:
    return getattr(policy, "kind", None) == "cascade"


def stage1_served(policy: Any, view_logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(decision, probability) stage 1 serves: the policy itself for a one-stage policy;
    for a cascade p1 and its exit (0 negative, 1 positive, -1 routed to stage 2)."""
    if not is_cascade(policy):
        return apply_policy(policy, view_logits)
    p1 = cascade_stage1_probability(policy, view_logits)
    exit_ = np.where(p1 <= policy.t_exit_neg, 0, np.where(p1 > policy.t_exit_pos, 1, -1))
    return exit_.astype(np.int8), p1


def stage2_served(policy: Any, pooled_logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(decision, served probability) of stage 2 on pooled logits [N, 2] (or [N, 1, 2]),
    as if every image were routed: p2 > t2 is positive, remapped so t2 lands on 0.5."""
    z = np.asarray(pooled_logits, dtype=np.float64).reshape(len(pooled_logits), 2)
    p2 = cascade_stage2_probability(policy, z)
    negative = p2 <= policy.t2
    return (~negative).astype(np.int8), remap_probability(p2, policy.t2, policy.t2, negative,
                                                          ~negative)


def served_outputs(policy: Any, view_logits: np.ndarray,
                   stage2: Stage2Source | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(decision int8, served probability float64, stage int8) per image. ``stage2``: a
    cascade's pooled stage-2 logits [N, 2], or a callable over the routed indices (stage 2
    then runs on those only); ignored by a one-stage policy (stage 1 everywhere)."""
    if not is_cascade(policy):
        decision, prob = apply_policy(policy, view_logits)
        return decision.astype(np.int8), prob, np.ones(len(decision), dtype=np.int8)
    if stage2 is None:
        raise ValueError("a cascade policy needs stage 2 (pooled logits or a callable)")
    decision, prob, stage = apply_cascade(policy, view_logits, stage2)
    return decision.astype(np.int8), prob, stage.astype(np.int8)


def _float_batch(images_uint8: np.ndarray) -> torch.Tensor:
    return to_float(torch.from_numpy(np.ascontiguousarray(images_uint8)))


def stage2_tolerance(model: Any, z_views: np.ndarray, tol_views: np.ndarray) -> np.ndarray:
    """[N, 2] bound on how far fp32 rounding alone may move the pooled logits, from the
    per-view bounds ``tol_views`` [N, V, 2] (``fp32_logit_tolerance``) and the views' logits.

    mean: a mean moves by at most the largest view's bound. attention: the same for the
    pooled values, plus the weights' own move (softmax of scores linear in the margins:
    (|u| + |r|)/s times the margin bound, times the largest |z_v - pooled|). max: the same
    for the winning view, plus, when another view's margin is within the bound of the
    winner's (a near tie the other implementation may break the other way), that view's
    distance from the winner."""
    tv = np.asarray(tol_views, dtype=np.float64)
    z = np.asarray(z_views, dtype=np.float64)
    tol = tv.max(axis=1)
    margin_tol = tv.sum(axis=2)  # [N, V]: bound on the move of z1 - z0
    m = z[..., 1] - z[..., 0]
    if model.aggregator == "attention":
        a = model.attention
        pooled = torch_pooled(model, z)
        spread = np.abs(z - pooled[:, None, :]).max(axis=1)
        gain = (abs(float(a["u"])) + abs(float(a["r"]))) / float(a["margin_scale"])
        tol = tol + 2.0 * gain * margin_tol.max(axis=1, keepdims=True) * spread
    elif model.aggregator == "max":
        best = m.argmax(axis=1)
        n = np.arange(len(z))
        near = m[n, best][:, None] - m <= margin_tol + margin_tol[n, best][:, None]
        dist = np.where(near[..., None], np.abs(z - z[n, best][:, None, :]), 0.0)
        tol = tol + dist.max(axis=1)
    return tol


def torch_pooled(model: Any, z_views: np.ndarray) -> np.ndarray:
    from roadwork_assets.core.models.multiview import torch_aggregate

    z = torch.from_numpy(np.asarray(z_views, dtype=np.float64))
    return torch_aggregate(model.aggregator, z, model.attention).numpy()


@torch.no_grad()
def torch_stage2_logits(model: Any, images_uint8: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """torch's pooled stage-2 logits [N, 2] of a uint8 batch (``MultiviewModel`` as served)
    and their fp32 tolerance [N, 2] (``stage2_tolerance``)."""
    model = model.eval().cpu()
    x = _float_batch(images_uint8)
    pooled = model(x).numpy()
    base = model.base
    # ten-crop views are resized (bilinear) before the network: one more reduction whose
    # rounding torch and ORT do separately (measured: without it, a stage-2 logit gap of
    # 1.01x the bound on the awkward test set)
    resized = 1 if model.view_source == "ten_crop" else 0
    z, tol = [], []
    for view in model.views(x):
        feats = base.features(view)
        logits = base.forward_head(feats)
        z.append(logits.numpy())
        tol.append(fp32_logit_tolerance(base, feats, logits, extra_depth=resized))
    return pooled, stage2_tolerance(model, np.stack(z, axis=1), np.stack(tol, axis=1))


def onnx_stage2_logits(onnx_path: Path, images_uint8: np.ndarray,
                       opt_level: str = PARITY_OPT_LEVEL) -> np.ndarray:
    """ONNX Runtime's pooled stage-2 logits [N, 2] of the same uint8 batch."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, opt_level)
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"images": _float_batch(images_uint8).numpy()})[0]


@dataclass(frozen=True)
class CascadeParity:
    """Both stages' ``ParityReport``: passes when both do. Same surface as a ParityReport
    (``passed``, ``summary()``, ``metadata()``), so a caller judging one judges both."""

    stage1: ParityReport
    stage2: ParityReport

    @property
    def passed(self) -> bool:
        return self.stage1.passed and self.stage2.passed

    def summary(self) -> str:
        return f"stage 1: {self.stage1.summary()}; stage 2: {self.stage2.summary()}"

    def metadata(self) -> dict[str, float]:
        return {**self.stage1.metadata(),
                **{f"stage2_{k}": v for k, v in self.stage2.metadata().items()}}
