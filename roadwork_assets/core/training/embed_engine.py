"""Which runtime computes the frozen backbone's features for the embeddings cache.

The embedding step (``pipeline.compute_embeddings``, frozen mode) maps every
deterministic view of every image through ``model.features``. ``trainer.embed_engine``
picks who computes that map:

- ``torch``: ``model.features`` (under torch.compile when ``trainer.compile``);
- ``onnx``: ``model.features`` exported to ONNX (``onnx_export.export_onnx``, into a
  temporary folder that is gone once the session has read it; one export per backbone
  and process, ``features_key``) and run by ONNX Runtime on the CPU at
  ``PARITY_OPT_LEVEL`` with intra-op threads = ``trainer.threads`` (else the cores this
  process may use). Used only after it matches torch on a probe batch, every time;
- ``auto``: ``onnx`` when it can run here, matches, and is faster; else ``torch``.

Parity (the cached features feed training, so they must be torch's up to fp32
rounding). On the probe batch (``probe_images_uint8``: half noise, half smooth), for
image n and view v with torch features f^T_nv and ONNX Runtime features f^O_nv in R^K:

    tol_nv = u · sqrt(K) · D · rms(f^T_nv),   u = 2^-24, D = reduction_depth(backbone)
    passes  iff  every f^O is finite and  r = max_nv max_k |f^O_nvk - f^T_nvk| / tol_nv <= 1

which is the feature term of the bundle's ONNX check (``fp32_logit_tolerance``: two
correct fp32 implementations of a depth-D network of width K differ per element by
about u·sqrt(K)·D·rms(f)). A failed check is an error for ``onnx`` and a WARNING plus
torch for ``auto``, both naming the gap and the tolerance.

Timing (``auto`` only): img/s_e = b / median(t_1..t_R) of R = 3 calls of engine e on
the b = 8 probe images, every view each (the parity call before them is the warm-up;
the two engines' calls alternate, so a shared machine's load falls on both). ORT is
chosen iff img/s_onnx > img/s_torch. Export and timing happen once per backbone, size,
thread count (and n_views, for the timing) and process: the splits after the first
reuse them, re-checking parity only.

torch.compile is a torch-engine option: with ``trainer.compile`` on, ``auto`` keeps the
compiled torch engine without timing (a fair timing would first pay the compile, tens
of seconds on CPU, which auto's short probe exists to avoid), and ``onnx`` runs ONNX
Runtime uncompiled (compile still applies to training and logits); parity is always
judged against eager torch.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from roadwork_assets.contracts.errors import BadInputError, RoadworkError
from roadwork_assets.core.export.onnx_export import (
    FP32_UNIT_ROUNDOFF,
    PARITY_OPT_LEVEL,
    export_onnx,
    probe_images_uint8,
    reduction_depth,
)
from roadwork_assets.core.models.classifier import RoadworkClassifier
from roadwork_assets.core.training.config import TrainerConfig
from roadwork_assets.core.training.trainer import view_embedder

log = logging.getLogger(__name__)

EMBED_ENGINES = ("auto", "torch", "onnx")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # the exporter colours its messages for a terminal
FEATURES_OUTPUT = "features"
PROBE_IMAGES = 8
TIMED_CALLS = 3

Embed = Callable[[np.ndarray], np.ndarray]  # uint8 [b, 3, S, S] -> float32 [b, V, D]


class EmbedEngineError(RoadworkError):
    """``embed_engine='onnx'`` was asked for, but ONNX Runtime cannot compute the
    features here, or not faithfully."""


class _Features(nn.Module):
    """``model.features`` as a module: what ``torch.onnx.export`` needs."""

    def __init__(self, model: RoadworkClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.features(images)


def feature_tolerance(model: RoadworkClassifier, feats: np.ndarray) -> np.ndarray:
    """[N, V, K] torch features -> [N, V] bound u·sqrt(K)·D·rms(f_nv) (module docstring)."""
    rms = np.sqrt(np.mean(np.square(feats.astype(np.float64)), axis=-1))
    k, depth = float(model.num_features), reduction_depth(model.backbone)
    return FP32_UNIT_ROUNDOFF * math.sqrt(k) * depth * rms


@dataclass(frozen=True)
class FeatureParity:
    """torch vs ONNX Runtime features on the probe batch."""

    n_images: int
    n_views: int
    max_abs_diff: float   # max over every image, view and feature
    tolerance: float      # tol_nv at the worst (image, view): largest gap / tolerance
    worst_ratio: float    # r of the module docstring; passes at <= 1
    worst_image: int
    finite: bool = True

    @property
    def passed(self) -> bool:
        return self.finite and self.worst_ratio <= 1.0

    def summary(self) -> str:
        if not self.finite:
            return "ONNX Runtime returned NaN/inf features on the probe batch"
        return (f"feature gap {self.max_abs_diff:.2e}, worst {self.worst_ratio:.3g}x its fp32 "
                f"tolerance {self.tolerance:.2e} (probe image {self.worst_image} of "
                f"{self.n_images}, {self.n_views} view(s), ORT {PARITY_OPT_LEVEL})")


def feature_parity(model: RoadworkClassifier, f_torch: np.ndarray, f_onnx: np.ndarray,
                   tolerance_scale: float = 1.0) -> FeatureParity:
    """Judge two [N, V, K] feature arrays of the same probe batch (module docstring).
    ``tolerance_scale`` multiplies tol_nv (1 = the fp32 bound)."""
    n, v = f_torch.shape[:2]
    if not np.isfinite(f_onnx).all():
        return FeatureParity(n, v, math.inf, 0.0, math.inf, 0, finite=False)
    gap = np.abs(f_onnx.astype(np.float64) - f_torch.astype(np.float64)).max(axis=-1)
    tol = feature_tolerance(model, f_torch) * tolerance_scale
    ratio = gap / np.maximum(tol, np.finfo(np.float64).tiny)
    worst = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
    return FeatureParity(n_images=n, n_views=v, max_abs_diff=float(gap.max()),
                         tolerance=float(tol[worst]), worst_ratio=float(ratio[worst]),
                         worst_image=int(worst[0]))


@dataclass
class Embedder:
    """The chosen engine's ``embed(batch)`` and what decided it. Calls are timed, so
    ``metadata`` also reports the split's own throughput (engine time, decode excluded)."""

    fn: Embed
    engine: str  # "torch" | "onnx"
    reason: str
    torch_img_per_s: float | None = None
    onnx_img_per_s: float | None = None
    parity: FeatureParity | None = None
    images: int = 0
    seconds: float = 0.0

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        out = self.fn(batch)
        self.seconds += time.perf_counter() - t0
        self.images += len(batch)
        return out

    def metadata(self) -> dict[str, str | float]:
        """Flat entries for the embeddings asset's metadata."""
        out: dict[str, str | float] = {"embed_engine": self.engine,
                                       "embed_engine_reason": self.reason}
        if self.torch_img_per_s is not None:
            out["embed_torch_img_per_s"] = self.torch_img_per_s
        if self.onnx_img_per_s is not None:
            out["embed_onnx_img_per_s"] = self.onnx_img_per_s
        if self.parity is not None and self.parity.finite:
            out["embed_onnx_max_abs_diff"] = self.parity.max_abs_diff
            out["embed_onnx_tolerance_ratio"] = self.parity.worst_ratio
        if self.seconds > 0:
            out["embed_img_per_s"] = self.images / self.seconds
        return out


def no_embedding_metadata(mode: str) -> dict[str, str]:
    """The same metadata keys when the step runs no backbone (end_to_end caches images)."""
    return {"embed_engine": "none",
            "embed_engine_reason": f"mode={mode} caches decoded images: no backbone runs here"}


def features_key(model: RoadworkClassifier, img_size: int, threads: int | None) -> str:
    """sha256 over what ``model.features`` computes with (every backbone tensor's name,
    dtype, shape and bytes; the input normalisation), the image size and ORT's threads."""
    h = hashlib.sha256(f"{type(model.backbone).__name__}|{img_size}|{threads}".encode())
    state = {f"backbone.{k}": v for k, v in model.backbone.state_dict().items()}
    for name, t in sorted({**state, "mean": model.mean, "std": model.std}.items()):
        flat = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{flat.dtype}|{tuple(t.shape)}".encode())
        h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# The last exported backbone's ORT function (or the export's error), by
# ``features_key``, and auto's timing of it per n_views: every split's embeddings step
# of one in-process run uses the same backbone, so one export (7 s for ViT-S/14 at 224
# on 2 cores), one failed attempt, and one timing (8 probe passes: 6-30 s there,
# with the machine's load) serve all of them. Never trusted blindly: each
# ``choose_embedder`` call checks the function against its own torch model first.
_LAST_EXPORT: dict[str, Callable[[torch.Tensor], torch.Tensor] | Exception] = {}
_TIMED: dict[tuple[str, int], dict[str, float]] = {}


def forget_exports() -> None:
    """Drop the remembered export and timing (the next call exports and times afresh)."""
    _LAST_EXPORT.clear()
    _TIMED.clear()


def ort_features(model: RoadworkClassifier, img_size: int, threads: int | None,
                 key: str | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``model.features`` exported to ONNX and loaded into an ORT CPU session (reused when
    this process exported the same backbone last; a failed export raises its error
    again); the export lives in a temporary folder only until the session has read it.
    ``key``: ``features_key(model, img_size, threads)`` when the caller has it."""
    key = key or features_key(model, img_size, threads)
    if key not in _LAST_EXPORT:
        forget_exports()  # one session held at a time: a backbone's weights each
        try:
            _LAST_EXPORT[key] = _export_ort_features(model, img_size, threads)
        except Exception as exc:  # kept to re-raise for the next split, not swallowed
            _LAST_EXPORT[key] = exc
    found = _LAST_EXPORT[key]
    if isinstance(found, Exception):
        raise found
    return found


def _export_ort_features(model: RoadworkClassifier, img_size: int,
                         threads: int | None) -> Callable[[torch.Tensor], torch.Tensor]:
    from roadwork_assets.core.export.onnx_export import ort_session

    with tempfile.TemporaryDirectory(prefix="roadwork_embed_onnx_") as tmp:
        path = export_onnx(_Features(model), img_size, Path(tmp) / "features.onnx",
                           output_name=FEATURES_OUTPUT)
        session = ort_session(path, threads, PARITY_OPT_LEVEL)

    def run(views: torch.Tensor) -> torch.Tensor:
        feed = {"images": views.detach().cpu().contiguous().numpy()}
        return torch.from_numpy(session.run([FEATURES_OUTPUT], feed)[0])

    return run


def _onnx_unavailable(cfg: TrainerConfig, device: torch.device) -> str | None:
    """Why ONNX Runtime cannot embed here (None when it can)."""
    if device.type != "cpu":
        return f"trainer.device resolves to {device} and ONNX Runtime runs on the CPU"
    if cfg.embed_engine == "auto" and cfg.compile:
        return ("trainer.compile=True: compile is a torch-engine option, so auto keeps the "
                "compiled torch engine untimed (embed_engine='onnx' embeds with ONNX Runtime "
                "and keeps compile for training and logits)")
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "onnxruntime is not installed"
    return None


def _refuse_or_fall_back(cfg: TrainerConfig, torch_fn: Embed, why: str,
                         parity: FeatureParity | None = None) -> Embedder:
    if cfg.embed_engine == "onnx":
        raise EmbedEngineError(f"trainer.embed_engine='onnx' cannot embed: {why}; set "
                               "trainer.embed_engine='torch' (or 'auto')")
    log.warning("trainer.embed_engine=auto: embedding with torch because %s", why)
    return Embedder(torch_fn, "torch", f"auto: torch, because {why}", parity=parity)


def interleaved_img_per_s(embedders: dict[str, Embed], images: np.ndarray,
                          repeats: int = TIMED_CALLS) -> dict[str, float]:
    """img/s of each embedder: len(images) / median of ``repeats`` timed calls, the
    embedders' calls taken in turn, so that on a shared machine both see the same load."""
    times: dict[str, list[float]] = {name: [] for name in embedders}
    for _ in range(repeats):
        for name, fn in embedders.items():
            t0 = time.perf_counter()
            fn(images)
            times[name].append(time.perf_counter() - t0)
    return {name: len(images) / statistics.median(t) for name, t in times.items()}


def choose_embedder(model: RoadworkClassifier, cfg: TrainerConfig, *, n_images: int | None = None,
                    tolerance_scale: float = 1.0) -> Embedder:
    """The embedder ``cfg.embed_engine`` asks for (module docstring). ``n_images``: how
    many images it will embed (0: an empty shard, torch without export or timing);
    ``tolerance_scale`` multiplies the parity bound (1 in the graph)."""
    if cfg.embed_engine not in EMBED_ENGINES:
        raise BadInputError(f"trainer.embed_engine={cfg.embed_engine!r} is not one of "
                            f"{', '.join(EMBED_ENGINES)}")
    device = cfg.resolved_device()
    torch_fn = view_embedder(model, n_views=cfg.n_views, device=device, compile_settings=cfg)
    if cfg.embed_engine == "torch":
        return Embedder(torch_fn, "torch", "asked for torch")
    if n_images == 0:
        return Embedder(torch_fn, "torch", f"{cfg.embed_engine}: torch, no images to embed")
    why_not = _onnx_unavailable(cfg, device)
    if why_not is not None and cfg.embed_engine == "auto":  # expected here: no warning
        return Embedder(torch_fn, "torch", f"auto: torch, because {why_not}")
    if why_not is not None and device.type != "cpu":
        raise BadInputError(f"trainer.embed_engine='onnx' runs ONNX Runtime on the CPU, but "
                            f"trainer.device resolves to {device}: set trainer.device='cpu' "
                            "or trainer.embed_engine='torch' / 'auto'")
    if why_not is not None:
        return _refuse_or_fall_back(cfg, torch_fn, why_not)
    key = features_key(model, cfg.img_size, cfg.threads)
    try:
        onnx_fn = view_embedder(model, n_views=cfg.n_views, device=device,
                                features=ort_features(model, cfg.img_size, cfg.threads, key))
    except Exception as exc:  # the exporter's many failure types: named, never swallowed
        first = _ANSI.sub("", str(exc)).splitlines()[0][:300] if str(exc) else ""
        return _refuse_or_fall_back(cfg, torch_fn, f"the ONNX export of {cfg.backbone} failed "
                                    f"({type(exc).__name__}: {first})")
    eager_fn = view_embedder(model, n_views=cfg.n_views, device=device) if cfg.compile else torch_fn
    probe = probe_images_uint8(PROBE_IMAGES, cfg.img_size)
    parity = feature_parity(model, eager_fn(probe), onnx_fn(probe), tolerance_scale)
    if not parity.passed:
        return _refuse_or_fall_back(cfg, torch_fn, "ONNX Runtime's features differ from torch's "
                                    f"beyond fp32 rounding: {parity.summary()}", parity)
    if cfg.embed_engine == "onnx":
        note = " (compile applies to the torch engine only)" if cfg.compile else ""
        return Embedder(onnx_fn, "onnx", f"asked for onnx{note}; {parity.summary()}",
                        parity=parity)
    rates, when = _TIMED.get((key, cfg.n_views)), ", timed earlier in this process"
    if rates is None:
        rates, when = interleaved_img_per_s({"torch": torch_fn, "onnx": onnx_fn}, probe), ""
        _TIMED[(key, cfg.n_views)] = rates
    winner = "onnx" if rates["onnx"] > rates["torch"] else "torch"
    return Embedder(onnx_fn if winner == "onnx" else torch_fn, winner,
                    f"auto: {winner} ({len(probe)} probe images x {cfg.n_views} view(s): torch "
                    f"{rates['torch']:.1f} img/s, onnx {rates['onnx']:.1f} img/s{when}; "
                    f"{parity.summary()})",
                    torch_img_per_s=rates["torch"], onnx_img_per_s=rates["onnx"], parity=parity)
