"""ONNX export at a fixed spatial size, and parity judged on what is served.

Parity compares what a miner emits — the calibrated, remapped probability and the
decision of the bundle's own policy — between torch and ONNX Runtime on a probe batch,
with a tolerance derived from the model's fp32 rounding scale (``fp32_logit_tolerance``),
not a fixed number on raw logits.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from roadwork_assets.core.artifacts import atomic_path
from roadwork_assets.core.calibration.policies import apply_policy as _apply_policy
from roadwork_assets.core.data.transforms import make_views, to_float
from roadwork_assets.core.models.classifier import RoadworkClassifier

FP32_UNIT_ROUNDOFF = 2.0 ** -24
# ORT_ENABLE_BASIC only folds constants and removes redundant nodes (exact rewrites).
# EXTENDED / ALL add fusions (attention, LayerNorm, GELU) whose kernels round
# differently: on a random-init DINOv2 ViT-S/14 at 224 px they moved logits 13x more
# than BASIC (6.4e-2 vs 4.7e-3; DISABLE_ALL = BASIC). Parity should measure the export,
# not the fusions, so the check runs at BASIC.
PARITY_OPT_LEVEL = "ORT_ENABLE_BASIC"
_PROB_SLACK = 1e-12  # float64 arithmetic inside the policy (calibrator, remap)


def export_onnx(model: nn.Module, img_size: int, dest: Path,
                output_name: str = "logits") -> Path:
    """Write ``model`` as ONNX: input ``images`` float [B, 3, S, S] in [0, 1] ->
    ``output_name`` (``logits``; the embedding step's backbone export names it
    ``features``, ``core.training.embed_engine``).

    The spatial size is fixed (StreetVision serves 224x224; ViT position embeddings are
    fixed too); the batch dimension is dynamic. PEFT adapters must be merged first.
    """
    model = model.eval().cpu()
    example = torch.rand(2, 3, img_size, img_size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with atomic_path(dest) as tmp:
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            input_names=["images"],
            output_names=[output_name],
            dynamic_shapes=({0: batch},),
            external_data=False,
            verbose=False,
        )
        program.save(str(tmp), external_data=False)
    return dest


def reduction_depth(backbone: nn.Module) -> int:
    """D: how many weighted reductions (Linear / Conv layers) the backbone chains."""
    return max(1, sum(isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) for m in backbone.modules()))


@torch.no_grad()
def fp32_logit_tolerance(model: RoadworkClassifier, feats: torch.Tensor,
                         logits: torch.Tensor, extra_depth: int = 0) -> np.ndarray:
    """Per-image, per-logit bound on |z_onnx - z_torch| that fp32 rounding alone allows.

    Derivation (rounding-error analysis, probabilistic form; u = 2^-24):
    - a length-K fp32 dot product carries a relative error of about u·sqrt(K)
      (K = the width, ``num_features``);
    - the backbone chains D such reductions (``reduction_depth``: its Linear / Conv
      layers); through normalised, residual layers each one's error reaches the output
      at about unit gain and they add, so an element of the features f of image n may
      differ between two correct fp32 implementations by about u·sqrt(K)·D·rms(f_n);
    - the head is z_j = W_j·(f - mu)/sigma + b_j, so a feature error with independent
      signs moves z_j by ||W_j / sigma||_2 times its size. This is the model's own
      scale: a linear probe on features of tiny variance (a random-init ViT: sigma ~
      1e-5) amplifies rounding 1e5-fold, and so must the tolerance;
    - plus the head's own rounding, u·sqrt(K)·|z_j|.
    tol[n, j] = u·sqrt(K)·(D·||W_j/sigma||_2·rms(f_n) + |z_nj|).
    ``extra_depth``: reductions made before the network whose rounding the two
    implementations do separately (stage 2's crop-and-resize, a 4-tap bilinear sum per
    pixel): each adds one to D, like a layer.

    Measured against this bound (max |dz| / (u·sqrt(K)·||W/sigma||_2·rms f), i.e. in
    units of tol/D): random-init DINOv2 ViT-S/14 at 224 px 0.02 (ORT BASIC) and 0.31
    (ORT ALL), D = 49; timm test_vit 2.7, D = 25; test_resnet 0.8, D = 15.
    """
    k = float(model.num_features)
    depth = reduction_depth(model.backbone) + extra_depth
    gain = (model.head.weight / model.feat_std).norm(dim=1).double()  # [2]
    rms = feats.double().pow(2).mean(dim=1).sqrt()  # [N]
    tol = FP32_UNIT_ROUNDOFF * math.sqrt(k) * (
        depth * rms[:, None] * gain[None, :] + logits.double().abs()
    )
    return tol.numpy()


@dataclass(frozen=True)
class ParityReport:
    """torch vs ONNX Runtime on a probe batch, judged on the served quantities."""

    n_images: int
    n_views: int
    opt_level: str
    max_logit_gap: float
    max_logit_tolerance: float
    prob_gap: float          # |p_onnx - p_torch| at the worst image (largest gap / tolerance)
    prob_tolerance: float    # what fp32 allows there
    worst_image: int
    decision_disagreements: int  # images whose decision differs, none near a boundary
    near_boundary: tuple[int, ...] = field(default_factory=tuple)
    finite: bool = True

    @property
    def passed(self) -> bool:
        return self.finite and self.prob_gap <= self.prob_tolerance and not self.decision_disagreements

    def summary(self) -> str:
        """One line: the measured gap, the tolerance, the decisions."""
        if not self.finite:
            return "ONNX Runtime returned NaN/inf logits on the probe batch: re-export the model"
        return (
            f"served probability gap {self.prob_gap:.2e} vs tolerance {self.prob_tolerance:.2e} "
            f"(probe image {self.worst_image}); logit gap {self.max_logit_gap:.2e} vs fp32 "
            f"tolerance {self.max_logit_tolerance:.2e}; {self.decision_disagreements} decision(s) "
            f"differ away from a boundary, {len(self.near_boundary)} of {self.n_images} probe "
            f"image(s) within tolerance of one; ORT {self.opt_level}"
        )

    def metadata(self) -> dict[str, float]:
        return {
            "onnx_served_prob_gap": self.prob_gap,
            "onnx_served_prob_tolerance": self.prob_tolerance,
            "onnx_max_abs_diff": self.max_logit_gap,
            "onnx_logit_tolerance": self.max_logit_tolerance,
            "onnx_decision_disagreements": float(self.decision_disagreements),
            "onnx_near_boundary_images": float(len(self.near_boundary)),
        }


def probe_images_uint8(n: int, img_size: int, seed: int = 0) -> np.ndarray:
    """[n, 3, S, S] uint8, like decoded images: half white noise, half smooth (upsampled
    4x4 colour fields), so both ends of the spectrum are probed. A bundle stores this
    batch (``probe.npz``) so ``verify`` can re-run it."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, (n - n // 2, 3, img_size, img_size))
    coarse = torch.from_numpy(rng.integers(0, 256, (n // 2, 3, 4, 4)).astype(np.float32))
    smooth = torch.nn.functional.interpolate(coarse, size=(img_size, img_size), mode="bilinear",
                                             align_corners=False).round().numpy()
    return np.concatenate([noise, smooth]).clip(0, 255).astype(np.uint8)


def probe_images(n: int, img_size: int, seed: int = 0) -> np.ndarray:
    """``probe_images_uint8`` as the model sees it: float32 in [0, 1]."""
    return to_float(torch.from_numpy(probe_images_uint8(n, img_size, seed))).numpy()


@torch.no_grad()
def torch_probe_logits(model: RoadworkClassifier, images_uint8: np.ndarray,
                       n_views: int) -> tuple[np.ndarray, np.ndarray]:
    """torch's [N, V, 2] view logits of a uint8 probe batch and their fp32 tolerance."""
    model = model.eval().cpu()
    z, tol = [], []
    for view in make_views(to_float(torch.from_numpy(np.ascontiguousarray(images_uint8))),
                           n_views):
        feats = model.features(view)
        logits = model.forward_head(feats)
        z.append(logits.numpy())
        tol.append(fp32_logit_tolerance(model, feats, logits))
    return np.stack(z, axis=1), np.stack(tol, axis=1)


def onnx_probe_logits(onnx_path: Path, images_uint8: np.ndarray, n_views: int,
                      opt_level: str = PARITY_OPT_LEVEL) -> np.ndarray:
    """ONNX Runtime's [N, V, 2] view logits of the same probe batch (same views)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, opt_level)
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    views = make_views(to_float(torch.from_numpy(np.ascontiguousarray(images_uint8))), n_views)
    return np.stack([session.run(["logits"], {"images": v.contiguous().numpy()})[0]
                     for v in views], axis=1)


def onnx_parity(model: RoadworkClassifier, onnx_path: Path, img_size: int, policy: Any,
                n_views: int, n: int = 8, seed: int = 0,
                opt_level: str = PARITY_OPT_LEVEL,
                images_uint8: np.ndarray | None = None) -> ParityReport:
    """Run torch and ONNX Runtime on every test-time view of a probe batch
    (``images_uint8``, default ``probe_images_uint8(n, img_size, seed)``), apply the
    bundle's ``policy`` to both, and compare what is served.

    Passes when, on every probe image, the ONNX probability lies inside the interval
    the policy maps torch's logits +- ``fp32_logit_tolerance`` to (every calibrator and
    remap is monotone in each logit, so the interval's ends are the policy at the two
    shifted logit vectors), and the decisions agree except on images whose decision
    changes within that interval (near a boundary; counted, not failed).
    """
    images = probe_images_uint8(n, img_size, seed) if images_uint8 is None else images_uint8
    zt, tz = torch_probe_logits(model, images, n_views)
    zo = onnx_probe_logits(onnx_path, images, n_views, opt_level)
    return judge_served(policy, zt, zo, tz, opt_level=opt_level)


def judge_served(policy: Any, z_torch: np.ndarray, z_onnx: np.ndarray, tol: np.ndarray,
                 opt_level: str = PARITY_OPT_LEVEL,
                 serve: Callable[[Any, np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None,
                 ) -> ParityReport:
    """Compare the policy's output on two [N, V, 2] view-logit arrays, given the
    per-logit fp32 tolerance ``tol`` [N, V, 2] around ``z_torch``. ``serve(policy, z)``
    -> (decision, probability) is what is compared, ``apply_policy`` unless given (a
    cascade's stages: ``core.export.cascade_bundle``); it must be monotone in each logit."""
    apply_policy = serve or _apply_policy
    zt, zo, tz = (np.asarray(a, dtype=np.float64) for a in (z_torch, z_onnx, tol))
    n, n_views = zt.shape[:2]
    if not np.isfinite(zo).all():
        return ParityReport(n, n_views, opt_level, math.inf, float(tz.max()), math.inf, 0.0, 0,
                            0, finite=False)
    toward_pos = np.stack([-tz[..., 0], tz[..., 1]], axis=-1)  # raises P(roadwork)
    d_t, p_t = apply_policy(policy, zt)
    d_o, p_o = apply_policy(policy, zo)
    d_lo, p_lo = apply_policy(policy, zt - toward_pos)
    d_hi, p_hi = apply_policy(policy, zt + toward_pos)
    allowed = np.where(p_o >= p_t, np.maximum(p_hi, p_t) - p_t, p_t - np.minimum(p_lo, p_t))
    allowed = allowed + _PROB_SLACK
    gap = np.abs(p_o - p_t)
    worst = int(np.argmax(gap / allowed))
    near = (d_lo != d_t) | (d_hi != d_t)
    return ParityReport(
        n_images=n, n_views=n_views, opt_level=opt_level,
        max_logit_gap=float(np.abs(zo - zt).max()), max_logit_tolerance=float(tz.max()),
        prob_gap=float(gap[worst]), prob_tolerance=float(allowed[worst]), worst_image=worst,
        decision_disagreements=int(((d_o != d_t) & ~near).sum()),
        near_boundary=tuple(int(i) for i in np.flatnonzero(near)),
    )


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def ort_session(path: Path, threads: int | None = None, opt_level: str = PARITY_OPT_LEVEL):
    """An ORT CPU session with explicit threads: intra-op = the cores this process may
    use, inter-op 1 and sequential execution, so one inference never oversubscribes the
    cores (ORT's default counts the machine's cores, not the affinity mask)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, opt_level)
    options.intra_op_num_threads = threads or available_cores()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
