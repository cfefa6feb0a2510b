"""Rendering a sampled scene: street backdrop, lighting and the camera's frames.

A scene is drawn once on a supersampled canvas slightly wider than the frame: first the
street (skyline, road, markings, facades), then its items far to near (`scene_objects`),
then lit as a whole. Each frame is a crop of that canvas with a small camera shift/zoom,
exposure jitter, vignette, sensor noise and, in rain, streaks. The lighting parameters
are sampled here too (`sample_lighting`), next to the code that applies them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from roadwork_assets.core.data.scene_objects import (
    GLASS,
    WHITE,
    Camera,
    Color,
    Item,
    Painter,
    draw_items,
    shade,
)

WARM = (210, 170, 110)  # lit window
LINE = (215, 215, 205)
YELLOW_LINE = (225, 180, 40)
Z_FAR = 260.0


@dataclass
class Facade:
    X: float  # building line (metres); the facade faces the street
    z0: float
    z1: float
    height: float
    color: Color
    glass: Color
    seed: int  # picks which windows are lit
    awning: Color | None = None
    striped: bool = False
    sign: Color | None = None


@dataclass
class Street:
    road_l: float
    road_r: float
    walk_l: float
    walk_r: float
    asphalt: Color
    walk: Color
    lines: list[tuple[float, str]]  # (X, "dash" | "solid" | "double_yellow")
    dash_phase: float
    crosswalk: float | None
    patches: list[tuple[float, float, float, float, Color]]
    facades: list[Facade]
    skyline: list[tuple[float, float, float, Color]]  # (X0, X1, height, colour) at Z_FAR


# ---------------------------------------------------------------- street and buildings
def _ground(pt: Painter, x0, x1, z0, z1, col: Color, glow: Color | None = None) -> None:
    pt.world([(x0, 0, z0), (x1, 0, z0), (x1, 0, z1), (x0, 0, z1)], col, glow)


def draw_street(pt: Painter, st: Street) -> None:
    zn = 0.7
    for x0, x1, h, c in st.skyline:
        pt.world([(x0, 0, Z_FAR), (x0, h, Z_FAR), (x1, h, Z_FAR), (x1, 0, Z_FAR)], c)
    _ground(pt, st.walk_l - 60, st.walk_r + 60, zn, Z_FAR, st.walk)
    _ground(pt, st.road_l, st.road_r, zn, Z_FAR, st.asphalt)
    for x0, x1, z0, z1, c in st.patches:
        _ground(pt, x0, x1, z0, z1, c)
    curb = shade(st.walk, 1.15)
    _ground(pt, st.road_l - 0.2, st.road_l, zn, Z_FAR, curb)
    _ground(pt, st.road_r, st.road_r + 0.2, zn, Z_FAR, curb)
    for X, style in st.lines:
        if style == "solid":
            _ground(pt, X - 0.07, X + 0.07, zn, Z_FAR, LINE)
        elif style == "double_yellow":
            _ground(pt, X - 0.2, X - 0.08, zn, Z_FAR, YELLOW_LINE)
            _ground(pt, X + 0.08, X + 0.2, zn, Z_FAR, YELLOW_LINE)
        else:
            z = 1.0 + st.dash_phase
            while z < 110:
                _ground(pt, X - 0.07, X + 0.07, z, z + 3.0, LINE)
                z += 12.0
    if st.crosswalk is not None:
        x = st.road_l + 0.3
        while x < st.road_r - 0.6:
            _ground(pt, x, x + 0.55, st.crosswalk, st.crosswalk + 3.0, LINE)
            x += 1.1
    # far segments first so nearer buildings overlap them
    for f in sorted(st.facades, key=lambda f: -f.z0):
        draw_facade(pt, f)


def draw_facade(pt: Painter, f: Facade) -> None:
    cam, X = pt.cam, f.X
    inward = -1.0 if X > 0 else 1.0
    pt.world([(X, 0, f.z0), (X, f.height, f.z0), (X, f.height, f.z1), (X, 0, f.z1)], f.color)
    pt.world([(X, 0, f.z0), (X, f.height, f.z0), (X, f.height, f.z0 + 0.5), (X, 0, f.z0 + 0.5)], shade(f.color, 0.7))
    # Windows as glass columns cut into rows by facade-coloured floor bands: a handful of
    # polygons per facade instead of one per window.
    lim = cam.margin + 0.02
    rows = min(int((f.height - 2.7) // 3.2), 10)
    while rows >= 1 and cam.view(X, rows * 3.2 + 0.9, f.z1)[1] < -lim:
        rows -= 1  # window rows above the canvas even at the far end
    if rows >= 1:
        z, col, z_end = f.z0 + 1.0, 0, None
        y_lo, y_hi = 4.1, rows * 3.2 + 2.3
        while z + 1.6 < f.z1 and cam.ppm(z) * 1.4 >= 1.5:  # further columns are sub-pixel
            if -lim < cam.view(X, 0.0, z + 1.6)[0] < 1 + lim:
                lit = (col * 17 + f.seed) % 5 < 2
                pt.world([(X, y_lo, z), (X, y_hi, z), (X, y_hi, z + 1.6), (X, y_lo, z + 1.6)], f.glass, WARM if lit else None)
                z_end = z + 1.6
            z, col = z + 3.4, col + 1
        if z_end is not None:
            for fl in range(1, rows):
                y0, y1 = fl * 3.2 + 2.3, fl * 3.2 + 4.1
                pt.world([(X, y0, f.z0 + 0.9), (X, y1, f.z0 + 0.9), (X, y1, z_end), (X, y0, z_end)], f.color, (0, 0, 0))
    if f.awning is None:
        return
    za, zb = f.z0 + 0.8, f.z1 - 0.8
    pt.world([(X, 0.3, za), (X, 2.5, za), (X, 2.5, zb), (X, 0.3, zb)], GLASS, WARM)
    if f.sign is not None:
        pt.world([(X, 3.2, za), (X, 4.1, za), (X, 4.1, zb), (X, 3.2, zb)], f.sign)
    xo, z, i = X + inward * 1.4, za, 0
    while z < zb:
        z2 = min(zb, z + 0.7)
        col = WHITE if (f.striped and i % 2) else f.awning
        pt.world([(X, 3.0, z), (X, 3.0, z2), (xo, 2.5, z2), (xo, 2.5, z)], col)
        pt.world([(xo, 2.5, z), (xo, 2.5, z2), (xo, 2.2, z2), (xo, 2.2, z)], shade(col, 0.85))
        z, i = z2, i + 1


# ---------------------------------------------------------------- scene rendering
MAX_SHIFT = 0.025  # frame-to-frame camera shift (view units)
MAX_ZOOM = 1.08
# view region that every frame's crop contains: objects meant to be seen are placed inside
SAFE = (0.5 - (0.5 / MAX_ZOOM - MAX_SHIFT), 0.5 + (0.5 / MAX_ZOOM - MAX_SHIFT))
EMISSION = {"day": (0.15, 0.0), "dusk": (0.45, 0.35), "night": (0.9, 0.9), "rain": (0.4, 0.5)}  # (gain, bloom)
_SENTINEL = (1, 2, 3)  # canvas background; pixels still equal to it are sky


@dataclass
class Scene:
    cam: Camera
    street: Street
    items: list[Item]
    label: int
    kind: str
    lighting: str
    sky: tuple[Color, Color]  # (zenith, horizon), final colours
    ambient: tuple[float, float, float]  # RGB gain of the scene lighting
    pools: list[tuple[float, float, float, float, tuple[float, float, float]]]  # (u, v, su, sv, rgb)
    vignette: float  # lens falloff, applied per frame
    contrast: float  # < 1 pulls colours toward the mean (rain haze)
    blur: float  # output pixels
    noise: float  # sensor noise sigma, 8-bit units
    streak: float  # rain streak opacity (0..255)


def render_scene(scene: Scene, supersample: int) -> Image.Image:
    """Draw the scene on its canvas and light it: base * light + sky + emission + bloom.

    Uniform lighting runs as 8-bit lookup tables in Pillow (C); only night scenes, whose
    light pools vary per pixel, need a float pass in numpy.
    """
    cam = scene.cam
    side = int(round(cam.scale * (1 + 2 * cam.margin)))
    base = Image.new("RGB", (side, side), _SENTINEL)
    emit = Image.new("RGB", (side, side), (0, 0, 0))
    pt = Painter(base, emit, cam)
    draw_street(pt, scene.street)
    draw_items(pt, scene.items)

    b = np.asarray(base)
    sky = (b[..., 0] == _SENTINEL[0]) & (b[..., 1] == _SENTINEL[1]) & (b[..., 2] == _SENTINEL[2])
    if scene.pools:
        v = (np.arange(side, dtype=np.float32) + 0.5) / cam.scale - cam.margin  # view coordinate
        lit = Image.fromarray(np.clip(b * _light_map(scene, v), 0, 255).astype(np.uint8))
    else:
        lit = base.point(_lut(scene.ambient))
    t = np.clip((np.arange(side) + 0.5) / (cam.scale * (cam.y_h + cam.margin)), 0.0, 1.0)[:, None, None]
    top, hor = (np.asarray(c, dtype=np.float64) for c in scene.sky)
    gradient = Image.fromarray(np.round(top * (1 - t) + hor * t).astype(np.uint8)).resize((side, side), Image.Resampling.NEAREST)
    lit.paste(gradient, mask=Image.fromarray(sky.astype(np.uint8) * 255))
    gain, bloom = EMISSION[scene.lighting]
    if pt.glowed:
        lit = ImageChops.add(lit, emit.point(_lut((gain,) * 3)))
        if bloom > 0:
            lit = ImageChops.add(lit, emit.filter(ImageFilter.BoxBlur(0.015 * cam.scale)).point(_lut((bloom,) * 3)))
    if scene.contrast < 1:  # haze: pull every channel toward its mean
        means = np.asarray(lit.histogram(), dtype=np.float64).reshape(3, 256) @ np.arange(256) / (side * side)
        table = np.arange(256)[None, :] * scene.contrast + means[:, None] * (1 - scene.contrast)
        lit = lit.point(np.clip(np.round(table), 0, 255).astype(np.int64).ravel().tolist())
    if scene.blur > 0:
        lit = lit.filter(ImageFilter.GaussianBlur(scene.blur * supersample))
    return lit


def _lut(gains) -> list[int]:
    """Per-channel 8-bit gain table for Image.point."""
    table = np.arange(256, dtype=np.float64)[None, :] * np.asarray(gains, dtype=np.float64)[:, None]
    return np.clip(np.round(table), 0, 255).astype(np.int64).ravel().tolist()


def _light_map(scene: Scene, v: np.ndarray) -> np.ndarray:
    """RGB gain: the ambient tint, plus light pools (headlights, street lamps) at night."""
    ambient = np.asarray(scene.ambient, dtype=np.float32)
    if not scene.pools:
        return ambient  # broadcasts; avoids a full-size gain map for most scenes
    gain = np.broadcast_to(ambient, (len(v), len(v), 3)).copy()
    for cu, cv, su, sv, col in scene.pools:  # square canvas: u uses the same grid as v
        g = np.exp(-(((v - cv) / sv) ** 2))[:, None] * np.exp(-(((v - cu) / su) ** 2))[None, :]
        gain += g[..., None] * np.asarray(col, dtype=np.float32)
    return gain


def sample_lighting(rng, lighting, cam: Camera, items: list[Item]) -> dict:
    """Scene-level light: sky colours, ambient RGB gain, light pools, haze, noise."""
    u = rng.uniform
    out = {"pools": [], "vignette": u(0.1, 0.5), "contrast": 1.0, "blur": 0.0, "streak": 0.0}
    if lighting == "day":
        overcast = rng.random() < 0.3
        out["sky"] = ((170, 175, 185), (212, 214, 218)) if overcast else ((70, 125, 205), (185, 210, 238))
        out["ambient"] = tuple(u(0.9, 1.1) * u(0.96, 1.04, 3))
        out["noise"], out["blur"] = u(2, 5), (u(0.2, 0.5) if rng.random() < 0.3 else 0.0)
    elif lighting == "dusk":
        out["sky"] = ((60, 60, 115), (235, u(120, 160), 80))
        out["ambient"] = tuple(np.array((1.0, 0.8, 0.62)) * u(0.5, 0.75))
        out["noise"] = u(3, 7)
    elif lighting == "night":
        out["sky"] = ((6, 8, 18), (30, 28, 40))
        out["ambient"] = tuple(np.array((0.22, 0.24, 0.32)) * u(0.7, 1.2))
        out["pools"].append((cam.x_v, 1.05, 0.4, 0.35, tuple(np.array((0.9, 0.85, 0.75)) * u(0.6, 1.0))))
        for it in items:
            if it.kind == "streetlight":
                X = it.X + it.p["side"] * 1.6
                ug, vg = cam.view(X, 0.0, it.Z)
                vl = cam.view(X, it.h, it.Z)[1]
                col = tuple(0.8 * c / 255 for c in it.p["lamp"])
                out["pools"].append((ug, (vg + vl) / 2, cam.focal * 5 / it.Z, max(0.7 * (vg - vl), 1e-3), col))
        out["noise"] = u(5, 11)
    else:  # rain
        out["sky"] = ((115, 120, 130), (165, 170, 175))
        out["ambient"] = tuple(np.array((0.82, 0.85, 0.9)) * u(0.7, 0.95))
        out.update(contrast=u(0.55, 0.8), blur=u(0.4, 0.9), streak=u(50, 110), noise=u(3, 7))
    out["ambient"] = tuple(float(a) for a in out["ambient"])
    return out


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
