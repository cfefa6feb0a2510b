"""Is a pHash-close pair really the same photo? A second, independent signal.

pHash keeps the signs of the 8x8 lowest DCT frequencies of a 32x32 grey image. That
is a *layout* fingerprint: on low-texture or dark scenes (flat sky and road, a few
boxes; a night street) most of those coefficients are noise around the median, and
distinct scenes with a similar horizon share nearly all 64 bits. Linking every pair
within 6 bits and chaining the links merged 45 % of one such dataset into one group.

So a pHash match is only a *candidate*. It becomes a link when the pixels agree too:

    thumbnail  t = 32x32 grey image (Pillow BOX filter), stored at ingest;
    residual   r(a, b) = min over alignments A of  q98(|b' - (g * A(a)' + o)|) / s
               where ' is the centre 28x28 window, (g, o) the least-squares gain and
               offset (g > 0: a re-exposed copy is still a copy, an inverted image is
               not), A a centre zoom in ZOOMS applied to either side (a lightly
               cropped copy is a zoom), q98 the 98th percentile, and
               s = max(std(b'), CONTRAST_FLOOR) the target's contrast;
    link       pHash distance <= d  AND  r <= max_residual  AND  neither image is
               featureless (thumbnail std < FEATURELESS_STD grey levels).

Measured (``benchmarks/bench_near_duplicates.py`` and the data tests): copies resized
to 90 %, JPEG q50 or brightened x1.3 have r <= 0.55 on textured scenes and <= 0.61 on
low-texture day and night scenes; distinct low-texture scenes within 6 pHash bits have
a median r of 1.2. Featureless images (solid colour, a black frame) carry no scene:
only exact pixel copies are linked, which the pixel sha256 already does.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from roadwork_assets.contracts.errors import BadInputError

__all__ = [
    "THUMB_SIZE",
    "NearDuplicateRule",
    "confirm_pairs",
    "pair_residuals",
    "thumbnail",
    "thumbnail_array",
]

THUMB_SIZE = 32
_BORDER = 2  # compare the centre window so zoomed-in borders (filled by resampling) don't count
ZOOMS = (1.0, 1.02, 1.04, 1.06, 1.08)
CONTRAST_FLOOR = 4.0  # grey levels: below this the residual would amplify JPEG noise
_PAIRS_PER_BLOCK = 4096


class NearDuplicateRule(BaseModel):
    """When two images count as the same photo."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_distance: int = Field(6, ge=0, le=20, description="max pHash Hamming distance of a candidate")
    max_residual: float = Field(0.75, gt=0, description="max aligned thumbnail residual (in units "
                                "of the image's contrast) that confirms a candidate")
    featureless_std: float = Field(2.0, ge=0, description="thumbnails with a grey-level std "
                                   "below this are featureless: linked only as exact copies")


def thumbnail(img: Image.Image) -> bytes:
    """The 32x32 grey thumbnail (BOX filter) as 1024 raw bytes."""
    return img.convert("L").resize((THUMB_SIZE, THUMB_SIZE), Image.Resampling.BOX).tobytes()


def thumbnail_array(values) -> np.ndarray:
    """Stored thumbnails (bytes, or hex strings) as a float32 array [N, 32, 32]."""
    n = len(values)
    out = np.empty((n, THUMB_SIZE, THUMB_SIZE), dtype=np.float32)
    for k, v in enumerate(values):
        raw = bytes.fromhex(v) if isinstance(v, str) else bytes(v) if v is not None else b""
        if len(raw) != THUMB_SIZE * THUMB_SIZE:
            raise BadInputError(
                f"thumbnail at row {k} has {len(raw)} bytes, expected {THUMB_SIZE ** 2}; "
                "re-materialize source_images so every image is fingerprinted by this version"
            )
        out[k] = np.frombuffer(raw, dtype=np.uint8).reshape(THUMB_SIZE, THUMB_SIZE)
    return out


def _zoom(thumbs: np.ndarray, z: float) -> np.ndarray:
    """Centre zoom by z (a crop of 1/z of each side, resized back), bilinear."""
    if z == 1.0:
        return thumbs
    s = THUMB_SIZE
    m = s * (1.0 - 1.0 / z) / 2.0
    out = np.empty_like(thumbs)
    for k, t in enumerate(thumbs):
        im = Image.fromarray(t, mode="F")
        out[k] = np.asarray(im.transform((s, s), Image.Transform.EXTENT, (m, m, s - m, s - m),
                                         Image.Resampling.BILINEAR))
    return out


def _centre(x: np.ndarray) -> np.ndarray:
    """The centre window, 2x2 average-pooled: sub-pixel misalignment of sharp edges in a
    cropped copy otherwise dominates the residual."""
    c = x[..., _BORDER:-_BORDER, _BORDER:-_BORDER].astype(np.float64)
    h = c.shape[-1] // 2
    c = c.reshape(*c.shape[:-2], h, 2, h, 2).mean(axis=(-3, -1))
    return c.reshape(*c.shape[:-2], -1)


def _residual(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """q98 of |dst - (g src + o)| / contrast(dst), per row; inf where the best gain is <= 0."""
    xs = src - src.mean(axis=1, keepdims=True)
    yd = dst - dst.mean(axis=1, keepdims=True)
    var = (xs * xs).sum(axis=1)
    gain = np.where(var > 0, (xs * yd).sum(axis=1) / np.where(var > 0, var, 1.0), 0.0)
    resid = np.abs(yd - gain[:, None] * xs)
    q = np.quantile(resid, 0.98, axis=1)
    scale = np.maximum(dst.std(axis=1), CONTRAST_FLOOR)
    return np.where(gain > 0, q / scale, np.inf)


def pair_residuals(thumbs: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """r(thumbs[i], thumbs[j]) for each pair (see the module docstring), symmetric."""
    i, j = np.asarray(i, dtype=np.int64), np.asarray(j, dtype=np.int64)
    out = np.full(len(i), np.inf)
    if len(i) == 0:
        return out
    used = np.unique(np.concatenate([i, j]))
    pos = np.full(len(thumbs), -1, dtype=np.int64)
    pos[used] = np.arange(len(used))
    views = np.stack([_centre(_zoom(thumbs[used], z)) for z in ZOOMS])  # [Z, U, 784]
    plain = views[0]
    for start in range(0, len(i), _PAIRS_PER_BLOCK):
        a = pos[i[start:start + _PAIRS_PER_BLOCK]]
        b = pos[j[start:start + _PAIRS_PER_BLOCK]]
        best = np.minimum(_residual(plain[a], plain[b]), _residual(plain[b], plain[a]))
        for zv in views[1:]:
            best = np.minimum(best, _residual(zv[a], plain[b]))
            best = np.minimum(best, _residual(zv[b], plain[a]))
        out[start:start + len(a)] = best
    return out


def confirm_pairs(
    thumbs: np.ndarray, i: np.ndarray, j: np.ndarray, rule: NearDuplicateRule
) -> np.ndarray:
    """Boolean mask over candidate pairs (i, j): True where the thumbnails confirm a copy."""
    i, j = np.asarray(i, dtype=np.int64), np.asarray(j, dtype=np.int64)
    if len(i) == 0:
        return np.zeros(0, dtype=bool)
    flat = thumbs.reshape(len(thumbs), -1).astype(np.float64)
    textured = flat.std(axis=1) >= rule.featureless_std
    ok = textured[i] & textured[j]
    keep = np.zeros(len(i), dtype=bool)
    if ok.any():
        keep[ok] = pair_residuals(thumbs, i[ok], j[ok]) <= rule.max_residual
    return keep
