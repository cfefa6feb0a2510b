"""Training-time augmentation: today's light recipe and the validator-faithful one.

``validator_augment_batch`` reuses ``core.evaluation.validator.augment`` — the project's
simulator of StreetVision's L0-L3 levels (rotation +-20 deg, random-resized crop down to
scale 0.2, horizontal and vertical flips at p = 0.5, saturation / contrast / down-up
sampling, colour noise and blur, JPEG q75 at 224) — per image, then resizes the decoded
224 px JPEG back to the model size. One ``np.random.Generator`` per image, seeded by
(seed, epoch, index), so a batch is reproducible and independent of batch size.
Levels are drawn uniformly from ``levels`` (the validator draws 0-3 at 0.25 each).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from roadwork_assets.core.evaluation.validator import LEVELS, augment

VALIDATOR_LEVELS: tuple[int, ...] = tuple(LEVELS)


def light_augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Light augmentation on a float batch; avoids crops that could drop the object."""
    b, _, h, w = x.shape
    flip = torch.rand(b, generator=gen) < 0.5
    x = torch.where(flip.view(b, 1, 1, 1), torch.flip(x, dims=[3]), x)
    pad = max(1, h // 16)
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    dx, dy = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,), generator=gen))
    x = padded[:, :, dy : dy + h, dx : dx + w]
    bright = 1.0 + (torch.rand(b, 1, 1, 1, generator=gen) - 0.5) * 0.4
    contrast = 1.0 + (torch.rand(b, 1, 1, 1, generator=gen) - 0.5) * 0.4
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * contrast + mean * bright).clamp_(0.0, 1.0)


def validator_augment_image(image: np.ndarray, rng: np.random.Generator,
                            levels: Sequence[int] = VALIDATOR_LEVELS) -> tuple[np.ndarray, int]:
    """uint8 [3, S, S] -> (uint8 [3, S, S] as the validator would send it, level drawn)."""
    size = image.shape[-1]
    level = int(levels[int(rng.integers(0, len(levels)))])
    pil = Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0)))
    out = augment(pil, level, rng)
    if out.size != (size, size):
        out = out.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(out, dtype=np.uint8).transpose(2, 0, 1), level


def validator_augment_batch(images: np.ndarray, *, seed: int, epoch: int, indices: Sequence[int],
                            levels: Sequence[int] = VALIDATOR_LEVELS) -> np.ndarray:
    """uint8 [B, 3, S, S] -> augmented uint8 [B, 3, S, S]; image ``indices[i]`` of
    ``epoch`` uses generator (seed, epoch, index)."""
    out = np.empty_like(images)
    for i, (img, idx) in enumerate(zip(images, indices, strict=True)):
        rng = np.random.default_rng([seed, epoch, int(idx)])
        out[i], _ = validator_augment_image(img, rng, levels)
    return out


def validator_selection_copy(images: np.ndarray, seed: int,
                             levels: Sequence[int] = VALIDATOR_LEVELS) -> np.ndarray:
    """A fixed validator-style copy of a selection split (the same every epoch, so
    epochs are compared on the same images). Epoch key 0 keeps it apart from training
    draws (epochs count from 1)."""
    return validator_augment_batch(images, seed=seed, epoch=0, indices=range(len(images)),
                                   levels=levels)
