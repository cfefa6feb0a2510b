"""Sampling one street scene: what it contains and where everything stands.

`sample_scene` draws, from the scene's own rng, the camera, the street (lanes, markings,
facades, skyline), the roadwork group or hard negative that decides its kind, ordinary
street life around it, and the lighting. Objects are placed by the on-screen size they
should have, so that depth follows from size the way it does in a real dashcam frame,
and nothing is added that would mostly hide a roadwork object.

Each object kind's own sampling (size, colours, variant) is its maker in `objects`; the
street layout is `street.sample_street`; the lighting is `lighting.sample_lighting`.
This module only decides which objects a scene has and where they stand.

The order of rng draws here is part of the dataset: changing it changes every image.
"""

from __future__ import annotations

import math

import numpy as np

from roadwork_assets.core.data.synthetic.lighting import sample_lighting
from roadwork_assets.core.data.synthetic.objects import (
    ROADWORK_GROUPS,
    make_car,
    make_person,
    make_school_bus,
    make_streetlight,
    make_traffic_light,
    make_tree,
    make_warning_sign,
)
from roadwork_assets.core.data.synthetic.palette import HATS, ORANGES, pick
from roadwork_assets.core.data.synthetic.street import sample_street
from roadwork_assets.core.data.synthetic.types import SAFE, Camera, Item, Scene, Street

ROADWORK_KINDS = ("cones", "drums", "barrier", "arrow_board", "work_sign", "workers")
HARD_NEGATIVE_KINDS = (
    "hard_orange_car", "hard_school_bus", "hard_orange_storefront",
    "hard_autumn_trees", "hard_person_orange", "hard_traffic_light",
)
LIGHTINGS = ("day", "dusk", "night", "rain")
_ROADWORK_P = (0.24, 0.14, 0.16, 0.12, 0.16, 0.18)
_HARD_NEG_P = (0.2, 0.1, 0.18, 0.18, 0.17, 0.17)
_LIGHTING_P = (0.45, 0.2, 0.2, 0.15)
_HARD_NEGATIVE_FRACTION = 0.4
_HARD_POSITIVE_FRACTION = 0.1  # a single tiny, occluded or half-out-of-frame object
_MARGIN = 0.06  # canvas beyond the nominal frame, room for the frame-to-frame shift


def sample_scene(rng: np.random.Generator, label: int, scale: float) -> Scene:
    """Compose one street scene (geometry, objects, lighting) from the scene's own rng."""
    cam = Camera(x_v=rng.uniform(0.4, 0.6), y_h=rng.uniform(0.36, 0.5), focal=rng.uniform(0.75, 1.0),
                 height=rng.uniform(1.2, 1.6), margin=_MARGIN, scale=scale)
    st, lanes = sample_street(rng)
    lighting = str(rng.choice(LIGHTINGS, p=_LIGHTING_P))
    if label:
        kind = str(rng.choice(ROADWORK_KINDS, p=_ROADWORK_P))
        mode = str(rng.choice(("tiny", "occluded", "edge"))) if rng.random() < _HARD_POSITIVE_FRACTION else "normal"
        items = _roadwork(rng, cam, st, kind, mode)
        if mode == "normal" and rng.random() < 0.45:  # mixed work zones
            other = str(rng.choice([k for k in ROADWORK_KINDS if k != kind]))
            items += _roadwork(rng, cam, st, other, "normal", frac=(0.02, 0.25))
        # hard-negative cues also appear in positives, so they cannot stand for "none"
        extra = [k for k in HARD_NEGATIVE_KINDS if rng.random() < 0.05]
    else:
        kind = "plain"
        if rng.random() < _HARD_NEGATIVE_FRACTION:
            kind = str(rng.choice(HARD_NEGATIVE_KINDS, p=_HARD_NEG_P))
        items, extra = [], [kind] if kind != "plain" else []
    protected = _protected_boxes(cam, items)
    for k in extra:
        items += [it for it in _hard_negative(rng, cam, st, k) if not _hides(protected, it, cam)]
    _add_background(rng, cam, st, items, protected, lanes, autumn="hard_autumn_trees" in extra)
    return Scene(cam=cam, street=st, items=items, label=label, kind=kind, lighting=lighting,
                 **sample_lighting(rng, lighting, cam, items))


# ---------------------------------------------------------------- layout
def _anchor(rng, cam: Camera, key_h, total_h, band, frac, u_range=(0.12, 0.88)) -> tuple[float, float]:
    """Depth from a log-uniform on-screen height fraction, lateral position inside band
    and inside the view columns u_range (so the object is really in frame)."""
    hf = math.exp(rng.uniform(math.log(frac[0]), math.log(frac[1])))
    Z = max(cam.focal * key_h / hf, cam.focal * cam.height / (0.92 - cam.y_h), cam.focal * total_h / 0.7, 1.5)
    xs = cam.lateral(u_range[0], Z), cam.lateral(u_range[1], Z)
    lo, hi = max(band[0], xs[0]), min(band[1], xs[1])
    if lo > hi:
        lo, hi = xs
    return rng.uniform(lo, hi), Z


def _roadwork(rng, cam, st: Street, kind, mode, frac=(0.07, 0.35)) -> list[Item]:
    """One roadwork group of `kind`; frac is the range of the first object's on-screen
    height (fraction of the frame) in normal mode. Hard modes give one lone object."""
    group = ROADWORK_GROUPS[kind]
    make = group.make
    if kind == "workers":  # people are thin: give them more height to be as visible
        frac = (frac[0] * 1.3, frac[1] * 1.3)
    if kind == "work_sign":  # signs stand at the roadside
        band = (st.road_r - 0.6, st.road_r + 1.5) if rng.random() < 0.7 else (st.road_l - 1.5, st.road_l + 0.6)
    else:
        band = (st.road_l + 0.5, st.road_r - 0.5)
    if mode == "tiny":  # a few pixels tall at 128 px
        X, Z = _anchor(rng, cam, group.key_h, group.total_h, band, (2.5 / 128, 5 / 128))
        return [make(rng, X, Z)]
    X, Z = _anchor(rng, cam, group.key_h, group.total_h, band, (0.07, 0.2) if mode != "normal" else frac)
    first = make(rng, X, Z)
    x0, _, x1, _ = first.bbox(cam)
    if mode == "edge":  # only 30-50 % of its width inside every frame
        vis, wn = rng.uniform(0.3, 0.5), x1 - x0
        u = SAFE[0] + vis * wn - wn / 2 if rng.random() < 0.5 else SAFE[1] - vis * wn + wn / 2
        first.X = cam.lateral(u, Z)
        return [first]
    if mode == "occluded":  # a nearer car hides 45-70 % of its bounding box width
        Zo, cover = Z * rng.uniform(0.5, 0.8), rng.uniform(0.45, 0.7)
        wn = cam.focal * 1.8 / Zo
        u = x0 + (1 - cover) * (x1 - x0) + wn / 2 if rng.random() < 0.5 else x1 - (1 - cover) * (x1 - x0) - wn / 2
        return [first, make_car(rng, cam.lateral(u, Zo), Zo, side=False)]
    items = [first]
    if kind in ("cones", "drums"):  # a line along the edge or a lane-closure taper
        n = int(rng.integers(0, 8 if kind == "cones" else 6))
        dz = rng.uniform(3, 7) if kind == "cones" else rng.uniform(4, 9)
        dx = rng.uniform(0.25, 0.7) * rng.choice((-1, 1)) if rng.random() < 0.5 else rng.uniform(-0.05, 0.05)
        items += [make(rng, X + k * dx, Z + k * dz) for k in range(1, n + 1)]
    elif kind == "barrier":
        items += [make(rng, X + k * (first.w + 0.2), Z) for k in range(1, int(rng.integers(0, 3)) + 1)]
    elif kind == "workers":
        items += [make(rng, X + rng.uniform(-2, 2), max(1.5, Z + rng.uniform(-1.5, 4)))
                  for _ in range(int(rng.integers(0, 4)))]
    elif kind == "work_sign" and rng.random() < 0.4:
        items.append(make(rng, X, Z + rng.uniform(15, 40)))
    return items


def _sidewalk_band(rng, st: Street) -> tuple[float, float]:
    return (st.road_r + 0.4, st.walk_r - 0.3) if rng.random() < 0.5 else (st.walk_l + 0.3, st.road_l - 0.4)


def _hard_negative(rng, cam, st: Street, kind) -> list[Item]:
    road = (st.road_l + 1.0, st.road_r - 1.0)
    if kind == "hard_orange_car":
        X, Z = _anchor(rng, cam, 1.45, 1.45, road, (0.04, 0.3))
        cars = [make_car(rng, X, Z, pick(rng, ORANGES))]
        for _ in range(int(rng.integers(0, 3))):
            cars.append(make_car(rng, rng.uniform(*road), rng.uniform(6, 60), pick(rng, ORANGES)))
        return cars
    if kind == "hard_school_bus":
        X, Z = _anchor(rng, cam, 3.1, 3.1, road, (0.08, 0.5))
        return [make_school_bus(rng, X, Z)]
    if kind == "hard_orange_storefront":
        near = sorted((f for f in st.facades if f.z0 > 2.0), key=lambda f: f.z0)[: int(rng.integers(1, 4))]
        for f in near:
            f.awning, f.striped = pick(rng, ORANGES), bool(rng.random() < 0.6)
            f.sign = pick(rng, ORANGES) if rng.random() < 0.6 else f.sign
        return []
    if kind == "hard_autumn_trees":  # plus every background tree turns (see _add_background)
        X, Z = _anchor(rng, cam, 6.0, 7.0, _sidewalk_band(rng, st), (0.15, 0.6))
        return [make_tree(rng, X, Z, autumn=True)]
    if kind == "hard_person_orange":
        people = []
        for _ in range(int(rng.integers(1, 4))):
            band = road if rng.random() < 0.3 else _sidewalk_band(rng, st)
            X, Z = _anchor(rng, cam, 1.75, 1.9, band, (0.05, 0.35))
            shirt = (210, 250, 40) if rng.random() < 0.2 else pick(rng, ORANGES)  # neon jogger
            people.append(make_person(rng, X, Z, shirt=shirt, hat=pick(rng, HATS) if rng.random() < 0.1 else None))
        return people
    # hard_traffic_light: amber lights, sometimes with a yellow pedestrian-warning diamond
    band = (st.road_r + 0.3, st.road_r + 1.2) if rng.random() < 0.6 else (st.road_l - 1.2, st.road_l - 0.3)
    X, Z = _anchor(rng, cam, 1.0, 4.4, band, (0.04, 0.2))
    items = [make_traffic_light(rng, X, Z, "amber")]
    if rng.random() < 0.6:
        items.append(make_traffic_light(rng, -X if rng.random() < 0.5 else X, Z + rng.uniform(0, 25), "amber"))
    if rng.random() < 0.5:
        Xs, Zs = _anchor(rng, cam, 1.0, 3.1, band, (0.04, 0.25))
        items.append(make_warning_sign(rng, Xs, Zs))
    return items


def _protected_boxes(cam: Camera, items: list[Item]) -> list[tuple[tuple[float, ...], float]]:
    """In-frame boxes (and depths) of the roadwork objects, which nothing may mostly hide."""
    boxes = []
    for it in items:
        if it.roadwork:
            x0, y0, x1, y1 = it.bbox(cam)
            box = (max(x0, SAFE[0]), max(y0, SAFE[0]), min(x1, SAFE[1]), min(y1, SAFE[1]))
            boxes.append((box, it.Z))
    return boxes


def _hides(protected, it: Item, cam: Camera) -> bool:
    """True if `it` stands in front of >30 % of the in-frame part of a roadwork object."""
    b = it.bbox(cam)
    for (x0, y0, x1, y1), z in protected:
        if z > it.Z:
            ov = max(0.0, min(x1, b[2]) - max(x0, b[0])) * max(0.0, min(y1, b[3]) - max(y0, b[1]))
            if ov > 0.3 * max(x1 - x0, 1e-9) * max(y1 - y0, 1e-9):
                return True
    return False


def _add_background(rng, cam, st: Street, items: list[Item], protected, lanes, autumn: bool) -> None:
    """Ordinary street life. Nothing is added that hides most of a roadwork object."""

    def add(it: Item) -> None:
        if not _hides(protected, it, cam):
            items.append(it)

    same, oncoming, park_r, park_l = lanes
    for on, X in ((park_r, st.road_r - 1.2), (park_l, st.road_l + 1.2)):
        z = rng.uniform(3, 15)
        while on and z < 90:
            if rng.random() < 0.55:
                add(make_car(rng, X + rng.uniform(-0.15, 0.15), z))
            z += rng.uniform(6, 14)
    for _ in range(int(rng.integers(0, 3))):
        add(make_car(rng, float(rng.choice(same)) + rng.uniform(-0.3, 0.3), rng.uniform(8, 80)))
    for _ in range(int(rng.integers(0, 3)) if oncoming else 0):
        add(make_car(rng, float(rng.choice(oncoming)) + rng.uniform(-0.3, 0.3), rng.uniform(8, 80), front=True))
    for s, edge in ((1, st.road_r), (-1, st.road_l)):
        z = rng.uniform(3, 12)
        while (autumn or rng.random() < 0.55) and z < 80:
            add(make_tree(rng, edge + s * rng.uniform(0.8, 1.4), z, autumn))
            z += rng.uniform(8, 16)
    if rng.random() < 0.5:
        s = 1 if rng.random() < 0.6 else -1
        edge, z = (st.road_r if s > 0 else st.road_l) + s * 0.5, rng.uniform(5, 20)
        lamp = (255, 160, 60) if rng.random() < 0.6 else (235, 240, 255)  # sodium or LED
        while z < 100:
            add(make_streetlight(edge, z, -s, lamp))
            z += rng.uniform(22, 35)
    for _ in range(int(rng.integers(0, 4))):
        add(make_person(rng, rng.uniform(*_sidewalk_band(rng, st)), rng.uniform(4, 50)))
    if rng.random() < 0.12:
        add(make_traffic_light(rng, st.road_r + 0.8, rng.uniform(10, 40), str(rng.choice(("red", "green")))))
