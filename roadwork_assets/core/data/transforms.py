"""Image -> model input, the same way at training, evaluation and serving time.

StreetVision's validator centre-crops to a square and resizes (augmentation level 0, see
docs/domain.md), so we do the same: fit the largest centred square, resize to
``img_size`` (bicubic).
Images are cached as uint8 [3, S, S]; the model divides by 255 and normalises.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from roadwork_assets.core.data.images import decode_image
from roadwork_assets.core.progress import Progress, no_progress


def to_model_array(img: Image.Image, img_size: int) -> np.ndarray:
    """RGB PIL image -> uint8 [3, S, S], centre square crop + bicubic resize."""
    fitted = ImageOps.fit(img, (img_size, img_size), method=Image.Resampling.BICUBIC)
    return np.asarray(fitted, dtype=np.uint8).transpose(2, 0, 1).copy()


def load_model_arrays(uris: list[str], item_ids: list[str], img_size: int,
                      progress: Progress = no_progress) -> np.ndarray:
    """Decode and preprocess many files -> uint8 [N, 3, S, S]."""
    out = np.empty((len(uris), 3, img_size, img_size), dtype=np.uint8)
    for i, (uri, item) in enumerate(zip(uris, item_ids, strict=True)):
        progress("decode + resize", i, len(uris))
        out[i] = to_model_array(decode_image(Path(uri), item), img_size)
    progress("decode + resize", len(uris), len(uris))
    return out


def to_float(batch_uint8: torch.Tensor) -> torch.Tensor:
    return batch_uint8.float().div_(255.0)


def make_views(images: torch.Tensor, n_views: int) -> list[torch.Tensor]:
    """Deterministic test-time views of a float batch: identity, h-flip, centre zoom.

    Views feed the multi-view disagreement signal of the failure gate. Corner crops are
    left out on purpose: they can cut the only cone out of the frame.
    """
    if n_views < 1:
        raise ValueError(f"n_views must be >= 1, got {n_views}")
    views = [images]
    if n_views >= 2:
        views.append(torch.flip(images, dims=[3]))
    if n_views >= 3:
        size = images.shape[-1]
        crop = int(round(size * 0.85))
        off = (size - crop) // 2
        zoom = images[..., off : off + crop, off : off + crop]
        zoom = torch.nn.functional.interpolate(zoom, size=(size, size), mode="bilinear",
                                               align_corners=False)
        views.append(zoom)
        if n_views >= 4:
            views.append(torch.flip(zoom, dims=[3]))
    if n_views > 4:
        raise ValueError(f"n_views must be <= 4, got {n_views}")
    return views
