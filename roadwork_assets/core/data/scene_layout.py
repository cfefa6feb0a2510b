"""Sampling one street scene: what it contains and where everything stands.

`sample_scene` draws, from the scene's own rng, the camera, the street (lanes, markings,
facades, skyline), the roadwork group or hard negative that decides its kind, ordinary
street life around it, and the lighting. Objects are placed by the on-screen size they
should have, so that depth follows from size the way it does in a real dashcam frame,
and nothing is added that would mostly hide a roadwork object.

The order of rng draws here is part of the dataset: changing it changes every image.
"""

from __future__ import annotations

import math

import numpy as np

from roadwork_assets.core.data.scene_objects import Camera, Item
from roadwork_assets.core.data.scene_render import SAFE, Facade, Scene, Street, sample_lighting

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
    st, lanes = _sample_street(rng)
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


# ---------------------------------------------------------------- palettes
_CARS = ((230, 230, 228), (25, 25, 28), (160, 162, 168), (95, 98, 105), (40, 60, 120),
         (150, 25, 30), (35, 70, 50), (190, 175, 140), (70, 110, 160))
_ORANGES = ((250, 100, 10), (240, 120, 20), (255, 88, 0), (230, 105, 30))
_BUILDINGS = ((150, 72, 55), (185, 165, 135), (205, 203, 196), (122, 122, 128), (112, 122, 142),
              (172, 132, 102), (92, 82, 78), (160, 150, 140))
_AWNINGS = ((30, 100, 60), (40, 60, 130), (150, 30, 35), (230, 230, 225), (60, 60, 65))
_GREEN = ((60, 110, 45), (45, 90, 40), (80, 125, 55), (35, 75, 35))
_AUTUMN = ((220, 110, 20), (200, 70, 25), (230, 160, 35), (180, 60, 20), (210, 130, 40))
_SKIN = ((230, 190, 160), (190, 140, 105), (140, 95, 65), (95, 65, 45))
_SHIRTS = ((40, 40, 45), (200, 200, 200), (60, 80, 130), (120, 30, 40), (70, 100, 70), (150, 140, 120))
_PANTS = ((35, 40, 60), (40, 40, 42), (90, 85, 75), (60, 70, 100))
_HAIR = ((30, 25, 20), (70, 50, 30), (140, 110, 70))
_VESTS = ((200, 250, 20), (255, 110, 10), (230, 255, 40))
_HATS = ((240, 240, 235), (250, 200, 20), (255, 120, 10))


def _pick(rng, palette, jitter: int = 10) -> tuple[int, int, int]:
    r = rng.integers(0, 1 << 30, 4).tolist()  # one draw: this is called thousands of times
    c = palette[r[0] % len(palette)]
    j = [v % (2 * jitter + 1) - jitter for v in r[1:]]
    return (min(255, max(0, c[0] + j[0])), min(255, max(0, c[1] + j[1])), min(255, max(0, c[2] + j[2])))


# ---------------------------------------------------------------- objects
def _cone(rng, X, Z) -> Item:
    h = float(rng.choice((0.45, 0.7, 0.7, 0.9)))
    stripes = ((0.55, 0.68),) if h < 0.6 or rng.random() < 0.3 else ((0.45, 0.56), (0.67, 0.77))
    return Item("cone", X, Z, 0.6 * h, h, True, {"color": _pick(rng, _ORANGES), "stripes": stripes})


def _drum(rng, X, Z) -> Item:
    return Item("drum", X, Z, 0.62, 1.0, True, {"color": _pick(rng, _ORANGES)})


def _barrier(rng, X, Z) -> Item:
    if rng.random() < 0.35:
        return Item("barrier", X, Z, 1.8 * int(rng.integers(1, 3)), 0.9, True,
                    {"variant": "plastic", "color": _pick(rng, _ORANGES)})
    boards = int(rng.integers(2, 4))
    return Item("barrier", X, Z, rng.uniform(1.8, 2.6), 0.4 + 0.38 * boards, True,
                {"variant": "type3", "boards": boards, "color": _pick(rng, _ORANGES)})


def _arrow_board(rng, X, Z) -> Item:
    pattern = str(rng.choice(("right", "left", "bar", "caution"), p=(0.4, 0.3, 0.15, 0.15)))
    return Item("arrow_board", X, Z, 2.5, 2.95, True, {"pattern": pattern})


def _diamond(rng, X, Z, color, glyph, kind="work_sign", roadwork=True) -> Item:
    stand = bool(rng.random() < 0.5)
    size, yc = rng.uniform(0.9, 1.2), (1.2 if stand else rng.uniform(1.7, 2.3))
    return Item(kind, X, Z, 1.3 * size, yc + 0.64 * size, roadwork,
                {"color": color, "glyph": glyph, "size": size, "yc": yc, "stand": stand})


def _work_sign(rng, X, Z) -> Item:
    return _diamond(rng, X, Z, _pick(rng, _ORANGES[:2]), str(rng.choice(("worker", "text"))))


def _person(rng, X, Z, shirt=None, vest=None, hat=None, tool=None, kind="person") -> Item:
    h = rng.uniform(1.6, 1.9)
    p = {"skin": _pick(rng, _SKIN, 5), "shirt": shirt or _pick(rng, _SHIRTS), "pants": _pick(rng, _PANTS),
         "hair": _pick(rng, _HAIR, 5), "stride": rng.uniform(0.0, 0.12), "vest": vest, "hat": hat, "tool": tool}
    return Item(kind, X, Z, 0.6 * h / 1.75, 1.05 * h, kind == "worker", p)


def _worker(rng, X, Z) -> Item:
    hat = _pick(rng, _HATS) if rng.random() < 0.85 else None
    tool = str(rng.choice(("none", "shovel", "paddle"), p=(0.6, 0.25, 0.15)))
    return _person(rng, X, Z, vest=_pick(rng, _VESTS), hat=hat, tool=tool, kind="worker")


def _car(rng, X, Z, color=None, front=False, side=True) -> Item:
    return Item("car", X, Z, 1.8, 1.45, False,
                {"color": color or _pick(rng, _CARS), "length": 4.5, "front": front, "side": side})


def _tree(rng, X, Z, autumn: bool) -> Item:
    r, trunk = rng.uniform(1.2, 2.4), rng.uniform(1.8, 3.0)
    pal = _AUTUMN if autumn else _GREEN
    blobs = [(rng.uniform(-0.5, 0.5) * r, rng.uniform(-0.4, 0.5) * r, rng.uniform(0.5, 0.8) * r, _pick(rng, pal, 15))
             for _ in range(int(rng.integers(4, 7)))]
    return Item("tree", X, Z, 2 * r, trunk + 2 * r, False, {"trunk": trunk, "r": r, "blobs": blobs})


def _traffic_light(rng, X, Z, state) -> Item:
    H = rng.uniform(2.4, 3.4)
    housing = (30, 30, 32) if rng.random() < 0.7 else (200, 170, 30)
    return Item("traffic_light", X, Z, 0.45, H + 1.0, False, {"H": H, "state": state, "housing": housing})


_MAKERS = {"cones": _cone, "drums": _drum, "barrier": _barrier, "arrow_board": _arrow_board,
           "work_sign": _work_sign, "workers": _worker}
_KEY_H = {"cones": 0.7, "drums": 1.0, "barrier": 1.0, "arrow_board": 1.3, "work_sign": 1.0, "workers": 1.8}
_TOTAL_H = {"cones": 0.9, "drums": 1.0, "barrier": 1.6, "arrow_board": 3.0, "work_sign": 3.1, "workers": 1.9}


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
    make = _MAKERS[kind]
    if kind == "workers":  # people are thin: give them more height to be as visible
        frac = (frac[0] * 1.3, frac[1] * 1.3)
    if kind == "work_sign":  # signs stand at the roadside
        band = (st.road_r - 0.6, st.road_r + 1.5) if rng.random() < 0.7 else (st.road_l - 1.5, st.road_l + 0.6)
    else:
        band = (st.road_l + 0.5, st.road_r - 0.5)
    if mode == "tiny":  # a few pixels tall at 128 px
        X, Z = _anchor(rng, cam, _KEY_H[kind], _TOTAL_H[kind], band, (2.5 / 128, 5 / 128))
        return [make(rng, X, Z)]
    X, Z = _anchor(rng, cam, _KEY_H[kind], _TOTAL_H[kind], band, (0.07, 0.2) if mode != "normal" else frac)
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
        return [first, _car(rng, cam.lateral(u, Zo), Zo, side=False)]
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
        cars = [_car(rng, X, Z, _pick(rng, _ORANGES))]
        for _ in range(int(rng.integers(0, 3))):
            cars.append(_car(rng, rng.uniform(*road), rng.uniform(6, 60), _pick(rng, _ORANGES)))
        return cars
    if kind == "hard_school_bus":
        X, Z = _anchor(rng, cam, 3.1, 3.1, road, (0.08, 0.5))
        return [Item("bus", X, Z, 2.5, 3.1, False, {"color": _pick(rng, ((245, 175, 10), (250, 150, 0))),
                                                    "length": 11.0, "front": False})]
    if kind == "hard_orange_storefront":
        near = sorted((f for f in st.facades if f.z0 > 2.0), key=lambda f: f.z0)[: int(rng.integers(1, 4))]
        for f in near:
            f.awning, f.striped = _pick(rng, _ORANGES), bool(rng.random() < 0.6)
            f.sign = _pick(rng, _ORANGES) if rng.random() < 0.6 else f.sign
        return []
    if kind == "hard_autumn_trees":  # plus every background tree turns (see _add_background)
        X, Z = _anchor(rng, cam, 6.0, 7.0, _sidewalk_band(rng, st), (0.15, 0.6))
        return [_tree(rng, X, Z, autumn=True)]
    if kind == "hard_person_orange":
        people = []
        for i in range(int(rng.integers(1, 4))):
            band = road if rng.random() < 0.3 else _sidewalk_band(rng, st)
            X, Z = _anchor(rng, cam, 1.75, 1.9, band, (0.05, 0.35))
            shirt = (210, 250, 40) if rng.random() < 0.2 else _pick(rng, _ORANGES)  # neon jogger
            people.append(_person(rng, X, Z, shirt=shirt, hat=_pick(rng, _HATS) if rng.random() < 0.1 else None))
        return people
    # hard_traffic_light: amber lights, sometimes with a yellow pedestrian-warning diamond
    band = (st.road_r + 0.3, st.road_r + 1.2) if rng.random() < 0.6 else (st.road_l - 1.2, st.road_l - 0.3)
    X, Z = _anchor(rng, cam, 1.0, 4.4, band, (0.04, 0.2))
    items = [_traffic_light(rng, X, Z, "amber")]
    if rng.random() < 0.6:
        items.append(_traffic_light(rng, -X if rng.random() < 0.5 else X, Z + rng.uniform(0, 25), "amber"))
    if rng.random() < 0.5:
        Xs, Zs = _anchor(rng, cam, 1.0, 3.1, band, (0.04, 0.25))
        items.append(_diamond(rng, Xs, Zs, _pick(rng, ((245, 210, 20),)), "pedestrian", "warning_sign", False))
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
        if it.Z < z:
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
                add(_car(rng, X + rng.uniform(-0.15, 0.15), z))
            z += rng.uniform(6, 14)
    for _ in range(int(rng.integers(0, 3))):
        add(_car(rng, float(rng.choice(same)) + rng.uniform(-0.3, 0.3), rng.uniform(8, 80)))
    for _ in range(int(rng.integers(0, 3)) if oncoming else 0):
        add(_car(rng, float(rng.choice(oncoming)) + rng.uniform(-0.3, 0.3), rng.uniform(8, 80), front=True))
    for s, edge in ((1, st.road_r), (-1, st.road_l)):
        z = rng.uniform(3, 12)
        while (autumn or rng.random() < 0.55) and z < 80:
            add(_tree(rng, edge + s * rng.uniform(0.8, 1.4), z, autumn))
            z += rng.uniform(8, 16)
    if rng.random() < 0.5:
        s = 1 if rng.random() < 0.6 else -1
        edge, z = (st.road_r if s > 0 else st.road_l) + s * 0.5, rng.uniform(5, 20)
        lamp = (255, 160, 60) if rng.random() < 0.6 else (235, 240, 255)  # sodium or LED
        while z < 100:
            add(Item("streetlight", edge, z, 0.3, 8.0, False, {"side": -s, "lamp": lamp}))
            z += rng.uniform(22, 35)
    for _ in range(int(rng.integers(0, 4))):
        add(_person(rng, rng.uniform(*_sidewalk_band(rng, st)), rng.uniform(4, 50)))
    if rng.random() < 0.12:
        add(_traffic_light(rng, st.road_r + 0.8, rng.uniform(10, 40), str(rng.choice(("red", "green")))))


def _sample_street(rng) -> tuple[Street, tuple]:
    n_left, n_right = int(rng.choice((0, 1, 1, 2, 3))), int(rng.choice((0, 0, 1)))
    park_r, park_l = bool(rng.random() < 0.6), bool(n_left and rng.random() < 0.4)
    road_r = 1.75 + 3.5 * n_right + (2.4 if park_r else 0.4)
    road_l = -(1.75 + 3.5 * n_left + (2.4 if park_l else 0.4))
    same_left = int(rng.integers(0, n_left + 1))  # left lanes in our direction; the rest oncoming
    lines = [(-1.75 - 3.5 * j, "double_yellow" if j == same_left else "dash") for j in range(n_left)]
    lines += [(1.75 + 3.5 * i, "dash") for i in range(n_right)]
    lines += [(1.75 + 3.5 * n_right, "solid")] if park_r else []
    lines += [(-1.75 - 3.5 * n_left, "solid")] if park_l else []
    same = [0.0] + [3.5 * (i + 1) for i in range(n_right)] + [-3.5 * (j + 1) for j in range(same_left)]
    oncoming = [-3.5 * (j + 1) for j in range(same_left, n_left)]
    g, w = rng.uniform(60, 105), rng.uniform(135, 180)
    asphalt, walk = (int(g), int(g), int(g * 1.03 + 2)), (int(w), int(w * 0.98), int(w * 0.95))
    walk_r, walk_l = road_r + rng.uniform(2, 5), road_l - rng.uniform(2, 5)
    patches = []
    for _ in range(int(rng.integers(0, 3))):
        x0, z0 = rng.uniform(road_l, road_r - 2), rng.uniform(5, 60)
        f = rng.uniform(0.8, 1.15)
        patches.append((x0, x0 + rng.uniform(1, 4), z0, z0 + rng.uniform(3, 15), tuple(int(min(255, c * f)) for c in asphalt)))
    facades = []
    for s, Xb in ((-1, walk_l), (1, walk_r)):
        z = rng.uniform(0.5, 5)
        while z < 150:
            if rng.random() < 0.12:  # side street / gap
                z += rng.uniform(6, 15)
                continue
            L = rng.uniform(6, 25)
            H = rng.uniform(4, 12) if rng.random() < 0.35 else rng.uniform(12, 35)
            f = Facade(X=Xb + s * rng.uniform(0, 1.5), z0=z, z1=z + L, height=H, color=_pick(rng, _BUILDINGS),
                       glass=_pick(rng, ((45, 55, 68), (110, 130, 150), (70, 80, 90))), seed=int(rng.integers(1 << 30)))
            if z < 45 and rng.random() < 0.18:  # ordinary shops: awnings in non-orange colours
                f.awning, f.striped = _pick(rng, _AWNINGS), bool(rng.random() < 0.5)
                f.sign = _pick(rng, ((30, 30, 35), (200, 200, 200), (40, 80, 140), (150, 30, 30)))
            facades.append(f)
            z += L
    skyline, x = [], -160.0
    while x < 160:
        wdt = rng.uniform(12, 35)
        skyline.append((x, x + wdt, rng.uniform(10, 80), _pick(rng, ((150, 155, 165), (125, 130, 140)), 12)))
        x += wdt
    st = Street(road_l, road_r, walk_l, walk_r, asphalt, walk, lines, rng.uniform(0, 12),
                rng.uniform(8, 30) if rng.random() < 0.2 else None, patches, facades, skyline)
    return st, (same, oncoming, park_r, park_l)
