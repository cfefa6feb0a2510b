"""Rendering a sampled scene: one lit canvas, then the camera's frames cut from it.

A scene is drawn once on a supersampled canvas slightly wider than the frame: first the
street (`street.draw_street`), then its items far to near (`objects.DRAW`), then lit as a
whole (`lighting`). Each frame is a crop of that canvas with a small camera shift/zoom
(within `types.MAX_SHIFT` / `types.MAX_ZOOM`), exposure jitter, vignette, sensor noise
and, in rain, streaks.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from roadwork_assets.core.data.synthetic.drawing import Painter
from roadwork_assets.core.data.synthetic.lighting import EMISSION, light_map, lut
from roadwork_assets.core.data.synthetic.objects import DRAW
from roadwork_assets.core.data.synthetic.street import draw_street
from roadwork_assets.core.data.synthetic.types import MAX_SHIFT, MAX_ZOOM, Item, Scene

_SENTINEL = (1, 2, 3)  # canvas background; pixels still equal to it are sky


def draw_items(pt: Painter, items: list[Item]) -> None:
    for it in sorted(items, key=lambda it: -it.Z):  # painter's algorithm, far to near
        pt.at(it.X, it.Z)
        DRAW[it.kind](pt, it)


def render_scene(scene: Scene, supersample: int) -> Image.Image:
    """Draw the scene on its canvas and light it: base * light + sky + emission + bloom.

    Uniform lighting runs as 8-bit lookup tables in Pillow (C); only night scenes, whose
    light pools vary per pixel, need a float pass in numpy.
    """
    cam = scene.cam
    side = round(cam.scale * (1 + 2 * cam.margin))
    base = Image.new("RGB", (side, side), _SENTINEL)
    emit = Image.new("RGB", (side, side), (0, 0, 0))
    pt = Painter(base, emit, cam)
    draw_street(pt, scene.street)
    draw_items(pt, scene.items)

    b = np.asarray(base)
    sky = (b[..., 0] == _SENTINEL[0]) & (b[..., 1] == _SENTINEL[1]) & (b[..., 2] == _SENTINEL[2])
    if scene.pools:
        v = (np.arange(side, dtype=np.float32) + 0.5) / cam.scale - cam.margin  # view coordinate
        lit = Image.fromarray(np.clip(b * light_map(scene, v), 0, 255).astype(np.uint8))
    else:
        lit = base.point(lut(scene.ambient))
    t = np.clip((np.arange(side) + 0.5) / (cam.scale * (cam.y_h + cam.margin)), 0.0, 1.0)[:, None, None]
    top, hor = (np.asarray(c, dtype=np.float64) for c in scene.sky)
    gradient = Image.fromarray(np.round(top * (1 - t) + hor * t).astype(np.uint8)).resize((side, side), Image.Resampling.NEAREST)
    lit.paste(gradient, mask=Image.fromarray(sky.astype(np.uint8) * 255))
    gain, bloom = EMISSION[scene.lighting]
    if pt.glowed:
        lit = ImageChops.add(lit, emit.point(lut((gain,) * 3)))
        if bloom > 0:
            lit = ImageChops.add(lit, emit.filter(ImageFilter.BoxBlur(0.015 * cam.scale)).point(lut((bloom,) * 3)))
    if scene.contrast < 1:  # haze: pull every channel toward its mean
        means = np.asarray(lit.histogram(), dtype=np.float64).reshape(3, 256) @ np.arange(256) / (side * side)
        table = np.arange(256)[None, :] * scene.contrast + means[:, None] * (1 - scene.contrast)
        lit = lit.point(np.clip(np.round(table), 0, 255).astype(np.int64).ravel().tolist())
    if scene.blur > 0:
        lit = lit.filter(ImageFilter.GaussianBlur(scene.blur * supersample))
    return lit


@functools.lru_cache(maxsize=8)
def _radius2(size: int) -> np.ndarray:
    r = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    return (r[:, None] ** 2 + r[None, :] ** 2)[..., None]


def camera_frame(canvas: Image.Image, scene: Scene, rng: np.random.Generator, size: int) -> Image.Image:
    """One dashcam frame: small shift/zoom of the canvas, exposure jitter, vignette, noise, rain."""
    cam = scene.cam
    half = 0.5 / rng.uniform(1.0, MAX_ZOOM)
    cx, cy = 0.5 + cam.margin + rng.uniform(-MAX_SHIFT, MAX_SHIFT, size=2)
    box = tuple(float(c) * cam.scale for c in (cx - half, cy - half, cx + half, cy + half))
    frame = canvas.resize((size, size), Image.Resampling.BILINEAR, box=box)
    arr = np.asarray(frame, dtype=np.float32)
    arr *= np.float32(rng.uniform(0.93, 1.07)) * (1 - np.float32(scene.vignette) * _radius2(size))  # exposure, vignette
    arr += rng.standard_normal(arr.shape, dtype=np.float32) * np.float32(scene.noise * rng.uniform(0.8, 1.2))
    if scene.streak > 0:
        mask = Image.new("L", (size, size), 0)
        d = ImageDraw.Draw(mask)
        slant, length = rng.uniform(-0.3, 0.3), rng.uniform(0.04, 0.1) * size
        for x, y in rng.uniform(-0.1, 1.0, size=(int(0.004 * size * size), 2)) * size:
            d.line([(x, y), (x + slant * length, y + length)], fill=255, width=1)
        m = np.asarray(mask, dtype=np.float32)[..., None] * np.float32(scene.streak / 255.0 / 255.0)  # mask 0..255 -> opacity
        arr = arr * (1 - m) + 215.0 * m
    return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8))
