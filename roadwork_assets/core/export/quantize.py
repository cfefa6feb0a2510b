"""INT8 dynamic quantization of a bundle's ONNX networks, and its re-certified policy.

Dynamic quantization (ONNX Runtime ``quantize_dynamic``): weights are stored as int8
once; each activation tensor entering a quantized op is quantized per call, with a
scale and zero point from that tensor's own min/max (uint8, ``DynamicQuantizeLinear``).
A quantized op then runs in integers (``ConvInteger`` / ``MatMulInteger``, exact int32
accumulation) and is rescaled to fp32. Which ops quantize (measured here, ORT 1.32, with
``op_types`` Conv + MatMul): Conv -> ConvInteger (a CNN's convolutions, a ViT's patch
embedding), MatMul -> MatMulInteger (a ViT's attention and MLP projections), and the
linear head's Gemm -> MatMulInteger + Add; normalisation, activations, pooling, resize
and the views' slicing stay fp32. Both integer ops run on this CPU's ORT build with int8
weights (the tests load and run every quantized file).

Why the policy is fitted again. The exit policy's FNR guarantee (conformal risk
control) holds for the scores it was certified on: E[L(λ̂)] <= α is a statement about
the score distribution of *that* model on exchangeable data. The quantized model's
scores s8 differ from the fp32 scores s32 (by up to a few quantization steps per op),
so λ̂ certified on s32 says nothing about s8. The only sound fix is to re-run the
certification on s8: score val_calib with the quantized networks, fit the calibrator(s)
on the fit part, and certify λ̂ on the threshold part, exactly as the fp32 policy asset
does (``fit_cascade_policy`` / ``fit_policy``). A quantized bundle whose re-fitted
policy has no certified λ, or whose bound exceeds α, is refused (``GuaranteeNotMet``).
"""

from __future__ import annotations

import collections
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from roadwork_assets.contracts.errors import InsufficientDataError
from roadwork_assets.core.artifacts import atomic_path

PRECISION_INT8 = "int8-dynamic"
INTEGER_OPS = ("ConvInteger", "MatMulInteger", "DynamicQuantizeMatMul", "QAttention",
               "DynamicQuantizeLSTM")
FLOAT_WEIGHTED_OPS = ("Conv", "MatMul", "Gemm")


class GuaranteeNotMet(InsufficientDataError):
    """The quantized model's re-fitted policy does not certify FNR <= alpha."""


class QuantizeConfig(BaseModel):
    """How the networks are quantized (ORT ``quantize_dynamic`` arguments).

    ``op_types``: which ops become integer ops; Conv and MatMul carry nearly all the
    FLOPs of a ViT or CNN. ``reduce_range``: 7-bit weights, for CPUs without VNNI whose
    u8 x s8 kernels can saturate (this one has VNNI). ``batch_size``: val_calib images
    scored per ORT call.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    weight_type: Literal["qint8", "quint8"] = "qint8"
    per_channel: bool = False
    reduce_range: bool = False
    op_types: tuple[str, ...] = ("Conv", "MatMul")
    batch_size: int = Field(32, ge=1)

    def record(self) -> dict[str, Any]:
        return {**self.model_dump(mode="json"), "precision": PRECISION_INT8}


def op_counts(onnx_path: Path) -> dict[str, int]:
    """op_type -> count over the graph (and its subgraphs are not used by these models)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return dict(collections.Counter(n.op_type for n in model.graph.node))


def quantize_onnx(src: Path, dest: Path, config: QuantizeConfig) -> dict[str, Any]:
    """Write ``src`` quantized (dynamic INT8) to ``dest`` atomically; returns what changed:
    integer ops made, weighted ops left in fp32, and both file sizes."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    weight = QuantType.QInt8 if config.weight_type == "qint8" else QuantType.QUInt8
    with tempfile.TemporaryDirectory(prefix="quantize-") as tmp:
        # quantize_dynamic writes beside its output; keep that in a private folder
        out = Path(tmp) / "q.onnx"
        quantize_dynamic(str(src), str(out), weight_type=weight,
                         per_channel=config.per_channel, reduce_range=config.reduce_range,
                         op_types_to_quantize=list(config.op_types))
        with atomic_path(dest) as staged:
            shutil.copyfile(out, staged)
    counts = op_counts(dest)
    return {
        "integer_ops": {k: v for k, v in counts.items() if k in INTEGER_OPS},
        "float_weighted_ops": {k: v for k, v in counts.items() if k in FLOAT_WEIGHTED_OPS},
        "fp32_bytes": Path(src).stat().st_size,
        "int8_bytes": Path(dest).stat().st_size,
    }


def score_images(engine: Any, load_batch: Any, n: int, n_views: int, cascade: bool,
                 batch_size: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Stage-1 view logits [n, V, 2] (and a cascade's stage-2 logits [n, 2]) of ``n``
    images, decoded ``batch_size`` at a time by ``load_batch(start, stop)`` -> uint8
    [k, 3, S, S]: memory stays bounded by the batch, not the split."""
    z1 = np.empty((n, n_views, 2), dtype=np.float32)
    z2 = np.empty((n, 2), dtype=np.float32) if cascade else None
    for start in range(0, n, batch_size):
        stop = min(n, start + batch_size)
        images = load_batch(start, stop)
        z1[start:stop] = engine.view_logits(images, n_views, batch_size)
        if z2 is not None:
            z2[start:stop] = engine.stage2_logits(images, batch_size)
    return z1, z2


class CalibScores(BaseModel):
    """val_calib as the policy fitters take it, scored by one model."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    view_logits: Any  # [N, V, 2]
    stage2_logits: Any = None  # [N, 2], a cascade only
    labels: Any
    item_ids: Sequence[str]
    group_keys: Sequence[str] | None = None


def refit_policy(kind: str, scores: CalibScores, policy_config: Any,
                 cascade_config: Any = None) -> Any:
    """The policy of ``kind`` fitted on ``scores`` the way its asset fits it on
    logits[val_calib] (same settings, same split of val_calib into fit / threshold parts),
    refused (``GuaranteeNotMet``) unless its FNR guarantee holds at ``alpha``."""
    from roadwork_assets.core.calibration.cascade import fit_cascade_policy
    from roadwork_assets.core.calibration.policies import fit_policy

    groups = None if scores.group_keys is None else list(scores.group_keys)
    try:
        if kind == "cascade":
            params = fit_cascade_policy(
                scores.view_logits, scores.stage2_logits, scores.labels, list(scores.item_ids),
                groups, policy=policy_config, cascade=cascade_config)
        else:
            params = fit_policy(kind, scores.view_logits, scores.labels, list(scores.item_ids),
                                groups=groups, config=policy_config)
    except InsufficientDataError as exc:
        raise GuaranteeNotMet(
            f"refusing the INT8 bundle: re-certifying the {kind!r} policy on the quantized "
            f"model's own val_calib scores found no certified lambda at alpha = "
            f"{_alpha(kind, policy_config, cascade_config):g} ({' '.join(str(exc).split())}). "
            "Serve the fp32 bundle, add calibration data, or raise alpha") from exc
    check_guarantee(params)
    return params


def _alpha(kind: str, policy_config: Any, cascade_config: Any) -> float:
    return float(cascade_config.alpha if kind == "cascade" else policy_config.alpha)


def guarantee_bound(params: Any) -> float | None:
    """The certified bound on the FNR at the served threshold where the policy records
    one (a cascade's ``crc_bound``); one-stage policies refuse at fit time instead."""
    bound = getattr(params, "crc_bound", None)
    return None if bound is None else float(bound)


def check_guarantee(params: Any) -> None:
    """Refuse a fitted policy whose certified bound exceeds its alpha."""
    bound, alpha = guarantee_bound(params), getattr(params, "alpha", None)
    if bound is not None and alpha is not None and bound > alpha + 1e-12:
        raise GuaranteeNotMet(
            f"refusing the INT8 bundle: the {params.kind!r} policy re-certified on the "
            f"quantized model's val_calib scores has CRC bound {bound:.4g} > alpha = "
            f"{alpha:g}, so its FNR guarantee no longer holds. Serve the fp32 bundle, add "
            "calibration data, or raise alpha")


def decoder(uris: Sequence[str], item_ids: Sequence[str], img_size: int):
    """``load_batch(start, stop)`` -> uint8 [k, 3, S, S]: the images decoded and resized as
    the embeddings cache decodes them (``decode_image`` + ``to_model_array``)."""
    from roadwork_assets.core.data.images import decode_image
    from roadwork_assets.core.data.transforms import to_model_array

    def load_batch(start: int, stop: int) -> np.ndarray:
        return np.stack([to_model_array(decode_image(Path(uris[i]), str(item_ids[i])), img_size)
                         for i in range(start, stop)])

    return load_batch


def served_metrics(policy: Any, view_logits: Any, stage2_logits: Any, labels: Any
                   ) -> dict[str, float]:
    """What ``policy`` serves on these scores, binarised at 0.5 as the validator does
    (np.round: a deferral is emitted as roadwork): accuracy, MCC, FNR, FPR, and the share
    of images stage 2 decided."""
    from roadwork_assets.core.calibration.metrics import _mcc_from_counts
    from roadwork_assets.core.export.cascade_serving import served_outputs

    z2 = None if stage2_logits is None else np.asarray(stage2_logits, dtype=np.float64)
    _, prob, stage = served_outputs(policy, np.asarray(view_logits, dtype=np.float64), z2)
    pred, y = np.round(prob).astype(int), np.asarray(labels).astype(int)
    tp, tn = int(((pred == 1) & (y == 1)).sum()), int(((pred == 0) & (y == 0)).sum())
    fp, fn = int(((pred == 1) & (y == 0)).sum()), int(((pred == 0) & (y == 1)).sum())
    return {"accuracy": (tp + tn) / max(len(y), 1),
            "mcc": float(_mcc_from_counts(tp, tn, fp, fn)),
            "fnr": fn / max(tp + fn, 1), "fpr": fp / max(fp + tn, 1),
            "stage2_rate": float(np.mean(stage == 2))}


def ort_latency(onnx_path: Path, img_size: int, repeats: int = 15) -> float:
    """Median seconds of one ONNX Runtime call on one image (batch 1), as served."""
    from roadwork_assets.core.export.onnx_export import ort_session
    from roadwork_assets.core.models.latency import median_seconds

    session = ort_session(Path(onnx_path))
    x = np.random.default_rng(0).random((1, 3, img_size, img_size), dtype=np.float32)
    return median_seconds(lambda: session.run(["logits"], {"images": x}), repeats=repeats)
