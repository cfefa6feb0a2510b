"""Colour palettes that objects, buildings and hard negatives are sampled from.

`pick` takes one palette colour with a small per-channel jitter, in one rng draw.
"""

from __future__ import annotations

from roadwork_assets.core.data.synthetic.types import Color

CARS = ((230, 230, 228), (25, 25, 28), (160, 162, 168), (95, 98, 105), (40, 60, 120),
        (150, 25, 30), (35, 70, 50), (190, 175, 140), (70, 110, 160))
ORANGES = ((250, 100, 10), (240, 120, 20), (255, 88, 0), (230, 105, 30))
BUILDINGS = ((150, 72, 55), (185, 165, 135), (205, 203, 196), (122, 122, 128), (112, 122, 142),
             (172, 132, 102), (92, 82, 78), (160, 150, 140))
AWNINGS = ((30, 100, 60), (40, 60, 130), (150, 30, 35), (230, 230, 225), (60, 60, 65))
GREEN = ((60, 110, 45), (45, 90, 40), (80, 125, 55), (35, 75, 35))
AUTUMN = ((220, 110, 20), (200, 70, 25), (230, 160, 35), (180, 60, 20), (210, 130, 40))
SKIN = ((230, 190, 160), (190, 140, 105), (140, 95, 65), (95, 65, 45))
SHIRTS = ((40, 40, 45), (200, 200, 200), (60, 80, 130), (120, 30, 40), (70, 100, 70), (150, 140, 120))
PANTS = ((35, 40, 60), (40, 40, 42), (90, 85, 75), (60, 70, 100))
HAIR = ((30, 25, 20), (70, 50, 30), (140, 110, 70))
VESTS = ((200, 250, 20), (255, 110, 10), (230, 255, 40))
HATS = ((240, 240, 235), (250, 200, 20), (255, 120, 10))


def pick(rng, palette, jitter: int = 10) -> Color:
    r = rng.integers(0, 1 << 30, 4).tolist()  # one draw: this is called thousands of times
    c = palette[r[0] % len(palette)]
    j = [v % (2 * jitter + 1) - jitter for v in r[1:]]
    return (min(255, max(0, c[0] + j[0])), min(255, max(0, c[1] + j[1])), min(255, max(0, c[2] + j[2])))
