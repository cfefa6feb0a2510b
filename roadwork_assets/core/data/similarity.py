"""Is a pHash-close pair really the same photo? A second, independent signal.

pHash keeps the signs of the 8x8 lowest DCT frequencies of a 32x32 grey image. That
is a *layout* fingerprint: on low-texture or dark scenes (fog, flat sky and road, a
few faded boxes; a night street) distinct scenes share nearly all 64 bits. Linking
every pair within 6 bits and chaining the links merged 45 % of one such dataset into
one group. So a pHash match is only a *candidate*; the pixels must agree too:

    thumbnail  t = 32x32 grey image (Pillow BOX filter), stored at ingest (1 KB);
    window     w(t, A) = t warped by alignment A (a centre zoom z in ZOOMS, i.e. a
               light crop, and a shift in SHIFTS), its centre 28x28, 2x2 average-pooled;
    residual   r_q(a, b) = min over A and both directions of
                 Q_q(|w(b) - m(w(a, A))|) / max(detail(w(b)), DETAIL_FLOOR)
               m = the monotone histogram match onto w(b) (so a re-exposed, gamma- or
               contrast-changed copy is still a copy; an inverted image is not),
               Q_q = the q-th percentile over the 196 cells, and detail = the std of
               w(b) minus its 3x3 box blur: residuals are measured in units of the
               image's own fine structure, so a faded object on a foggy scene counts
               as much as a car on a sunny one;
    likely     pHash distance <= d and r_95 <= max_residual (0.8);
    certain    likely and r_98 <= certain_residual (0.5).

Featureless images (thumbnail std < ``featureless_std``: a solid colour, a black frame)
carry no scene and are never linked; identical pixels are already one unit.

Measured on the test generators (roadwork_assets_tests/awkward_data.py and scenes.py),
pairs that pHash proposes: copies resized to 90 %, JPEG q50, gamma 0.8 are likely
copies 99-100 %, 3 % crops 96-100 %, brightened x1.3 97 %; frames of one dashcam burst
98 %. Distinct low-texture scenes: likely 2.2 %, certain 0 % of 3118 pHash-close pairs.
Because rare false "likely" links would still chain through thousands of look-alike
scenes, the splitter bounds chaining (``core.data.splits.near_duplicate_links``).
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from scipy import sparse
from scipy.ndimage import uniform_filter

from roadwork_assets.contracts.errors import BadInputError
from roadwork_assets.core.progress import Progress, no_progress

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
ZOOMS = (1.0, 1.03, 1.06, 1.09)
SHIFTS = (-0.5, 0.0, 0.5)  # thumbnail pixels (1 = 3 % of the frame)
ALIGNMENTS = tuple((z, dx, dy) for z in ZOOMS for dx in SHIFTS for dy in SHIFTS)
DETAIL_FLOOR = 2.0  # grey levels: below this the residual would amplify JPEG noise
_PAIRS_PER_BLOCK = 16384


class NearDuplicateRule(BaseModel):
    """When two images count as the same photo."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_distance: int = Field(6, ge=0, le=20, description="max pHash Hamming distance of a candidate")
    max_residual: float = Field(0.8, gt=0, description="max aligned thumbnail residual (in units "
                                "of the image's detail) that makes a candidate a likely copy")
    certain_residual: float = Field(0.5, gt=0, description="max residual of a certain copy: only "
                                    "certain links chain beyond max_loose_group units")
    max_loose_group: int = Field(8, ge=2, description="a group joined by likely-copy links may "
                                 "join at most this many units (scenes or distinct photos); larger "
                                 "ones keep certain links only")
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


@functools.cache
def _alignment_matrix(z: float, dx: float, dy: float) -> sparse.csr_matrix:
    """Linear map thumbnail (1024) -> aligned, pooled centre window (196).

    The thumbnail is zoomed by z about its centre (a crop of 1/z of each side, resized
    back) and shifted by (dx, dy) thumbnail pixels, sampled bilinearly (clamped at the
    border), cropped to the centre window and 2x2 average-pooled: sub-pixel
    misalignment of sharp edges would otherwise dominate the residual. Being one sparse
    matrix per alignment, it applies to a block of thumbnails in one product.
    """
    s = THUMB_SIZE
    c = (s - 1) / 2.0
    coords = (np.arange(s) - c) / z + c
    xs, ys = coords + dx, coords + dy
    rows, cols, vals = [], [], []
    inner = np.arange(_BORDER, s - _BORDER)
    side = (s - 2 * _BORDER) // 2
    for v in inner:
        for u in inner:
            out = ((v - _BORDER) // 2) * side + (u - _BORDER) // 2
            x, y = float(np.clip(xs[u], 0, s - 1)), float(np.clip(ys[v], 0, s - 1))
            x0, y0 = min(int(x), s - 2), min(int(y), s - 2)
            fx, fy = x - x0, y - y0
            for (yy, xx, w) in ((y0, x0, (1 - fx) * (1 - fy)), (y0, x0 + 1, fx * (1 - fy)),
                                (y0 + 1, x0, (1 - fx) * fy), (y0 + 1, x0 + 1, fx * fy)):
                rows.append(out)
                cols.append(yy * s + xx)
                vals.append(w / 4.0)
    return sparse.csr_matrix((vals, (rows, cols)), shape=(side * side, s * s))


def _views(flat: np.ndarray, alignment: tuple[float, float, float]) -> np.ndarray:
    return np.asarray((_alignment_matrix(*alignment) @ flat.T).T, dtype=np.float32)


def _detail_std(x: np.ndarray) -> np.ndarray:
    """Std of each pooled window's high-pass (itself minus its 3x3 box blur)."""
    h = round(np.sqrt(x.shape[1]))
    img = x.reshape(-1, h, h).astype(np.float64)
    return (img - uniform_filter(img, size=(1, 3, 3), mode="nearest")).reshape(len(x), -1).std(axis=1)


def _quantiles(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the 95th and 98th percentiles (order statistics, no interpolation)."""
    n = values.shape[1] - 1
    k95, k98 = int(np.ceil(0.95 * n)), int(np.ceil(0.98 * n))
    part = np.partition(values, (k95, k98), axis=1)
    return part[:, k95], part[:, k98]


def pair_residuals(thumbs: np.ndarray, i: np.ndarray, j: np.ndarray,
                   progress: Progress = no_progress) -> tuple[np.ndarray, np.ndarray]:
    """(r95, r98) for each pair (see the module docstring), symmetric.

    The histogram match of a warped source s onto a target t puts t's sorted values in
    s's rank order, so each alignment costs one argsort per image, not per pair.
    """
    i, j = np.asarray(i, dtype=np.int64), np.asarray(j, dtype=np.int64)
    out95, out98 = np.full(len(i), np.inf), np.full(len(i), np.inf)
    flat = thumbs.reshape(len(thumbs), -1).astype(np.float32)
    identity = (1.0, 0.0, 0.0)
    for start in range(0, len(i), _PAIRS_PER_BLOCK):
        progress("confirm near-duplicate pairs", start, len(i))
        bi, bj = i[start:start + _PAIRS_PER_BLOCK], j[start:start + _PAIRS_PER_BLOCK]
        used, inv = np.unique(np.concatenate([bi, bj]), return_inverse=True)
        a, b = inv[:len(bi)], inv[len(bi):]
        plain = _views(flat[used], identity)
        ordered = np.sort(plain, axis=1)
        scale = np.maximum(_detail_std(plain), DETAIL_FLOOR).astype(np.float32)
        best95 = np.full(len(bi), np.inf, dtype=np.float32)
        best98 = best95.copy()
        for w in ALIGNMENTS:
            ranks = np.argsort(plain if w == identity else _views(flat[used], w), axis=1)
            for src, dst in ((a, b), (b, a)):
                matched = np.empty((len(src), plain.shape[1]), dtype=np.float32)
                np.put_along_axis(matched, ranks[src], ordered[dst], axis=1)
                q95, q98 = _quantiles(np.abs(plain[dst] - matched))
                np.minimum(best95, q95 / scale[dst], out=best95)
                np.minimum(best98, q98 / scale[dst], out=best98)
        out95[start:start + len(bi)] = best95
        out98[start:start + len(bi)] = best98
    progress("confirm near-duplicate pairs", len(i), len(i))
    return out95, out98


def confirm_pairs(
    thumbs: np.ndarray, i: np.ndarray, j: np.ndarray, rule: NearDuplicateRule,
    progress: Progress = no_progress,
) -> tuple[np.ndarray, np.ndarray]:
    """(likely, certain) boolean masks over candidate pairs (i, j).

    likely: r95 <= ``rule.max_residual``; certain: r98 <= ``rule.certain_residual`` (and
    likely). Featureless images are never either.
    """
    i, j = np.asarray(i, dtype=np.int64), np.asarray(j, dtype=np.int64)
    likely, certain = np.zeros(len(i), dtype=bool), np.zeros(len(i), dtype=bool)
    if len(i) == 0:
        return likely, certain
    flat = thumbs.reshape(len(thumbs), -1).astype(np.float64)
    textured = flat.std(axis=1) >= rule.featureless_std
    ok = textured[i] & textured[j]
    if ok.any():
        r95, r98 = pair_residuals(thumbs, i[ok], j[ok], progress)
        likely[ok] = r95 <= rule.max_residual
        certain[ok] = likely[ok] & (r98 <= rule.certain_residual)
    return likely, certain
