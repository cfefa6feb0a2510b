"""Awkward street-scene data for tests, independent of the project's default generator.

Nothing here imports the ``roadwork_assets.core.data.synthetic`` package: the scenes
are drawn from scratch with numpy + Pillow so that a mechanism tuned to the default
dataset meets data it has not seen. Every image is a function of ``seed`` alone (same
seed -> identical pixels and identical written bytes).

Styles (mixed in the proportions given to :func:`generate_awkward`):

``street``         ordinary daytime street: gradient sky, buildings with windows, lane
                   markings, sensor noise.
``low_texture``    flat sky and road, a few boxes, almost no noise. Distinct scenes share
                   nearly the same 64-bit pHash (the picture is dominated by one
                   horizon / road geometry), which is the point: pHash alone cannot tell
                   them apart.
``night``          very dark, low contrast, a few dim lights, headlight fall-off.
``grayscale``      a street scene saved as a mode ``L`` image (no orange cue).
``layout_repeat``  one background layout (horizon, road, buildings) reused for several
                   *different* images: other objects, positions and lighting. They are
                   NOT near-duplicates; ``scene_layout`` names the shared layout.
``burst``          ``burst_size`` near-identical frames of one drive (small camera shift,
                   tiny zoom, noise). They ARE near-copies; they share ``burst_id``, which
                   the writers do not pass to the reader unless asked.

``n_copies`` further items are exact or near copies of generated originals, made with
:data:`copy_transforms` and carrying the original's id in ``copy_of``.

Positives (label 1) hold one to four roadwork objects (cones, striped barriers, orange
diamond signs, drums); negatives sometimes hold hard negatives (orange boxes, orange
cars, orange blobs, yellow diamond signs, crossings). Any scene may hold ordinary cars,
poles and trees.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "DEFAULT_STYLES",
    "HARD_NEGATIVE_OBJECTS",
    "ROADWORK_OBJECTS",
    "STYLES",
    "AwkwardItem",
    "copy_transforms",
    "encode_item",
    "generate_awkward",
    "near_copy_groups",
    "write_class_folders",
    "write_manifest_csv",
    "write_natix_parquet",
]

STYLES = ("street", "low_texture", "night", "grayscale", "layout_repeat", "burst")
DEFAULT_STYLES: dict[str, float] = {
    "street": 0.2,
    "low_texture": 0.2,
    "night": 0.15,
    "grayscale": 0.15,
    "layout_repeat": 0.15,
    "burst": 0.15,
}
ROADWORK_OBJECTS = ("cone", "barrier", "sign", "drum")
HARD_NEGATIVE_OBJECTS = ("orange_box", "orange_car", "orange_blob", "yellow_sign", "crossing", "bollard")
_IMAGES_PER_LAYOUT = 6
_SUPERSAMPLE = 2


@dataclass(eq=False)
class AwkwardItem:
    """One generated image and what the tests need to know about it."""

    item_id: str
    image: Image.Image
    label: int
    style: str
    burst_id: str | None = None
    copy_of: str | None = None
    scene_layout: str | None = None
    objects: tuple[str, ...] = ()
    copy_transform: str | None = None


# ------------------------------------------------------------------------ copy transforms


def _jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    out = Image.open(io.BytesIO(buf.getvalue()))
    out.load()
    return out


def _resize(img: Image.Image, factor: float) -> Image.Image:
    w, h = img.size
    return img.resize((max(1, round(w * factor)), max(1, round(h * factor))), Image.Resampling.BILINEAR)


def _crop(img: Image.Image, share: float) -> Image.Image:
    """Remove ``share`` of the width and of the height, half at each border."""
    w, h = img.size
    dx, dy = max(1, round(w * share / 2)), max(1, round(h * share / 2))
    return img.crop((dx, dy, w - dx, h - dy))


def _point(img: Image.Image, fn: Callable[[np.ndarray], np.ndarray]) -> Image.Image:
    arr = np.asarray(img, dtype=np.float64)
    return Image.fromarray(np.clip(np.rint(fn(arr)), 0, 255).astype(np.uint8), mode=img.mode)


def _combo(img: Image.Image) -> Image.Image:
    return _crop(_jpeg(_resize(img, 0.9), 50), 0.03)


copy_transforms: dict[str, Callable[[Image.Image], Image.Image]] = {
    "exact": lambda img: img.copy(),
    "resize90": lambda img: _resize(img, 0.9),
    "jpeg50": lambda img: _jpeg(img, 50),
    "crop3": lambda img: _crop(img, 0.03),
    "bright130": lambda img: _point(img, lambda a: a * 1.3),
    "gamma": lambda img: _point(img, lambda a: 255.0 * (a / 255.0) ** 0.8),
    "resize_jpeg_crop": _combo,
}
"""Name -> callable(PIL image) -> PIL image; each keeps the image's mode."""


# ------------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class _Layout:
    """Background geometry and colours, in units of the image side (0..1)."""

    horizon: float
    vp_x: float  # vanishing point
    road_half: float  # road half-width at the bottom edge
    walk: float  # extra width of the sidewalk / verge beyond the road edge
    sky_top: tuple[float, float, float]
    sky_bottom: tuple[float, float, float]
    road: tuple[float, float, float]
    verge: tuple[float, float, float]
    lanes: str  # "dashed", "solid", "none"
    buildings: tuple[tuple[float, float, float, tuple[float, float, float], bool], ...]
    trees: tuple[tuple[float, float, float, tuple[float, float, float]], ...]
    poles: tuple[float, ...]


def _colour(rng: np.random.Generator, lo: float, hi: float, spread: float = 25.0) -> tuple[float, float, float]:
    base = rng.uniform(lo, hi)
    return tuple(float(np.clip(base + rng.uniform(-spread, spread), 0, 255)) for _ in range(3))


def _make_layout(rng: np.random.Generator, style: str) -> _Layout:
    flat = style == "low_texture"
    # Low-texture scenes share one camera geometry (dashcam mount, right-hand traffic):
    # with flat colours that geometry is all the pHash sees.
    horizon = rng.uniform(0.43, 0.46) if flat else rng.uniform(0.33, 0.55)
    vp_x = rng.uniform(0.40, 0.43) if flat else rng.uniform(0.3, 0.7)
    # Flat scenes: fog or snow, a pale sky and verge around a dark road.
    sky = _colour(rng, 215, 240, 6) if flat else _colour(rng, 140, 235, 35)
    sky_top = sky if flat else tuple(float(np.clip(c * rng.uniform(0.7, 0.95), 0, 255)) for c in sky)
    road = _colour(rng, 35, 60, 4) if flat else _colour(rng, 45, 125, 12)
    verge = _colour(rng, 185, 215, 6) if flat else _colour(rng, 70, 170, 40)
    buildings = []
    n_build = int(rng.integers(0, 3)) if flat else int(rng.integers(2, 7))
    for _ in range(n_build):
        left = rng.random() < 0.5
        width = rng.uniform(0.06, 0.15) if flat else rng.uniform(0.12, 0.3)
        x0 = rng.uniform(-0.05, 0.3) if left else rng.uniform(0.6, 0.95)
        x0 = min(x0, vp_x - width - 0.05) if left else max(x0, vp_x + 0.05)
        top = horizon - (rng.uniform(0.04, 0.15) if flat else rng.uniform(0.08, 0.3))
        colour = _colour(rng, 90, 190, 10 if flat else 40)
        buildings.append((float(x0), float(x0 + width), float(top), colour, (not flat) and rng.random() < 0.8))
    trees = []
    if not flat:
        for _ in range(int(rng.integers(0, 4))):
            x = rng.uniform(0.0, 1.0)
            trees.append((float(x), float(horizon - rng.uniform(0.02, 0.12)), float(rng.uniform(0.05, 0.12)),
                          (float(rng.uniform(30, 90)), float(rng.uniform(80, 150)), float(rng.uniform(20, 70)))))
    poles = tuple(float(rng.uniform(0, 1)) for _ in range(0 if flat else int(rng.integers(0, 3))))
    return _Layout(
        horizon=float(horizon), vp_x=float(vp_x),
        road_half=float(rng.uniform(0.55, 0.65) if flat else rng.uniform(0.45, 0.8)),
        walk=float(rng.uniform(0.2, 0.3) if flat else rng.uniform(0.1, 0.35)), sky_top=sky_top, sky_bottom=sky, road=road, verge=verge,
        lanes="none" if flat else str(rng.choice(["dashed", "solid", "none"], p=[0.5, 0.3, 0.2])),
        buildings=tuple(buildings), trees=tuple(trees), poles=poles,
    )


def _road_x(layout: _Layout, y: float, offset: float) -> float:
    """x of a point ``offset`` road half-widths from the centre line at height ``y``."""
    depth = (y - layout.horizon) / (1.0 - layout.horizon)
    return layout.vp_x + offset * layout.road_half * depth


def _render_background(layout: _Layout, side: int, style: str) -> Image.Image:
    s = side
    y = np.linspace(0.0, 1.0, s)[:, None, None]
    t = np.clip(y / max(layout.horizon, 1e-3), 0, 1)
    sky = np.asarray(layout.sky_top) * (1 - t) + np.asarray(layout.sky_bottom) * t
    pixels = np.where(y < layout.horizon, sky, np.asarray(layout.verge)) * np.ones((s, s, 3))
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    hz = layout.horizon * s

    def ground(points: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
        return [(x * s, yy * s) for x, yy in points]

    for x0, x1, top, colour, windows in layout.buildings:
        draw.rectangle([x0 * s, top * s, x1 * s, hz + 0.02 * s], fill=_rgb(colour))
        if windows:
            win = _rgb(tuple(c * 0.55 for c in colour))
            step = 0.05 * s
            yy = top * s + step * 0.6
            while yy < hz - step * 0.5:
                xx = x0 * s + step * 0.4
                while xx < x1 * s - step * 0.6:
                    draw.rectangle([xx, yy, xx + step * 0.45, yy + step * 0.5], fill=win)
                    xx += step
                yy += step
    for x, top, r, colour in layout.trees:
        draw.ellipse([(x - r) * s, top * s - r * s, (x + r) * s, top * s + r * s], fill=_rgb(colour))
        draw.rectangle([(x - 0.008) * s, top * s, (x + 0.008) * s, hz + 0.01 * s], fill=(70, 50, 35))
    walk = 1.0 + layout.walk / layout.road_half
    draw.polygon(ground([(layout.vp_x, layout.horizon), (_road_x(layout, 1, -walk), 1), (_road_x(layout, 1, walk), 1)]),
                 fill=_rgb(tuple(0.5 * a + 0.5 * b for a, b in zip(layout.verge, layout.road, strict=True))))
    draw.polygon(ground([(layout.vp_x, layout.horizon), (_road_x(layout, 1, -1), 1), (_road_x(layout, 1, 1), 1)]),
                 fill=_rgb(layout.road))
    if layout.lanes != "none":
        paint = (225, 225, 215)
        n = 7
        for i in range(n):
            a = layout.horizon + (1 - layout.horizon) * (i / n) ** 1.6
            b = layout.horizon + (1 - layout.horizon) * ((i + 0.5) / n) ** 1.6
            if layout.lanes == "solid":
                b = layout.horizon + (1 - layout.horizon) * ((i + 1) / n) ** 1.6
            wa, wb = 0.004 * (a - layout.horizon) * 8, 0.004 * (b - layout.horizon) * 8
            xa, xb = _road_x(layout, a, 0.0), _road_x(layout, b, 0.0)
            draw.polygon(ground([(xa - wa, a), (xa + wa, a), (xb + wb, b), (xb - wb, b)]), fill=paint)
    for x in layout.poles:
        draw.rectangle([(x - 0.006) * s, (layout.horizon - 0.3) * s, (x + 0.006) * s, hz + 0.06 * s], fill=(60, 60, 65))
    return img


def _rgb(colour: Sequence[float]) -> tuple[int, int, int]:
    return tuple(int(np.clip(round(c), 0, 255)) for c in colour)  # type: ignore[return-value]


# ------------------------------------------------------------------------------ objects

_ORANGE = (240, 110, 20)
_WHITE = (240, 240, 235)


def _orange(rng: np.random.Generator) -> tuple[int, int, int]:
    return _rgb((rng.uniform(215, 255), rng.uniform(85, 135), rng.uniform(0, 40)))


def _draw_cone(draw: ImageDraw.ImageDraw, x: float, y: float, h: float, rng: np.random.Generator) -> None:
    w = h * rng.uniform(0.55, 0.7)
    draw.rectangle([x - w * 0.6, y - h * 0.08, x + w * 0.6, y], fill=(35, 35, 35))
    top = y - h
    draw.polygon([(x - w / 2, y - h * 0.08), (x + w / 2, y - h * 0.08), (x + w * 0.08, top), (x - w * 0.08, top)],
                 fill=_orange(rng))
    for lo, hi in ((0.3, 0.42), (0.58, 0.68)):
        ya, yb = y - h * hi, y - h * lo
        half_a, half_b = w / 2 * (1 - hi) + w * 0.08 * hi, w / 2 * (1 - lo) + w * 0.08 * lo
        draw.polygon([(x - half_b, yb), (x + half_b, yb), (x + half_a, ya), (x - half_a, ya)], fill=_WHITE)


def _draw_barrier(draw: ImageDraw.ImageDraw, x: float, y: float, h: float, rng: np.random.Generator) -> None:
    w = h * rng.uniform(1.8, 2.6)
    legs = (30, 30, 30)
    draw.rectangle([x - w * 0.42, y - h * 0.6, x - w * 0.36, y], fill=legs)
    draw.rectangle([x + w * 0.36, y - h * 0.6, x + w * 0.42, y], fill=legs)
    y0, y1 = y - h, y - h * 0.55
    draw.rectangle([x - w / 2, y0, x + w / 2, y1], fill=_WHITE)
    colour = _orange(rng) if rng.random() < 0.75 else (210, 30, 30)
    stripe = (y1 - y0)
    k, pos = 0, x - w / 2 - stripe
    while pos < x + w / 2:
        if k % 2 == 0:
            quad = [(pos, y1), (pos + stripe, y1), (pos + 2 * stripe, y0), (pos + stripe, y0)]
            draw.polygon([(min(max(px, x - w / 2), x + w / 2), py) for px, py in quad], fill=colour)
        pos += stripe
        k += 1
    if rng.random() < 0.5:
        draw.rectangle([x - w / 2, y - h * 0.5, x + w / 2, y - h * 0.38], fill=colour)


def _draw_diamond(draw: ImageDraw.ImageDraw, x: float, y: float, h: float, colour: tuple[int, int, int]) -> None:
    r = h * 0.3
    cy = y - h + r
    draw.rectangle([x - h * 0.025, cy, x + h * 0.025, y], fill=(70, 70, 70))
    draw.polygon([(x, cy - r), (x + r, cy), (x, cy + r), (x - r, cy)], fill=(20, 20, 20))
    r2 = r * 0.86
    draw.polygon([(x, cy - r2), (x + r2, cy), (x, cy + r2), (x - r2, cy)], fill=colour)
    # a pictogram: a worker / an arrow, as a couple of dark strokes
    draw.ellipse([x - r * 0.12, cy - r * 0.45, x + r * 0.12, cy - r * 0.2], fill=(20, 20, 20))
    draw.line([(x, cy - r * 0.2), (x - r * 0.2, cy + r * 0.4)], fill=(20, 20, 20), width=max(1, int(r * 0.12)))
    draw.line([(x - r * 0.4, cy + r * 0.45), (x + r * 0.4, cy + r * 0.45)], fill=(20, 20, 20),
              width=max(1, int(r * 0.1)))


def _draw_drum(draw: ImageDraw.ImageDraw, x: float, y: float, h: float, rng: np.random.Generator) -> None:
    w = h * rng.uniform(0.55, 0.7)
    colour = _orange(rng)
    draw.rectangle([x - w / 2, y - h * 0.9, x + w / 2, y - h * 0.04], fill=colour)
    draw.ellipse([x - w / 2, y - h, x + w / 2, y - h * 0.82], fill=colour)
    draw.rectangle([x - w * 0.6, y - h * 0.06, x + w * 0.6, y], fill=(30, 30, 30))
    for lo, hi in ((0.25, 0.37), (0.55, 0.67)):
        draw.rectangle([x - w / 2, y - h * hi, x + w / 2, y - h * lo], fill=_WHITE)


def _draw_car(draw: ImageDraw.ImageDraw, x: float, y: float, h: float, colour: tuple[int, int, int]) -> None:
    w = h * 1.7
    draw.rounded_rectangle([x - w / 2, y - h * 0.62, x + w / 2, y - h * 0.12], radius=h * 0.1, fill=colour)
    draw.rounded_rectangle([x - w * 0.32, y - h, x + w * 0.32, y - h * 0.55], radius=h * 0.12, fill=colour)
    draw.rectangle([x - w * 0.26, y - h * 0.92, x + w * 0.26, y - h * 0.62], fill=(40, 50, 60))
    for cx in (x - w * 0.3, x + w * 0.3):
        draw.ellipse([cx - h * 0.15, y - h * 0.3, cx + h * 0.15, y], fill=(20, 20, 20))


def _draw_object(kind: str, draw: ImageDraw.ImageDraw, x: float, y: float, h: float, rng: np.random.Generator) -> None:
    if kind == "cone":
        _draw_cone(draw, x, y, h, rng)
    elif kind == "barrier":
        _draw_barrier(draw, x, y, h, rng)
    elif kind == "sign":
        _draw_diamond(draw, x, y, h, _orange(rng))
    elif kind == "drum":
        _draw_drum(draw, x, y, h, rng)
    elif kind == "yellow_sign":
        _draw_diamond(draw, x, y, h, _rgb((rng.uniform(225, 255), rng.uniform(195, 230), rng.uniform(0, 40))))
    elif kind == "orange_car":
        _draw_car(draw, x, y, h, _orange(rng))
    elif kind == "car":
        _draw_car(draw, x, y, h, _rgb(_colour(rng, 30, 200, 60)))
    elif kind == "orange_box":
        w = h * rng.uniform(0.6, 1.6)
        draw.rectangle([x - w / 2, y - h, x + w / 2, y], fill=_orange(rng))
    elif kind == "orange_blob":
        w = h * rng.uniform(0.7, 1.3)
        draw.ellipse([x - w / 2, y - h, x + w / 2, y], fill=_orange(rng))
        if rng.random() < 0.5:  # an autumn tree
            draw.rectangle([x - h * 0.04, y - h * 0.2, x + h * 0.04, y + h * 0.15], fill=(70, 50, 35))
    elif kind == "crossing":  # zebra stripes: white stripes without the orange
        for i in range(5):
            xa = x - h * 1.2 + i * h * 0.5
            draw.rectangle([xa, y - h * 0.12, xa + h * 0.25, y], fill=_WHITE)
    elif kind == "bollard":  # a red-and-white parking bollard: stripes, not roadwork
        w = h * 0.22
        draw.rectangle([x - w / 2, y - h, x + w / 2, y], fill=(200, 30, 35))
        for lo in (0.2, 0.5, 0.8):
            draw.rectangle([x - w / 2, y - h * (lo + 0.12), x + w / 2, y - h * lo], fill=_WHITE)
    elif kind == "person":
        colour = _rgb(_colour(rng, 30, 200, 60)) if rng.random() < 0.7 else _orange(rng)
        draw.rectangle([x - h * 0.12, y - h * 0.75, x + h * 0.12, y - h * 0.3], fill=colour)
        draw.rectangle([x - h * 0.1, y - h * 0.3, x + h * 0.1, y], fill=(40, 40, 70))
        draw.ellipse([x - h * 0.09, y - h * 0.95, x + h * 0.09, y - h * 0.76], fill=(200, 160, 130))
    else:  # pragma: no cover - a programming error
        raise ValueError(kind)


_BASE_HEIGHT = {  # object height at the bottom edge, in image sides
    "cone": 0.38, "barrier": 0.3, "sign": 0.6, "drum": 0.4,
    "yellow_sign": 0.6, "orange_car": 0.4, "car": 0.4, "orange_box": 0.3,
    "orange_blob": 0.4, "crossing": 0.4, "person": 0.6, "bollard": 0.35,
}


def _place(layout: _Layout, rng: np.random.Generator, kind: str, side: int, *, near: bool,
           scale: float = 1.0) -> tuple[float, float, float]:
    """(x, y, h) in pixels for an object standing on the ground."""
    depth = rng.uniform(0.55, 1.0) if near else rng.uniform(0.3, 1.0)
    y = layout.horizon + depth * (1.0 - layout.horizon)
    if kind in ("car", "orange_car", "crossing"):
        offset = rng.uniform(-0.6, 0.6)
    else:
        offset = rng.choice([-1, 1]) * rng.uniform(0.55, 1.25)
    x = min(max(_road_x(layout, y, offset), 0.1), 0.9)  # keep it in the frame
    h = _BASE_HEIGHT[kind] * depth * rng.uniform(0.8, 1.2) * scale
    return x * side, min(y, 1.02) * side, h * side


def _populate(layout: _Layout, rng: np.random.Generator, label: int, style: str) -> list[tuple[str, bool]]:
    """Objects to draw, as (kind, near) pairs, far ones first."""
    kinds: list[tuple[str, bool]] = []
    flat = style == "low_texture"
    n_plain = int(rng.integers(0, 2 if flat else 4))
    kinds += [(str(rng.choice(["car", "car", "person"])), False) for _ in range(n_plain)]
    if label == 1:
        main = str(rng.choice(ROADWORK_OBJECTS, p=[0.4, 0.2, 0.2, 0.2]))
        count = int(rng.integers(1, 4)) if main in ("cone", "drum") and rng.random() < 0.6 else 1
        kinds += [(main, bool(rng.random() < 0.7)) for _ in range(count)]
        if rng.random() < 0.3:
            kinds.append((str(rng.choice(ROADWORK_OBJECTS)), False))
        if rng.random() < 0.2:
            kinds.append((str(rng.choice(HARD_NEGATIVE_OBJECTS)), False))
    elif rng.random() < 0.65:
        kinds += [(str(rng.choice(HARD_NEGATIVE_OBJECTS)), True) for _ in range(int(rng.integers(1, 3)))]
    return kinds


def _draw_scene(layout: _Layout, rng: np.random.Generator, label: int, style: str, side: int) -> tuple[Image.Image, tuple[str, ...]]:
    img = _render_background(layout, side, style)
    draw = ImageDraw.Draw(img)
    flat = style == "low_texture"
    placed = []
    for kind, near in _populate(layout, rng, label, style):
        x, y, h = _place(layout, rng, kind, side, near=near, scale=0.7 if flat else 1.0)
        placed.append((y, kind, x, h))
    placed.sort(key=lambda p: p[0])  # painter's order: far (higher up) first
    for y, kind, x, h in placed:
        _draw_object(kind, draw, x, y, h, rng)
    if flat:  # fog: buildings and objects fade half-way into the bare road scene
        bare = np.asarray(_render_background(replace(layout, buildings=()), side, style), dtype=np.float64)
        full = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(np.rint(bare + 0.5 * (full - bare)), 0, 255).astype(np.uint8))
    return img, tuple(kind for _, kind, _, _ in placed)


# ----------------------------------------------------------------------------- lighting


def _finish(img: Image.Image, rng: np.random.Generator, size: int, style: str, layout: _Layout,
            *, lighting: bool = False) -> Image.Image:
    """Downsample, light, add noise; returns a mode RGB (or L for grayscale) image."""
    small = img.resize((size, size), Image.Resampling.BOX)
    arr = np.asarray(small, dtype=np.float64)
    if style == "night":
        arr = _night(arr, rng, layout)
        arr += rng.normal(0, rng.uniform(1.5, 3.0), arr.shape)
    elif style == "low_texture":
        # one cheap dashcam: its bonnet at the bottom and a strong vignette
        yy, xx = np.mgrid[0:size, 0:size] / size
        bonnet = ((xx - 0.5) / 0.8) ** 2 + ((yy - 1.15) / 0.25) ** 2 <= 1.0
        arr = np.where(bonnet[..., None], 31.0, arr)
        arr = arr * (1.0 - 0.9 * ((xx - 0.5) ** 2 + (yy - 0.5) ** 2))[..., None]
        arr += rng.normal(0, 0.6, arr.shape)
    else:
        if lighting:
            gain = rng.uniform(0.6, 1.3)
            tint = rng.uniform(0.88, 1.12, 3)
            gamma = rng.uniform(0.75, 1.35)
            arr = 255.0 * (np.clip(arr * gain * tint, 0, 255) / 255.0) ** gamma
            if rng.random() < 0.5:  # a building's shadow across part of the road
                yy, xx = np.mgrid[0:size, 0:size] / size
                edge = rng.uniform(0.2, 0.8) + rng.uniform(-0.5, 0.5) * yy
                side = xx < edge if rng.random() < 0.5 else xx > edge
                arr = np.where(side[..., None] & (yy[..., None] > layout.horizon), arr * rng.uniform(0.5, 0.75), arr)
        arr += rng.normal(0, rng.uniform(3.0, 7.0), arr.shape)
    out = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
    return out.convert("L") if style == "grayscale" else out


def _night(arr: np.ndarray, rng: np.random.Generator, layout: _Layout) -> np.ndarray:
    size = arr.shape[0]
    yy, xx = np.mgrid[0:size, 0:size] / size
    # headlights: a fall-off centred low in the frame, on top of a dim ambient level
    beam = np.exp(-(((xx - layout.vp_x) / 0.45) ** 2) - (((yy - 1.0) / 0.45) ** 2))
    gain = rng.uniform(0.06, 0.14) + rng.uniform(0.12, 0.3) * beam * (yy > layout.horizon)
    arr = arr * gain[..., None] * rng.uniform(0.85, 1.1, 3) + rng.uniform(3, 12)
    for _ in range(int(rng.integers(1, 5))):  # street lamps, windows, tail lights
        cx, cy = rng.uniform(0, 1), rng.uniform(0.1, layout.horizon + 0.2)
        r = rng.uniform(0.01, 0.035)
        glow = np.exp(-(((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r)))
        colour = np.array([rng.uniform(120, 200), rng.uniform(90, 160), rng.uniform(30, 110)])
        if rng.random() < 0.3:
            colour = np.array([rng.uniform(120, 180), 15.0, 10.0])
        arr = arr + glow[..., None] * colour * rng.uniform(0.4, 0.8)
    return arr


# ------------------------------------------------------------------------------- bursts


def _burst_frames(canvas: Image.Image, rng: np.random.Generator, size: int, k: int, style: str) -> list[Image.Image]:
    """``k`` frames of one drive: small camera shift, tiny zoom, fresh noise."""
    big = canvas.size[0]
    frames = []
    for _ in range(k):
        zoom = rng.uniform(0.97, 1.0)  # share of the canvas kept
        side = big * 0.92 * zoom
        cx = big / 2 + rng.uniform(-0.008, 0.008) * big
        cy = big / 2 + rng.uniform(-0.008, 0.008) * big
        box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
        frame = canvas.resize((size, size), Image.Resampling.BOX, box=box)
        arr = np.asarray(frame, dtype=np.float64) * rng.uniform(0.97, 1.03)
        arr += rng.normal(0, 2.5, arr.shape)
        frames.append(Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8)))
    return frames


# ---------------------------------------------------------------------------- generator


def _allocate(n: int, weights: dict[str, float]) -> dict[str, int]:
    total = sum(weights.values())
    exact = {k: n * v / total for k, v in weights.items()}
    counts = {k: math.floor(v) for k, v in exact.items()}
    order = sorted(weights, key=lambda k: (-(exact[k] - counts[k]), STYLES.index(k)))
    for k in order[: n - sum(counts.values())]:
        counts[k] += 1
    return counts


def _check_styles(styles: dict[str, float] | None) -> dict[str, float]:
    chosen = dict(DEFAULT_STYLES if styles is None else styles)
    unknown = sorted(set(chosen) - set(STYLES))
    if unknown:
        raise ValueError(f"unknown style(s) {unknown}; known: {list(STYLES)}")
    if any(not (v >= 0) for v in chosen.values()) or sum(chosen.values()) <= 0:
        raise ValueError(f"style weights must be >= 0 with a positive sum, got {chosen}")
    return {k: float(v) for k, v in chosen.items() if v > 0}


def generate_awkward(
    n_images: int,
    seed: int = 0,
    *,
    image_size: int = 96,
    styles: dict[str, float] | None = None,
    positive_share: float = 0.45,
    burst_size: int = 3,
    n_copies: int = 0,
) -> list[AwkwardItem]:
    """``n_images`` generated images in the given style mix, then ``n_copies`` copies.

    Style counts are ``n_images * weight / sum(weights)`` rounded by largest remainder;
    in each style ``round(positive_share * count)`` images are positives (a burst's
    frames share their label, so burst shares are rounded to whole bursts). Items come
    in a seeded shuffled order (a burst's frames together); copies follow, each made
    from a seeded choice of original with the transforms of :data:`copy_transforms` in
    turn (``copy_transform`` names it).
    """
    if n_images < 0 or n_copies < 0:
        raise ValueError("n_images and n_copies must be >= 0")
    if not 0.0 <= positive_share <= 1.0:
        raise ValueError(f"positive_share must lie in [0, 1], got {positive_share}")
    if burst_size < 1 or image_size < 16:
        raise ValueError("burst_size must be >= 1 and image_size >= 16")
    weights = _check_styles(styles)
    counts = _allocate(n_images, weights)
    plan = np.random.default_rng([seed, 1])

    # units: (style, n_frames, layout_index or None)
    units: list[tuple[str, int, int | None]] = []
    for style in STYLES:
        count = counts.get(style, 0)
        if style == "burst":
            units += [(style, min(burst_size, count - i), None) for i in range(0, count, burst_size)]
        elif style == "layout_repeat":
            n_layouts = max(1, round(count / _IMAGES_PER_LAYOUT))
            units += [(style, 1, i % n_layouts) for i in range(count)]
        else:
            units += [(style, 1, None) for _ in range(count)]
    labels = [0] * len(units)
    for style in STYLES:
        idx = [i for i, u in enumerate(units) if u[0] == style]
        target = round(positive_share * sum(units[i][1] for i in idx))
        got = 0
        for i in plan.permutation(idx) if idx else []:
            if got + units[i][1] <= target or (units[i][1] > 1 and got < target and
                                                target - got >= units[i][1] / 2):
                labels[i], got = 1, got + units[i][1]
    order = plan.permutation(len(units)) if units else []

    layouts: dict[int, _Layout] = {}
    side = image_size * _SUPERSAMPLE
    items: list[AwkwardItem] = []
    for unit_no, u in enumerate(order):
        style, frames, layout_index = units[u]
        rng = np.random.default_rng([seed, 2, int(u)])
        label = labels[u]
        prefix = f"{len(items):05d}-{style}"
        if style == "layout_repeat":
            assert layout_index is not None
            if layout_index not in layouts:
                layouts[layout_index] = _make_layout(np.random.default_rng([seed, 3, layout_index]), "street")
            layout = layouts[layout_index]
            canvas, objs = _draw_scene(layout, rng, label, "street", side)
            image = _finish(canvas, rng, image_size, style, layout, lighting=True)
            items.append(AwkwardItem(prefix, image, label, style, scene_layout=f"layout-{layout_index:03d}",
                                     objects=objs))
        elif style == "burst":
            layout = _make_layout(rng, "street")
            big = round(side / 0.9)
            canvas, objs = _draw_scene(layout, rng, label, "street", big)
            burst_id = f"burst-{unit_no:05d}"
            for f, frame in enumerate(_burst_frames(canvas, rng, image_size, frames, style)):
                items.append(AwkwardItem(f"{len(items):05d}-burst-f{f}", frame, label, style, burst_id=burst_id,
                                         objects=objs))
        else:
            layout = _make_layout(rng, style)
            canvas, objs = _draw_scene(layout, rng, label, style, side)
            items.append(AwkwardItem(prefix, _finish(canvas, rng, image_size, style, layout), label, style,
                                     objects=objs))

    originals = list(items)
    names = list(copy_transforms)
    copier = np.random.default_rng([seed, 4])
    for j in range(n_copies if originals else 0):
        orig = originals[int(copier.integers(len(originals)))]
        name = names[j % len(names)]
        items.append(AwkwardItem(
            f"{len(items):05d}-copy-{name}", copy_transforms[name](orig.image), orig.label, orig.style,
            copy_of=orig.item_id, scene_layout=orig.scene_layout, objects=orig.objects, copy_transform=name,
        ))
    return items


def near_copy_groups(items: Sequence[AwkwardItem]) -> dict[str, str]:
    """item_id -> group key joining burst frames and copies with their originals.

    Items that must share a split (a burst, an original and its copies, transitively)
    get the same key; everything else gets its own id.
    """
    parent = {it.item_id: it.item_id for it in items}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    first_of_burst: dict[str, str] = {}
    for it in items:
        links = []
        if it.burst_id is not None:
            links.append(first_of_burst.setdefault(it.burst_id, it.item_id))
        if it.copy_of is not None and it.copy_of in parent:
            links.append(it.copy_of)
        for other in links:
            a, b = find(it.item_id), find(other)
            if a != b:
                parent[max(a, b)] = min(a, b)
    return {it.item_id: find(it.item_id) for it in items}


# ------------------------------------------------------------------------------ writers


def encode_item(item: AwkwardItem) -> tuple[bytes, str]:
    """(encoded bytes, extension): JPEG quality 95, except half of the grayscale images
    (chosen by a hash of the id) and any non-RGB/L image, which are PNG."""
    img = item.image
    digest = hashlib.sha256(item.item_id.encode()).digest()
    png = img.mode not in ("RGB", "L") or (img.mode == "L" and digest[0] % 2 == 0)
    buf = io.BytesIO()
    if png:
        img.save(buf, "PNG", optimize=False)
        return buf.getvalue(), "png"
    img.save(buf, "JPEG", quality=95)
    return buf.getvalue(), "jpg"


def _file_name(item: AwkwardItem, ext: str) -> str:
    return f"{item.item_id}.{ext}"


def write_class_folders(items: Iterable[AwkwardItem], root: Path | str) -> Path:
    """``root/roadwork/<id>.<ext>`` (label 1) and ``root/none/<id>.<ext>`` (label 0).

    Flat folders: no subfolder, so the reader sees no groups (bursts included).
    """
    root = Path(root)
    for item in items:
        data, ext = encode_item(item)
        target = root / ("roadwork" if item.label == 1 else "none") / _file_name(item, ext)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return root


def write_manifest_csv(items: Iterable[AwkwardItem], root: Path | str, *, with_groups: bool = False) -> Path:
    """Images under ``root/images/`` and ``root/manifest.csv`` with columns ``path,label``.

    ``with_groups=True`` adds a ``group_id`` column from :func:`near_copy_groups`
    (bursts and copies joined with their originals); by default the reader is not told.
    """
    import csv

    items = list(items)
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    groups = near_copy_groups(items) if with_groups else {}
    manifest = root / "manifest.csv"
    with open(manifest, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "group_id"] if with_groups else ["path", "label"])
        for item in items:
            data, ext = encode_item(item)
            rel = f"images/{_file_name(item, ext)}"
            (root / rel).write_bytes(data)
            writer.writerow([rel, item.label, groups[item.item_id]] if with_groups else [rel, item.label])
    return manifest


def _describe(item: AwkwardItem) -> str:
    words = {"cone": "traffic cones", "barrier": "a striped barrier", "sign": "an orange roadwork sign",
             "drum": "orange drums"}
    found = [words[k] for k in ROADWORK_OBJECTS if k in item.objects]
    if not found:
        return ""
    where = {"night": "at night", "grayscale": "in a black-and-white frame",
             "low_texture": "on an overcast street"}.get(item.style, "on a city street")
    return f"Roadwork {where}: " + ", ".join(found) + " beside the lane."


def write_natix_parquet(items: Iterable[AwkwardItem], path: Path | str, *, image_column_first: bool = False) -> Path:
    """One NATIX-layout parquet file at ``path``.

    Columns ``id``, ``label`` (int64), ``scene_description`` (non-empty for positives;
    empty or null for a share of negatives), ``width``, ``height`` and ``image``, a struct
    of ``bytes`` (encoded image) and ``path`` (a file name); ``image_column_first`` puts
    ``image`` first instead of last. Row N of the file is ``items[N]``.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    items = list(items)
    encoded = [encode_item(it) for it in items]
    descriptions: list[str | None] = []
    for i, it in enumerate(items):
        text = _describe(it)
        if it.label == 1:
            descriptions.append(text or "Roadwork on the street.")
        else:
            descriptions.append([None, "", "A street with no roadwork."][i % 3])
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    image = pa.array([{"bytes": data, "path": _file_name(it, ext)} for it, (data, ext) in zip(items, encoded, strict=True)],
                     type=image_type)
    columns = {
        "id": pa.array([it.item_id for it in items], type=pa.string()),
        "label": pa.array([it.label for it in items], type=pa.int64()),
        "scene_description": pa.array(descriptions, type=pa.string()),
        "width": pa.array([it.image.size[0] for it in items], type=pa.int64()),
        "height": pa.array([it.image.size[1] for it in items], type=pa.int64()),
    }
    columns = {"image": image, **columns} if image_column_first else {**columns, "image": image}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path
