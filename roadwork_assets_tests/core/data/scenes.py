"""Synthetic street-like scenes and the near-copy transform used by the data tests.

Scenes share a layout (sky above a horizon, road below, noise, a few solid shapes) so
distinct scenes are about as alike as street photos are, which is what makes
near-duplicate thresholds hard.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def scene(seed: int, width: int = 160, height: int = 120) -> Image.Image:
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, height)[:, None, None]
    sky, road = rng.uniform(120, 230, 3), rng.uniform(40, 120, 3)
    pixels = np.where(y < rng.uniform(0.3, 0.6), sky, road) * np.ones((height, width, 3))
    pixels += rng.normal(0, 12, (height, width, 3))
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(3, 9)):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1, y1 = x0 + int(rng.integers(8, width // 2)), y0 + int(rng.integers(8, height // 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = draw.rectangle if rng.random() < 0.5 else draw.ellipse
        shape([x0, y0, x1, y1], fill=colour)
    return img


def near_copy(img: Image.Image, crop: float = 0.03, crop_every_side: bool = False) -> Image.Image:
    """Resize to 90 %, re-encode as JPEG quality 50, crop ``crop`` of the frame at the border.

    By default ``crop`` of the width and of the height is removed, split between opposite
    borders; ``crop_every_side`` removes ``crop`` at each of the four borders instead.
    """
    w, h = img.size
    small = img.resize((round(w * 0.9), round(h * 0.9)), Image.Resampling.BILINEAR)
    recompressed = Image.open(io.BytesIO(encode(small, "JPEG", quality=50))).convert("RGB")
    sw, sh = recompressed.size
    share = crop if crop_every_side else crop / 2
    dx, dy = round(sw * share), round(sh * share)
    return recompressed.crop((dx, dy, sw - dx, sh - dy))


def encode(img: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def save(img: Image.Image, path: Path, **params) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **params)
    return path


def street_photo() -> Image.Image:
    """A real photo (scikit-learn's bundled china.jpg, 640x427): realistic pHash spectrum."""
    from sklearn.datasets import load_sample_image

    return Image.fromarray(load_sample_image("china.jpg"))
