"""Which runtime computes a bundle's logits: torch or ONNX Runtime, chosen once per load.

Both engines compute the same two things ``BundlePredictor`` needs: stage 1's view
logits [N, V, 2] (the deterministic views of ``make_views``) and, for a cascade, stage
2's pooled logits [N, 2]. The ONNX engine runs the bundle's own model.onnx / stage2.onnx
at ``PARITY_OPT_LEVEL``: the level at which ``load_bundle`` compared them with torch on
the probe batch, so what it serves is what was checked (fusions at higher levels round
differently). ``auto`` picks ONNX Runtime only when the bundle has every ONNX file its
policy needs, load_bundle checked them, the device is the CPU, and a short timing on
this machine says ORT is faster.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from roadwork_assets.contracts.errors import RoadworkError
from roadwork_assets.core.data.transforms import make_views, to_float
from roadwork_assets.core.export.bundle_checks import ONNX_FILE
from roadwork_assets.core.export.cascade_serving import is_cascade
from roadwork_assets.core.export.onnx_export import ort_session
from roadwork_assets.core.export.stage2_checks import STAGE2_ONNX_FILE

ENGINES = ("auto", "torch", "onnx")


class Engine(Protocol):
    name: str

    def view_logits(self, images_uint8: np.ndarray, n_views: int, batch_size: int) -> np.ndarray: ...

    def stage2_logits(self, images_uint8: np.ndarray, batch_size: int) -> np.ndarray: ...


def _batches(images_uint8: np.ndarray, batch_size: int):
    for start in range(0, len(images_uint8), batch_size):
        chunk = np.ascontiguousarray(images_uint8[start:start + batch_size])
        yield start, to_float(torch.from_numpy(chunk))


class TorchEngine:
    name = "torch"

    def __init__(self, model: Any, stage2_model: Any, device: torch.device) -> None:
        self.model, self.stage2_model, self.device = model, stage2_model, device

    def view_logits(self, images_uint8: np.ndarray, n_views: int, batch_size: int) -> np.ndarray:
        from roadwork_assets.core.training.trainer import predict_view_logits

        return predict_view_logits(self.model, images_uint8, n_views=n_views,
                                   batch_size=batch_size, device=self.device)

    def stage2_logits(self, images_uint8: np.ndarray, batch_size: int) -> np.ndarray:
        from roadwork_assets.core.training.multiview import predict_stage2_logits

        return predict_stage2_logits(self.stage2_model, images_uint8, batch_size=batch_size,
                                     device=self.device)


class OnnxEngine:
    """``per_image``: run every image alone (batch 1), whatever ``batch_size`` says. A
    dynamically quantized network needs it: each activation's int8 scale comes from the
    min/max of the whole input tensor, batch included, so an image's scores would depend
    on the images batched with it (measured: up to 3% of a logit on the tiny test model)."""

    name = "onnx"

    def __init__(self, directory: Path, cascade: bool, threads: int | None = None,
                 per_image: bool = False) -> None:
        self.session = ort_session(directory / ONNX_FILE, threads)
        self.stage2_session = ort_session(directory / STAGE2_ONNX_FILE, threads) if cascade else None
        self.per_image = per_image

    def view_logits(self, images_uint8: np.ndarray, n_views: int, batch_size: int) -> np.ndarray:
        batch_size = 1 if self.per_image else batch_size
        out = np.empty((len(images_uint8), n_views, 2), dtype=np.float32)
        for start, batch in _batches(images_uint8, batch_size):
            for v, view in enumerate(make_views(batch, n_views)):
                out[start:start + len(batch), v] = self.session.run(
                    ["logits"], {"images": view.contiguous().numpy()})[0]
        return out

    def stage2_logits(self, images_uint8: np.ndarray, batch_size: int) -> np.ndarray:
        batch_size = 1 if self.per_image else batch_size
        out = np.empty((len(images_uint8), 2), dtype=np.float32)
        for start, batch in _batches(images_uint8, batch_size):
            out[start:start + len(batch)] = self.stage2_session.run(
                ["logits"], {"images": batch.numpy()})[0]
        return out


@dataclass(frozen=True)
class EngineChoice:
    engine: Any  # TorchEngine | OnnxEngine
    reason: str
    torch_seconds: float | None = None  # median per call of the auto timing
    onnx_seconds: float | None = None


def onnx_unavailable(bundle: Any, device: torch.device) -> str | None:
    """Why the ONNX engine cannot serve this bundle, or None when it can."""
    if device.type != "cpu":
        return f"device {device} (the ONNX engine runs on the CPU)"
    needed = [ONNX_FILE] + ([STAGE2_ONNX_FILE] if is_cascade(bundle.policy) else [])
    missing = [f for f in needed if not (bundle.directory / f).is_file()]
    if missing:
        return f"the bundle has no {', '.join(missing)}"
    if not bundle.onnx_checked:
        return "its ONNX files were not compared with torch at load (check_onnx=False)"
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "onnxruntime is not installed"
    return None


def time_engine(engine: Any, images_uint8: np.ndarray, n_views: int, repeats: int = 3) -> float:
    """Fastest of ``repeats`` timed calls of stage 1 on ``images_uint8`` after one warm-up.
    The minimum, not the median: on a shared machine other processes only ever add time,
    and a one-off choice should compare the engines, not the load at that moment."""
    engine.view_logits(images_uint8, n_views, len(images_uint8))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        engine.view_logits(images_uint8, n_views, len(images_uint8))
        times.append(time.perf_counter() - t0)
    return min(times)


def choose_engine(requested: str, bundle: Any, torch_engine: TorchEngine,
                  device: torch.device, timing_images: int = 4) -> EngineChoice:
    """``torch`` | ``onnx`` (refused with the reason when it cannot serve) | ``auto``
    (ONNX Runtime where it can serve and a one-time timing of stage 1 on
    ``timing_images`` random images says it is faster, else torch)."""
    if requested not in ENGINES:
        raise RoadworkError(f"engine {requested!r} is not one of {', '.join(ENGINES)}")
    precision = getattr(bundle.manifest, "precision", "fp32")
    if precision != "fp32":
        return _quantized_choice(requested, bundle, device, precision)
    if requested == "torch":
        return EngineChoice(torch_engine, "asked for torch")
    why_not = onnx_unavailable(bundle, device)
    if why_not is not None:
        if requested == "onnx":
            raise RoadworkError(f"the ONNX engine cannot serve this bundle: {why_not}; use "
                                "--engine torch or auto")
        return EngineChoice(torch_engine, f"auto: torch, because {why_not}")
    onnx_engine = OnnxEngine(bundle.directory, is_cascade(bundle.policy))
    if requested == "onnx":
        return EngineChoice(onnx_engine, "asked for onnx")
    size, n_views = bundle.manifest.img_size, bundle.manifest.n_views
    images = np.random.default_rng(0).integers(0, 256, (timing_images, 3, size, size),
                                               dtype=np.uint8)
    t_torch = time_engine(torch_engine, images, n_views)
    t_onnx = time_engine(onnx_engine, images, n_views)
    winner = onnx_engine if t_onnx < t_torch else torch_engine
    return EngineChoice(winner, f"auto: {winner.name} (stage 1 on {timing_images} images: "
                        f"torch {t_torch * 1e3:.1f} ms, onnx {t_onnx * 1e3:.1f} ms)",
                        t_torch, t_onnx)


def _quantized_choice(requested: str, bundle: Any, device: torch.device,
                      precision: str) -> EngineChoice:
    """A quantized bundle's policy was certified on ONNX Runtime's scores of its quantized
    files, so only that engine serves it: torch would serve the fp32 checkpoint's scores."""
    if requested == "torch":
        raise RoadworkError(f"this bundle is {precision}: its policy was certified on the "
                            "quantized ONNX model's scores, which torch does not compute; use "
                            "--engine onnx or auto, or serve the fp32 bundle it names "
                            f"(source_bundle_id {bundle.manifest.source_bundle_id})")
    why_not = onnx_unavailable(bundle, device)
    if why_not is not None:
        raise RoadworkError(f"this {precision} bundle is served by ONNX Runtime only, which "
                            f"cannot serve it: {why_not}")
    # batch 1, as certified: a dynamically quantized image's scores depend on its batch
    return EngineChoice(OnnxEngine(bundle.directory, is_cascade(bundle.policy), per_image=True),
                        f"{requested}: onnx ({precision} bundle: ONNX Runtime only, one image "
                        "per call)")
