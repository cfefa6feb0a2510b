"""What drift compares, computed the same way for the reference and the incoming images:
the served score (the bundle's probability, ``BundlePredictor``) and the embedding (the
bundle model's pooled backbone features of the whole image, view 0).

Both sides go through this one function, so a difference between them is a difference
of the images, not of the scoring path (val_test's stored logits come from the training
pipeline's cache and views; the served score does not).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from roadwork_assets.contracts.errors import BadInputError
from roadwork_assets.core.data.images import decode_image
from roadwork_assets.core.data.sources import IMAGE_EXTENSIONS
from roadwork_assets.core.data.transforms import to_float, to_model_array
from roadwork_assets.core.export.predictor import BundlePredictor


@dataclass
class ScoredImages:
    scores: np.ndarray  # [n] served probability
    embeddings: np.ndarray  # [n, d] backbone features
    failed: dict[str, str] = field(default_factory=dict)  # path -> why it was skipped


def list_images(folder: Path | str, max_images: int, seed: int = 0) -> list[Path]:
    """The visible image files under ``folder`` (sorted); a seeded subsample of
    ``max_images`` when there are more."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise BadInputError(f"incoming folder {str(root)!r} does not exist or is not a folder: "
                            "set ROADWORK_INCOMING (or the drift asset's `incoming`) to a "
                            "folder of unlabelled images")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS
                   and not any(x.startswith(".") for x in p.relative_to(root).parts)
                   and p.is_file())
    return subsample(paths, max_images, seed)


def subsample(paths: list, max_images: int, seed: int = 0) -> list:
    if len(paths) <= max_images:
        return list(paths)
    keep = np.sort(np.random.default_rng(seed).choice(len(paths), max_images, replace=False))
    return [paths[i] for i in keep]


@torch.no_grad()
def score_images(predictor: BundlePredictor, paths: list[Path | str],
                 batch_size: int = 64) -> ScoredImages:
    """Decode each image (one that cannot be read is skipped and named in ``failed``),
    then the served score and the backbone features of every readable one."""
    size = predictor.bundle.manifest.img_size
    arrays, failed = [], {}
    for p in paths:
        try:
            arrays.append(to_model_array(decode_image(Path(p), str(p)), size))
        except BadInputError as exc:
            failed[str(p)] = str(exc)
    if not arrays:
        return ScoredImages(np.empty(0), np.empty((0, predictor.model.num_features)), failed)
    images = np.stack(arrays)
    scores, _, _ = predictor.predict_arrays(images)
    model = predictor.model.eval().to(predictor.device)
    feats = [model.features(to_float(torch.from_numpy(images[i:i + batch_size]))
                            .to(predictor.device)).float().cpu().numpy()
             for i in range(0, len(images), batch_size)]
    return ScoredImages(np.asarray(scores, dtype=np.float64),
                        np.concatenate(feats).astype(np.float64), failed)
