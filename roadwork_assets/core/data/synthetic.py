"""The embedded default dataset: generated dashcam street scenes, roadwork vs none.

This network reaches no dataset hub, so the default pipeline trains on scenes drawn here.
The scenes are built to be *hard in the right ways*: roadwork objects appear at all sizes
(some only a few pixels, some occluded or half out of frame), a large share of negatives
carry the same colours (orange cars, awnings, autumn trees, people in orange, amber lights,
school buses) and dusk / night / rain remove contrast. The label is still decided by the
content alone: a positive always shows at least one roadwork object in every frame.

Each scene is rendered once on a supersampled canvas a bit wider than the frame; its
`frames_per_scene` frames are crops with a small camera shift/zoom and fresh sensor noise
(consecutive dashcam frames), so they share a `group_id` that group-aware splits must keep
together. Scene i depends only on (seed, i), never on n_images.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from roadwork_assets.core.data import scene_layout as lay
from roadwork_assets.core.data.scene_objects import Painter, draw_items, draw_street

GENERATOR_VERSION = "1.0.0"

MANIFEST_COLUMNS = ("path", "label", "group_id", "scene_kind", "lighting")
_SUPERSAMPLE = 2  # draw at 2x and downsample: cheap anti-aliasing for tiny objects
_SENTINEL = (1, 2, 3)  # canvas background; pixels still equal to it are sky
_PHI = (math.sqrt(5.0) - 1.0) / 2.0
_JPEG_QUALITY = (80, 91)  # "about 85", varied so artefacts are not constant


def generate_default_dataset(
    out_dir: Path,
    n_images: int = 4000,
    seed: int = 0,
    image_size: int = 128,
    positive_fraction: float = 0.5,
    frames_per_scene: int = 2,
) -> Path:
    """Write JPEG street scenes + out_dir/manifest.csv; return the manifest path."""
    _validate(n_images, seed, image_size, positive_fraction, frames_per_scene)
    out_dir = Path(out_dir)
    params = {
        "generator_version": GENERATOR_VERSION,
        "n_images": int(n_images),
        "seed": int(seed),
        "image_size": int(image_size),
        "positive_fraction": float(positive_fraction),
        "frames_per_scene": int(frames_per_scene),
    }
    manifest = out_dir / "manifest.csv"
    if _is_complete(out_dir, params):
        return manifest

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        rows = _write_images(tmp, params)
        with open(tmp / "manifest.csv", "w", newline="") as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow(MANIFEST_COLUMNS)
            w.writerows(rows)
        summary = dict(params, n_scenes=len({r[2] for r in rows}), n_positive=sum(r[1] for r in rows))
        (tmp / "dataset.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        _swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _validate(n_images, seed, image_size, positive_fraction, frames_per_scene) -> None:
    def is_int(v) -> bool:
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    if not is_int(n_images) or n_images < 1:
        raise ValueError(f"n_images must be an integer >= 1, got {n_images!r}")
    if not is_int(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not is_int(image_size) or image_size < 16:
        raise ValueError(f"image_size must be an integer >= 16, got {image_size!r}")
    if not isinstance(positive_fraction, (int, float)) or not 0.0 < positive_fraction < 1.0:
        raise ValueError(f"positive_fraction must be in the open interval (0, 1), got {positive_fraction!r}")
    if not is_int(frames_per_scene) or frames_per_scene < 1:
        raise ValueError(f"frames_per_scene must be an integer >= 1, got {frames_per_scene!r}")


def _is_complete(out_dir: Path, params: dict) -> bool:
    try:
        meta = json.loads((out_dir / "dataset.json").read_text())
        if any(meta.get(k) != v for k, v in params.items()):
            return False
        with open(out_dir / "manifest.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, ValueError):
        return False
    return len(rows) == params["n_images"] and all((out_dir / r["path"]).is_file() for r in rows)


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    """Replace out_dir by tmp; a crash leaves either the old or the new dataset, never a mix."""
    stale = None
    if out_dir.exists():
        stale = out_dir.parent / f".{out_dir.name}.stale-{uuid.uuid4().hex[:8]}"
        os.replace(out_dir, stale)
    os.replace(tmp, out_dir)
    if stale is not None:
        shutil.rmtree(stale, ignore_errors=True)


def scene_label(seed: int, index: int, positive_fraction: float) -> int:
    """Golden-ratio sequence: every prefix of scenes is balanced to O(log n / n), and the
    label of scene i does not depend on how many scenes are generated."""
    offset = np.random.SeedSequence(seed).generate_state(1)[0] / 2.0**32
    return int((offset + index * _PHI) % 1.0 < positive_fraction)


def _write_images(root: Path, params: dict) -> list[tuple]:
    n, size, fps = params["n_images"], params["image_size"], params["frames_per_scene"]
    for sub in ("roadwork", "none"):
        (root / "images" / sub).mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(math.ceil(n / fps)):
        rng = np.random.default_rng(np.random.SeedSequence(params["seed"], spawn_key=(i,)))
        label = scene_label(params["seed"], i, params["positive_fraction"])
        scene = lay.sample_scene(rng, label, size * _SUPERSAMPLE)
        canvas = render_scene(scene)
        group = f"scene-{i:06d}"
        for f in range(min(fps, n - i * fps)):
            rel = f"images/{'roadwork' if label else 'none'}/{group}_f{f}.jpg"
            frame = _camera_frame(canvas, scene, rng, size)
            frame.save(root / rel, format="JPEG", quality=int(rng.integers(*_JPEG_QUALITY)))
            rows.append((rel, label, group, scene.kind, scene.lighting))
    return rows


# ---------------------------------------------------------------- rendering
def render_scene(scene: lay.Scene) -> Image.Image:
    """Draw the scene on the supersampled canvas and apply its lighting."""
    cam = scene.cam
    side = int(round(cam.scale * (1 + 2 * cam.margin)))
    base = Image.new("RGB", (side, side), _SENTINEL)
    emit = Image.new("RGB", (side, side), (0, 0, 0))
    pt = Painter(base, emit, cam)
    draw_street(pt, scene.street)
    draw_items(pt, scene.items)

    a = np.asarray(base, dtype=np.float32)
    sky_mask = (a[..., 0] == _SENTINEL[0]) & (a[..., 1] == _SENTINEL[1]) & (a[..., 2] == _SENTINEL[2])
    v = (np.arange(side, dtype=np.float32) + 0.5) / cam.scale - cam.margin  # view coordinate
    t = np.clip((v + cam.margin) / max(cam.y_h + cam.margin, 1e-3), 0.0, 1.0)[:, None, None]
    top, hor = (np.asarray(c, dtype=np.float32) for c in scene.sky)
    sky = top * (1 - t) + hor * t  # (side, 1, 3)
    out = a * _light_map(scene, v) + sky_mask[..., None] * (sky - a * _light_map_sky_fix(scene))
    e_gain, bloom = lay.EMISSION[scene.lighting]
    e = np.asarray(emit, dtype=np.float32)
    if e.any():
        out += e_gain * e
        if bloom > 0:
            radius = max(1.0, 0.012 * cam.scale)
            out += bloom * np.asarray(emit.filter(ImageFilter.BoxBlur(radius)), dtype=np.float32)
    if scene.lighting == "rain":  # haze: pull everything toward the mean
        out = out * scene.contrast + out.mean() * (1 - scene.contrast)
    img = Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))
    if scene.blur > 0:
        img = img.filter(ImageFilter.GaussianBlur(scene.blur * _SUPERSAMPLE))
    return img


def _light_map_sky_fix(scene: lay.Scene) -> np.ndarray:
    return np.float32(0.0)


def _light_map(scene: lay.Scene, v: np.ndarray) -> np.ndarray:
    """Per-pixel RGB gain: ambient tint, vignette, and at night headlight and lamp pools."""
    u = v  # square canvas: columns use the same coordinates as rows
    vig = 1.0 - scene.vignette * ((u[None, :] - 0.5) ** 2 + (v[:, None] - 0.5) ** 2)
    gain = np.asarray(scene.ambient, dtype=np.float32)[None, None, :] * vig[..., None]
    for cu, cv, su, sv, col in scene.pools:
        gx = np.exp(-(((u - cu) / su) ** 2))
        gy = np.exp(-(((v - cv) / sv) ** 2))
        gain = gain + (gy[:, None] * gx[None, :])[..., None] * np.asarray(col, dtype=np.float32)
    return gain.astype(np.float32)


def _camera_frame(canvas: Image.Image, scene: lay.Scene, rng: np.random.Generator, size: int) -> Image.Image:
    """One dashcam frame: small shift/zoom of the scene, exposure jitter, noise, rain."""
    cam = scene.cam
    zoom = rng.uniform(1.0, lay.MAX_ZOOM)
    cx = 0.5 + rng.uniform(-lay.MAX_SHIFT, lay.MAX_SHIFT) + cam.margin
    cy = 0.5 + rng.uniform(-lay.MAX_SHIFT, lay.MAX_SHIFT) + cam.margin
    half = 0.5 / zoom
    box = tuple(c * cam.scale for c in (cx - half, cy - half, cx + half, cy + half))
    frame = canvas.resize((size, size), Image.Resampling.BILINEAR, box=box)
    arr = np.asarray(frame, dtype=np.float32) * np.float32(rng.uniform(0.93, 1.07))
    arr += rng.standard_normal(arr.shape, dtype=np.float32) * np.float32(scene.noise * rng.uniform(0.8, 1.2))
    if scene.lighting == "rain":
        mask = Image.new("L", (size, size), 0)
        d = ImageDraw.Draw(mask)
        slant, length = rng.uniform(-0.25, 0.25), rng.uniform(0.04, 0.1) * size
        for x, y in rng.uniform(-0.1, 1.0, size=(int(0.006 * size * size), 2)) * size:
            d.line([(x, y), (x + slant * length, y + length)], fill=255, width=1)
        m = np.asarray(mask, dtype=np.float32)[..., None] * np.float32(scene.streak / 255.0)
        arr = arr * (1 - m) + 215.0 * m
    return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8))
