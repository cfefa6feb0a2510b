"""The embedded default dataset: generated dashcam street scenes, roadwork vs none.

This network reaches no dataset hub, so the default pipeline trains on scenes drawn here.
They are built to be hard in the ways real data is: roadwork objects at all sizes (some a
few pixels, some occluded or half out of frame), ~40 % of negatives carrying the same
colours (orange cars, awnings, autumn trees, people in orange, amber lights, school
buses), and dusk / night / rain removing contrast. The label is still decided by content:
a positive shows at least one roadwork object inside every one of its frames.

A scene is rendered once on a supersampled canvas slightly wider than the frame; its
`frames_per_scene` frames are crops with a small camera shift/zoom and fresh sensor noise
(consecutive dashcam frames), so they share a `group_id` that group-aware splits must
keep together. Scene i depends only on (seed, i), never on n_images.

Modules, in dependency order (each imports only those above it):

  types      the records (`Camera`, `Item`, `Facade`, `Street`, `Scene`) and the frame
             geometry (`SAFE`); no randomness, no pixels
  palette    colour palettes and `pick` (sampling colours)
  drawing    the two-layer `Painter` and shared paint colours
  objects    every object kind in one place: `make_<kind>` (sampling) beside
             `draw_<kind>` (drawing); the `DRAW` and `ROADWORK_GROUPS` registries
  street     the street backdrop: `sample_street` beside `draw_street`
  lighting   day / dusk / night / rain: `sample_lighting` and the light maps
  sampling   `sample_scene`: which objects a scene has and where they stand
  rendering  `render_scene` (draw + light the canvas) and `camera_frame`
  dataset    `generate_default_dataset`: the files, manifest and idempotence

The order of rng draws in `sampling`, `objects`, `street`, `lighting` and `rendering` is
part of the dataset: changing it changes every image (pinned by
roadwork_assets_tests/core/data/synthetic/test_output_pinned.py).
"""

from __future__ import annotations

from roadwork_assets.core.data.synthetic.dataset import (
    GENERATOR_VERSION,
    MANIFEST_COLUMNS,
    generate_default_dataset,
    scene_frames,
    scene_label,
)
from roadwork_assets.core.data.synthetic.sampling import (
    HARD_NEGATIVE_KINDS,
    LIGHTINGS,
    ROADWORK_KINDS,
    sample_scene,
)

__all__ = [
    "GENERATOR_VERSION",
    "HARD_NEGATIVE_KINDS",
    "LIGHTINGS",
    "MANIFEST_COLUMNS",
    "ROADWORK_KINDS",
    "generate_default_dataset",
    "sample_scene",
    "scene_frames",
    "scene_label",
]
