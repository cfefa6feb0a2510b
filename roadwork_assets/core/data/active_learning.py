"""Which unlabelled images to label next: the served bundle's uncertainty, made diverse.

Uncertainty u_i of pool image i, from the bundle's own policy on its view logits:
- a ``gate`` policy: the learned failure gate's g_i = P(stage-1 decision wrong)
  (``core.calibration.gate``), the signal the bundle defers on;
- any other policy (softmax, scrc, cascade): u_i = min(p_i, 1 - p_i) with p_i the
  calibrated stage-1 P(roadwork) (``policy_probability``): the max-prob baseline the
  gate is measured against. With one probability, max-prob, margin and entropy rank
  images identically (``core.calibration.uncertainty``), so nothing is lost by it.

Diversity, by a greedy pick that multiplies uncertainty by novelty, on the model's own
embeddings e_i (the backbone features the head reads), centred on the pool mean and
L2-normalised (ê_i), with ũ_i = u_i / max_j u_j and the distance to the picks so far
d_i(S) = min(1, min_{j in S} (1 - ê_i · ê_j)) (d = 1 while S is empty):

    pick  i* = argmax_{i not in S}  ũ_i · d_i(S)^β

until k are picked. Twenty frames of one scene embed almost identically (d ≈ 0.1 once
one of them is in S), so each further frame keeps a tenth of its uncertainty, whatever
that uncertainty is, while an unrelated image keeps it whole. A product, not an additive
trade-off (MMR's (1 - λ) ũ - λ sim): with an additive term, a scene slightly more
uncertain than the rest re-enters the queue as soon as the other candidates are a bit
similar to each other, which the embeddings of an untrained or frozen model often are.
An image the model is sure of (u = 0) is never worth a label. β = 0 is pure uncertainty
sampling; larger β weighs novelty more.

Why embeddings rather than pHash groups (``core.data.similarity``): pHash only joins
near-copies (a few bits apart), while consecutive frames of a moving camera are
different photos of the same scene; the embedding sees them as the same content, and
it comes from the forward pass that gives u anyway.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, Field

from roadwork_assets.contracts.errors import BadInputError
from roadwork_assets.core.calibration.gate import FailureGate, gate_features
from roadwork_assets.core.calibration.policies import policy_probability
from roadwork_assets.core.data.images import decode_image, perceptual_hash, pixel_sha256
from roadwork_assets.core.data.sources import IMAGE_EXTENSIONS
from roadwork_assets.core.data.transforms import to_float, to_model_array


class ActiveLearningConfig(BaseModel):
    """What label_queue picks and how much it values diversity."""

    top_k: int = Field(50, ge=1, description="images exported for labelling")
    diversity: float = Field(1.0, ge=0.0, le=8.0, description="β, the exponent of the "
                             "novelty factor: 0 = uncertainty only; larger = fewer similar "
                             "images")
    batch_size: int = Field(32, ge=1)
    url_root: str = Field("/", description="Label Studio local files: data.image is "
                          "/data/local-files/?d=<path relative to this folder>; set it to "
                          "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT")


def pool_files(folder: Path | str) -> list[Path]:
    """Image files under ``folder`` (recursively, hidden entries skipped), sorted."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise BadInputError(f"unlabelled pool {str(root)!r} is not a folder: point "
                            "ROADWORK_UNLABELLED (or label_queue's pool) at a folder of images")
    return sorted(p for p in root.rglob("*")
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def bundle_uncertainty(policy: Any, view_logits: np.ndarray) -> np.ndarray:
    """u_i (module docstring): the gate's P(wrong) for a gate policy, else min(p, 1 - p)."""
    p = policy_probability(policy, view_logits)
    if getattr(policy, "kind", None) == "gate":
        feats = gate_features(view_logits, p, policy.t_lo, policy.main_view)
        return FailureGate.from_params(policy.gate.model_dump()).predict_proba(feats)
    return np.minimum(p, 1.0 - p)


def diverse_select(uncertainty, embeddings, top_k: int, diversity: float = 1.0
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(picked indices in pick order, each pick's largest cosine similarity to the
    earlier picks, 0 for the first) by the rule of the module docstring."""
    u = np.asarray(uncertainty, dtype=np.float64).ravel()
    e = np.asarray(embeddings, dtype=np.float64)
    if e.ndim != 2 or len(e) != len(u):
        raise BadInputError(f"need one embedding row per image: {len(u)} uncertainties, "
                            f"embeddings of shape {e.shape}")
    if not np.isfinite(u).all() or not np.isfinite(e).all():
        raise BadInputError("uncertainties or embeddings hold NaN/inf: the model diverged")
    e = e - e.mean(axis=0)
    norms = np.linalg.norm(e, axis=1, keepdims=True)
    e = np.divide(e, norms, out=np.zeros_like(e), where=norms > 0)
    u_tilde = u / u.max() if len(u) and u.max() > 0 else np.zeros_like(u)
    k = min(top_k, len(u))
    nearest = np.full(len(u), -np.inf)  # largest similarity to a pick so far
    free = np.ones(len(u), dtype=bool)
    picked, sims = [], []
    for _ in range(k):
        novelty = np.clip(1.0 - nearest, 0.0, 1.0) ** diversity
        score = np.where(free, u_tilde * novelty, -np.inf)
        i = int(np.argmax(score))  # ties: the lower index (the pool's sorted order)
        picked.append(i)
        sims.append(max(0.0, float(nearest[i])) if picked[1:] else 0.0)
        free[i] = False
        nearest = np.maximum(nearest, e @ e[i])
    return np.asarray(picked, dtype=np.int64), np.asarray(sims)


@dataclass
class PoolScores:
    paths: list[str]
    probability: np.ndarray  # served P(roadwork), remapped so 0.5 is the decision
    uncertainty: np.ndarray
    embeddings: np.ndarray
    pixel_sha256: list[str]
    phash: list[str]
    failed: list[dict[str, str]] = field(default_factory=list)  # {"path", "reason"}


def _read_pool(paths: list[Path], img_size: int) -> tuple[list[int], np.ndarray, list, list, list]:
    ok, arrays, shas, hashes, failed = [], [], [], [], []
    for i, p in enumerate(paths):
        try:
            img = decode_image(p, str(p))
        except BadInputError as exc:
            failed.append({"path": str(p), "reason": str(exc)})
            continue
        ok.append(i)
        shas.append(pixel_sha256(img))
        hashes.append(f"{perceptual_hash(img):016x}")
        arrays.append(to_model_array(img, img_size))
    stacked = np.stack(arrays) if arrays else np.zeros((0, 3, img_size, img_size), np.uint8)
    return ok, stacked, shas, hashes, failed


@torch.no_grad()
def _features(model: torch.nn.Module, images_uint8: np.ndarray, batch_size: int) -> np.ndarray:
    out = [model.features(to_float(torch.from_numpy(images_uint8[s:s + batch_size]))).float()
           for s in range(0, len(images_uint8), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, model.num_features), np.float32)


def score_pool(bundle: Any, paths: list[Path], config: ActiveLearningConfig) -> PoolScores:
    """Decode the pool (unreadable files are listed, not fatal), run the bundle as served
    (``BundlePredictor``: a cascade's stage 2 on routed images only) and its uncertainty."""
    from roadwork_assets.core.export.cascade_serving import is_cascade, served_outputs
    from roadwork_assets.core.export.predictor import BundlePredictor

    ok, images, shas, hashes, failed = _read_pool(paths, bundle.manifest.img_size)
    kept = [str(paths[i]) for i in ok]
    if not kept:
        return PoolScores(kept, np.zeros(0), np.zeros(0), np.zeros((0, 1)), [], [], failed)
    predictor = BundlePredictor(bundle, batch_size=config.batch_size)
    views = predictor.engine.view_logits(images, bundle.manifest.n_views, config.batch_size)
    stage2 = None
    if is_cascade(bundle.policy):
        def stage2(idx: np.ndarray) -> np.ndarray:
            return predictor.stage2_logits(images[idx])
    _decision, prob, _stage = served_outputs(bundle.policy, views, stage2)
    return PoolScores(kept, np.asarray(prob, dtype=np.float64),
                      bundle_uncertainty(bundle.policy, views),
                      _features(predictor.model, images, config.batch_size), shas, hashes, failed)


def label_queue(scores: PoolScores, config: ActiveLearningConfig) -> pd.DataFrame:
    """The top-k by ``diverse_select``: rank, path, uncertainty, probability, the model's answer,
    similarity to the closest earlier pick, pixel_sha256 and phash."""
    picked, sims = diverse_select(scores.uncertainty, scores.embeddings, config.top_k,
                              config.diversity)
    prob = scores.probability[picked]
    return pd.DataFrame({
        "rank": np.arange(1, len(picked) + 1),
        "path": [scores.paths[i] for i in picked],
        "uncertainty": scores.uncertainty[picked],
        "probability": prob,
        "prediction": np.where(np.round(prob) == 1, "roadwork", "none"),
        "max_similarity_to_earlier": sims,
        "pixel_sha256": [scores.pixel_sha256[i] for i in picked],
        "phash": [scores.phash[i] for i in picked],
    })
