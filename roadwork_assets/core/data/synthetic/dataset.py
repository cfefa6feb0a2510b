"""Writing the default dataset: parameters, idempotence, the atomic swap into place and
the per-scene write loop (see the package docstring for what a scene is).

`scene_frames` is the whole generator for one scene: it samples the scene (`sampling`)
from the scene's own rng, renders it once (`rendering.render_scene`) and cuts its
`frames_per_scene` camera frames (`rendering.camera_frame`), which share a `group_id`.
Scene i depends only on (seed, i), never on n_images.
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
from PIL import Image

from roadwork_assets.core.data.synthetic.rendering import camera_frame, render_scene
from roadwork_assets.core.data.synthetic.sampling import sample_scene
from roadwork_assets.core.data.synthetic.types import Scene
from roadwork_assets.core.progress import Progress, no_progress

__all__ = ["GENERATOR_VERSION", "MANIFEST_COLUMNS", "generate_default_dataset", "scene_frames", "scene_label"]

GENERATOR_VERSION = "1.0.0"

MANIFEST_COLUMNS = ("path", "label", "group_id", "scene_kind", "lighting")
_SUPERSAMPLE = 2  # draw at 2x and downsample: cheap anti-aliasing for tiny objects
_JPEG_QUALITY = (80, 91)  # "about 85", varied so the artefacts are not constant
_PHI = (math.sqrt(5.0) - 1.0) / 2.0


def generate_default_dataset(
    out_dir: Path,
    n_images: int = 4000,
    seed: int = 0,
    image_size: int = 128,
    positive_fraction: float = 0.5,
    frames_per_scene: int = 2,
    progress: Progress = no_progress,
) -> Path:
    """Write JPEG street scenes + out_dir/manifest.csv; return the manifest path.
    ``progress("generate default dataset", done, total)`` is called as images are written.

    Idempotent: returns at once when out_dir already holds this exact dataset. Otherwise
    builds it in a temporary sibling directory and renames it over out_dir (which is
    replaced as a whole), so a crash never leaves a half-written dataset behind.
    """
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
        rows = _write_images(tmp, params, progress)
        with open(tmp / "manifest.csv", "w", newline="") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(MANIFEST_COLUMNS)
            writer.writerows(rows)
        summary = dict(params, n_scenes=len({r[2] for r in rows}), n_positive=sum(r[1] for r in rows))
        (tmp / "dataset.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        _swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def scene_label(seed: int, index: int, positive_fraction: float) -> int:
    """Golden-ratio sequence: every prefix of scenes is balanced to O(log n / n), and the
    label of scene i does not depend on how many scenes are generated."""
    offset = np.random.SeedSequence(seed).generate_state(1)[0] / 2.0**32
    return int((offset + index * _PHI) % 1.0 < positive_fraction)


def scene_frames(seed: int, index: int, positive_fraction: float, image_size: int,
                 n_frames: int) -> tuple[Scene, list[tuple[Image.Image, int]]]:
    """Scene `index` of the dataset and its first n_frames camera frames, each with the
    JPEG quality it is saved at. Depends only on (seed, index, positive_fraction,
    image_size): all randomness comes from the scene's own rng, in this order."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index,)))
    label = scene_label(seed, index, positive_fraction)
    scene = sample_scene(rng, label, image_size * _SUPERSAMPLE)
    canvas = render_scene(scene, _SUPERSAMPLE)
    frames = []
    for _ in range(n_frames):
        frame = camera_frame(canvas, scene, rng, image_size)
        frames.append((frame, int(rng.integers(*_JPEG_QUALITY))))
    return scene, frames


# ---------------------------------------------------------------- I/O
def _validate(n_images, seed, image_size, positive_fraction, frames_per_scene) -> None:
    def is_int(v) -> bool:
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    if not is_int(n_images) or n_images < 1:
        raise ValueError(f"n_images must be an integer >= 1, got {n_images!r}")
    if not is_int(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not is_int(image_size) or image_size < 16:
        raise ValueError(f"image_size must be an integer >= 16, got {image_size!r}")
    if isinstance(positive_fraction, bool) or not isinstance(positive_fraction, (int, float)) \
            or not 0.0 < positive_fraction < 1.0:
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
    """Replace out_dir by tmp: a crash leaves the old or the new dataset, never a mix."""
    stale = None
    if out_dir.exists():
        stale = out_dir.parent / f".{out_dir.name}.stale-{uuid.uuid4().hex[:8]}"
        os.replace(out_dir, stale)
    os.replace(tmp, out_dir)
    if stale is not None:
        shutil.rmtree(stale, ignore_errors=True)


def _write_images(root: Path, params: dict, progress: Progress = no_progress) -> list[tuple]:
    n, size, fps = params["n_images"], params["image_size"], params["frames_per_scene"]
    for sub in ("roadwork", "none"):
        (root / "images" / sub).mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(math.ceil(n / fps)):
        scene, frames = scene_frames(params["seed"], i, params["positive_fraction"], size, min(fps, n - i * fps))
        group = f"scene-{i:06d}"
        for f, (frame, quality) in enumerate(frames):
            rel = f"images/{'roadwork' if scene.label else 'none'}/{group}_f{f}.jpg"
            frame.save(root / rel, format="JPEG", quality=quality)
            rows.append((rel, scene.label, group, scene.kind, scene.lighting))
        progress("generate default dataset", len(rows), n)
    return rows
