"""Every object kind of the street scenes, each in one place: how it is sampled and drawn.

A maker `make_<kind>(rng, X, Z, ...)` returns an `Item` standing on the road at (X, Z)
with its sampled look in `Item.p`; the drawer `draw_<kind>(painter, item)` paints it in
local metres around that anchor (see `drawing.Painter`). Where objects stand is decided
by `sampling`; `DRAW` is what `rendering` dispatches on, and `ROADWORK_GROUPS` is what
`sampling` builds a roadwork group from.

The order of rng draws in a maker is part of the dataset: changing it changes every image.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from roadwork_assets.core.data.synthetic.drawing import (
    AMBER,
    BLACK,
    GLASS,
    REFLECT,
    WHITE,
    Painter,
    shade,
)
from roadwork_assets.core.data.synthetic.palette import (
    AUTUMN,
    CARS,
    GREEN,
    HAIR,
    HATS,
    ORANGES,
    PANTS,
    SHIRTS,
    SKIN,
    VESTS,
    pick,
)
from roadwork_assets.core.data.synthetic.types import Color, Item


# ================================================================ roadwork objects
# ---------------------------------------------------------------- traffic cone
def make_cone(rng, X, Z) -> Item:
    h = float(rng.choice((0.45, 0.7, 0.7, 0.9)))
    stripes = ((0.55, 0.68),) if h < 0.6 or rng.random() < 0.3 else ((0.45, 0.56), (0.67, 0.77))
    return Item("cone", X, Z, 0.6 * h, h, True, {"color": pick(rng, ORANGES), "stripes": stripes})


def draw_cone(pt: Painter, it: Item) -> None:
    h, c = it.h, it.p["color"]
    a, t, b = 0.24 * h, 0.045 * h, 0.06 * h

    def hw(y: float) -> float:
        return a + (t - a) * (y - b) / (h - b)

    pt.rect(-0.3 * h, 0, 0.3 * h, b, shade(c, 0.5))
    pt.poly([(-a, b), (a, b), (t, h), (-t, h)], c)
    pt.poly([(0.3 * a, b), (a, b), (t, h), (0.3 * t, h)], shade(c, 0.8))
    for f0, f1 in it.p["stripes"]:
        y0, y1 = f0 * h, f1 * h
        pt.poly([(-hw(y0), y0), (hw(y0), y0), (hw(y1), y1), (-hw(y1), y1)], WHITE, REFLECT)


# ---------------------------------------------------------------- channelizer drum
def make_drum(rng, X, Z) -> Item:
    return Item("drum", X, Z, 0.62, 1.0, True, {"color": pick(rng, ORANGES)})


def draw_drum(pt: Painter, it: Item) -> None:
    w, h, c = it.w, it.h, it.p["color"]
    pt.rect(-0.6 * w, 0, 0.6 * w, 0.07 * h, BLACK)
    pt.rect(-w / 2, 0.07 * h, w / 2, h, shade(c, 0.72), shade(c, 0.3))
    pt.rect(-0.32 * w, 0.07 * h, 0.18 * w, h, c, shade(c, 0.4))
    for f0, f1 in ((0.22, 0.34), (0.48, 0.6), (0.74, 0.86)):
        pt.rect(-w / 2, f0 * h, w / 2, f1 * h, shade(WHITE, 0.78), REFLECT)
        pt.rect(-0.32 * w, f0 * h, 0.18 * w, f1 * h, WHITE)
    pt.ellipse(-w / 2, h - 0.05, w / 2, h + 0.05, shade(c, 0.55))


# ---------------------------------------------------------------- barrier (plastic or type III)
def make_barrier(rng, X, Z) -> Item:
    if rng.random() < 0.35:
        return Item("barrier", X, Z, 1.8 * int(rng.integers(1, 3)), 0.9, True,
                    {"variant": "plastic", "color": pick(rng, ORANGES)})
    boards = int(rng.integers(2, 4))
    return Item("barrier", X, Z, rng.uniform(1.8, 2.6), 0.4 + 0.38 * boards, True,
                {"variant": "type3", "boards": boards, "color": pick(rng, ORANGES)})


def _striped_board(pt: Painter, x0, x1, y0, y1, c: Color, sw: float) -> None:
    pt.rect(x0, y0, x1, y1, WHITE, REFLECT)
    sl, x = y1 - y0, x0 - (y1 - y0)
    while x < x1:
        xs = [min(max(v, x0), x1) for v in (x, x + sw, x + sw + sl, x + sl)]
        pt.poly([(xs[0], y0), (xs[1], y0), (xs[2], y1), (xs[3], y1)], c, shade(c, 0.45))
        x += 2 * sw


def draw_barrier(pt: Painter, it: Item) -> None:
    w, h, c = it.w, it.h, it.p["color"]
    if it.p["variant"] == "plastic":  # water-filled plastic barrier segments
        n = max(1, round(w / 1.8))
        sw = w / n
        for i in range(n):
            x0 = -w / 2 + i * sw
            col = c if i % 2 == 0 else WHITE
            pt.poly([(x0, 0), (x0 + sw, 0), (x0 + 0.9 * sw, h), (x0 + 0.1 * sw, h)], col)
            pt.rect(x0 + 0.08 * sw, 0.55 * h, x0 + 0.92 * sw, 0.62 * h, shade(col, 0.75))
        return
    leg = (200, 200, 195)
    pt.rect(-w / 2 + 0.1, 0, -w / 2 + 0.2, h, leg)
    pt.rect(w / 2 - 0.2, 0, w / 2 - 0.1, h, leg)
    for j in range(it.p["boards"]):
        top = h - j * 0.38
        _striped_board(pt, -w / 2, w / 2, top - 0.22, top, c, 0.22)


# ---------------------------------------------------------------- arrow board (trailer)
_ARROWS = {
    "right": ("......*....", ".......*...", "**********.", ".......*...", "......*...."),
    "left": ("....*......", "...*.......", ".**********", "...*.......", "....*......"),
    "bar": ("...........", "...........", "***********", "...........", "..........."),
    "caution": ("*.........*", "...........", "....*.*....", "...........", "*.........*"),
}


def make_arrow_board(rng, X, Z) -> Item:
    pattern = str(rng.choice(("right", "left", "bar", "caution"), p=(0.4, 0.3, 0.15, 0.15)))
    return Item("arrow_board", X, Z, 2.5, 2.95, True, {"pattern": pattern})


def draw_arrow_board(pt: Painter, it: Item) -> None:
    pt.rect(-0.9, 0.35, 0.9, 0.85, (70, 70, 72))
    pt.rect(-0.8, 0, -0.5, 0.42, BLACK)
    pt.rect(0.5, 0, 0.8, 0.42, BLACK)
    pt.rect(-0.06, 0.85, 0.06, 1.7, (90, 90, 90))
    pt.rect(-1.25, 1.65, 1.25, 2.95, (40, 40, 40))
    pt.rect(-1.15, 1.75, 1.15, 2.85, BLACK)
    r = 0.075
    for row, line in enumerate(_ARROWS[it.p["pattern"]]):
        y = 2.74 - row * 0.22
        for col, ch in enumerate(line):
            if ch == "*":
                x = -1.0 + col * 0.2
                pt.ellipse(x - r, y - r, x + r, y + r, AMBER, AMBER)


# ---------------------------------------------------------------- diamond signs: work zone / warning
def make_diamond(rng, X, Z, color, glyph, kind="work_sign", roadwork=True) -> Item:
    stand = bool(rng.random() < 0.5)
    size, yc = rng.uniform(0.9, 1.2), (1.2 if stand else rng.uniform(1.7, 2.3))
    return Item(kind, X, Z, 1.3 * size, yc + 0.64 * size, roadwork,
                {"color": color, "glyph": glyph, "size": size, "yc": yc, "stand": stand})


def make_work_sign(rng, X, Z) -> Item:
    return make_diamond(rng, X, Z, pick(rng, ORANGES[:2]), str(rng.choice(("worker", "text"))))


def make_warning_sign(rng, X, Z) -> Item:
    """Yellow pedestrian-warning diamond: a hard negative, not roadwork."""
    return make_diamond(rng, X, Z, pick(rng, ((245, 210, 20),)), "pedestrian", "warning_sign", False)


def draw_diamond_sign(pt: Painter, it: Item) -> None:
    """Orange work-zone sign or (hard negative) yellow warning sign."""
    c, yc, glyph = it.p["color"], it.p["yc"], it.p["glyph"]
    d = 0.64 * it.p["size"]
    pole = (140, 140, 140)
    if it.p["stand"]:
        for s in (-1, 1):
            pt.poly([(s * 0.5, 0), (s * 0.45, 0), (0, yc - 0.6 * d), (s * 0.05, yc - 0.6 * d)], pole)
    else:
        pt.rect(-0.04, 0, 0.04, yc, pole)
    pt.poly([(0, yc + d), (d, yc), (0, yc - d), (-d, yc)], BLACK)
    e = 0.86 * d
    pt.poly([(0, yc + e), (e, yc), (0, yc - e), (-e, yc)], c, shade(c, 0.5))
    if glyph == "text":
        for i, hw in enumerate((0.42, 0.5, 0.36)):
            y = yc + 0.2 * d - i * 0.2 * d
            pt.rect(-hw * d, y - 0.05 * d, hw * d, y + 0.05 * d, BLACK)
        return
    pt.ellipse(-0.14 * d, yc + 0.26 * d, 0.02 * d, yc + 0.42 * d, BLACK)  # head
    pt.poly([(-0.16 * d, yc + 0.24 * d), (0.0, yc + 0.24 * d), (0.1 * d, yc - 0.18 * d), (-0.06 * d, yc - 0.18 * d)], BLACK)
    if glyph == "worker":  # digging figure with a pile
        pt.poly([(-0.06 * d, yc - 0.18 * d), (0.04 * d, yc - 0.18 * d), (-0.12 * d, yc - 0.55 * d), (-0.22 * d, yc - 0.55 * d)], BLACK)
        pt.poly([(0.14 * d, yc - 0.56 * d), (0.5 * d, yc - 0.56 * d), (0.3 * d, yc - 0.3 * d)], BLACK)
        pt.poly([(0.0, yc + 0.1 * d), (0.05 * d, yc + 0.14 * d), (0.32 * d, yc - 0.36 * d), (0.27 * d, yc - 0.4 * d)], BLACK)
    else:  # walking pedestrian (yellow warning sign)
        pt.poly([(-0.06 * d, yc - 0.18 * d), (0.04 * d, yc - 0.18 * d), (0.22 * d, yc - 0.56 * d), (0.1 * d, yc - 0.56 * d)], BLACK)
        pt.poly([(-0.06 * d, yc - 0.18 * d), (0.04 * d, yc - 0.18 * d), (-0.2 * d, yc - 0.56 * d), (-0.32 * d, yc - 0.56 * d)], BLACK)


# ================================================================ people
# ---------------------------------------------------------------- pedestrian / road worker
def make_person(rng, X, Z, shirt=None, vest=None, hat=None, tool=None, kind="person") -> Item:
    h = rng.uniform(1.6, 1.9)
    p = {"skin": pick(rng, SKIN, 5), "shirt": shirt or pick(rng, SHIRTS), "pants": pick(rng, PANTS),
         "hair": pick(rng, HAIR, 5), "stride": rng.uniform(0.0, 0.12), "vest": vest, "hat": hat, "tool": tool}
    return Item(kind, X, Z, 0.6 * h / 1.75, 1.05 * h, kind == "worker", p)


def make_worker(rng, X, Z) -> Item:
    hat = pick(rng, HATS) if rng.random() < 0.85 else None
    tool = str(rng.choice(("none", "shovel", "paddle"), p=(0.6, 0.25, 0.15)))
    return make_person(rng, X, Z, vest=pick(rng, VESTS), hat=hat, tool=tool, kind="worker")


def draw_person(pt: Painter, it: Item) -> None:
    """Pedestrian, or a worker when the item carries a vest (and usually a hard hat)."""
    p, s = it.p, it.h / 1.75
    st = p["stride"] * s
    pants, shirt, skin = p["pants"], p["shirt"], p["skin"]
    pt.poly([(-0.17 * s - st, 0), (-0.04 * s - st, 0), (-0.03 * s, 0.86 * s), (-0.17 * s, 0.86 * s)], pants)
    pt.poly([(0.04 * s + st, 0), (0.17 * s + st, 0), (0.17 * s, 0.86 * s), (0.03 * s, 0.86 * s)], shade(pants, 0.85))
    pt.rect(-0.2 * s, 0.84 * s, 0.2 * s, 1.5 * s, shirt)
    pt.rect(-0.28 * s, 0.9 * s, -0.2 * s, 1.47 * s, shade(shirt, 0.85))
    pt.rect(0.2 * s, 0.9 * s, 0.28 * s, 1.47 * s, shade(shirt, 0.85))
    pt.rect(-0.06 * s, 1.48 * s, 0.06 * s, 1.55 * s, skin)
    pt.ellipse(-0.1 * s, 1.53 * s, 0.1 * s, 1.76 * s, skin)
    vest = p.get("vest")
    if vest is not None:
        pt.rect(-0.21 * s, 0.95 * s, 0.21 * s, 1.48 * s, vest, shade(vest, 0.25))
        for y in (1.05, 1.22):
            pt.rect(-0.21 * s, y * s, 0.21 * s, (y + 0.055) * s, (205, 205, 200), REFLECT)
        pt.rect(-0.13 * s, 1.28 * s, -0.08 * s, 1.48 * s, (205, 205, 200), REFLECT)
        pt.rect(0.08 * s, 1.28 * s, 0.13 * s, 1.48 * s, (205, 205, 200), REFLECT)
    hat = p.get("hat")
    if hat is not None:
        pt.ellipse(-0.12 * s, 1.64 * s, 0.12 * s, 1.84 * s, hat)
        pt.rect(-0.15 * s, 1.64 * s, 0.15 * s, 1.68 * s, hat)
    else:
        pt.ellipse(-0.105 * s, 1.66 * s, 0.105 * s, 1.78 * s, p["hair"])
    if p.get("tool") == "shovel":
        pt.poly([(0.26 * s, 1.0 * s), (0.3 * s, 1.0 * s), (0.5 * s, 0.1 * s), (0.46 * s, 0.1 * s)], (110, 90, 60))
        pt.rect(0.4 * s, 0.0, 0.58 * s, 0.2 * s, (90, 90, 95))
    elif p.get("tool") == "paddle":
        pt.rect(0.28 * s, 0.9 * s, 0.31 * s, 1.9 * s, (120, 120, 120))
        pt.ellipse(0.17 * s, 1.8 * s, 0.43 * s, 2.06 * s, (200, 30, 30), REFLECT)


# ================================================================ vehicles
# ---------------------------------------------------------------- car / school bus
def make_car(rng, X, Z, color=None, front=False, side=True) -> Item:
    return Item("car", X, Z, 1.8, 1.45, False,
                {"color": color or pick(rng, CARS), "length": 4.5, "front": front, "side": side})


def make_school_bus(rng, X, Z) -> Item:
    return Item("bus", X, Z, 2.5, 3.1, False, {"color": pick(rng, ((245, 175, 10), (250, 150, 0))),
                                               "length": 11.0, "front": False})


def draw_car(pt: Painter, it: Item) -> None:
    """Car or school bus seen from behind (or from the front when oncoming), with its side."""
    w, h, L, c = it.w, it.h, it.p["length"], it.p["color"]
    bus = it.kind == "bus"
    X, Z = it.X, it.Z
    body_top = 1.1 if bus else 0.95
    if abs(X) > w / 2 and it.p.get("side", True):  # the inner side is visible
        xs = X - w / 2 if X > 0 else X + w / 2
        sc = shade(c, 0.8)
        pt.world([(xs, 0.3, Z), (xs, h, Z), (xs, h, Z + L), (xs, 0.3, Z + L)] if bus else
                 [(xs, 0.3, Z), (xs, body_top, Z), (xs, body_top, Z + L), (xs, 0.3, Z + L)], sc)
        if bus:
            pt.world([(xs, 1.1, Z), (xs, 1.2, Z), (xs, 1.2, Z + L), (xs, 1.1, Z + L)], BLACK)
            z = Z + 1.2
            while z + 0.9 < Z + L - 0.6:
                pt.world([(xs, 1.9, z), (xs, 2.7, z), (xs, 2.7, z + 0.9), (xs, 1.9, z + 0.9)], GLASS)
                z += 1.15
        else:
            pt.world([(xs, body_top, Z + 0.9), (xs, h, Z + 1.4), (xs, h, Z + L - 1.7), (xs, body_top, Z + L - 1.0)], GLASS)
        for z0 in (Z + 0.6, Z + L - 1.4):
            pt.world([(xs, 0.0, z0), (xs, 0.6, z0), (xs, 0.6, z0 + 0.8), (xs, 0.0, z0 + 0.8)], BLACK)
    pt.at(X, Z)
    pt.ellipse(-w / 2 - 0.15, -0.1, w / 2 + 0.15, 0.12, (18, 18, 18))
    pt.rect(-w / 2 + 0.05, 0, -w / 2 + 0.4, 0.42, BLACK)
    pt.rect(w / 2 - 0.4, 0, w / 2 - 0.05, 0.42, BLACK)
    lamp = (235, 235, 220) if it.p["front"] else (200, 25, 20)
    if bus:
        pt.rect(-w / 2, 0.35, w / 2, h, c)
        pt.rect(-w / 2, 0.35, w / 2, 0.55, BLACK)
        for y in (1.1, 1.7):
            pt.rect(-w / 2, y, w / 2, y + 0.08, BLACK)
        pt.rect(-1.0, 1.9, -0.1, 2.7, GLASS)
        pt.rect(0.1, 1.9, 1.0, 2.7, GLASS)
        for s in (-1, 1):
            pt.ellipse(s * (w / 2 - 0.25) - 0.12, 0.8, s * (w / 2 - 0.25) + 0.12, 1.04, lamp, lamp)
        return
    pt.rect(-w / 2, 0.25, w / 2, body_top, c)
    pt.rect(-w / 2, 0.25, w / 2, 0.4, shade(c, 0.55))
    pt.poly([(-w / 2 + 0.05, body_top), (w / 2 - 0.05, body_top), (w / 2 - 0.22, h), (-w / 2 + 0.22, h)], shade(c, 0.9))
    pt.poly([(-w / 2 + 0.18, body_top + 0.04), (w / 2 - 0.18, body_top + 0.04), (w / 2 - 0.3, h - 0.06), (-w / 2 + 0.3, h - 0.06)], GLASS)
    pt.rect(-w / 2 + 0.05, 0.7, -w / 2 + 0.32, 0.86, lamp, lamp)
    pt.rect(w / 2 - 0.32, 0.7, w / 2 - 0.05, 0.86, lamp, lamp)
    pt.rect(-0.2, 0.46, 0.2, 0.58, (225, 225, 215))


# ================================================================ street furniture and trees
# ---------------------------------------------------------------- tree (green or autumn)
def make_tree(rng, X, Z, autumn: bool) -> Item:
    r, trunk = rng.uniform(1.2, 2.4), rng.uniform(1.8, 3.0)
    pal = AUTUMN if autumn else GREEN
    blobs = [(rng.uniform(-0.5, 0.5) * r, rng.uniform(-0.4, 0.5) * r, rng.uniform(0.5, 0.8) * r, pick(rng, pal, 15))
             for _ in range(int(rng.integers(4, 7)))]
    return Item("tree", X, Z, 2 * r, trunk + 2 * r, False, {"trunk": trunk, "r": r, "blobs": blobs})


def draw_tree(pt: Painter, it: Item) -> None:
    ht, r = it.p["trunk"], it.p["r"]
    pt.rect(-0.13, 0, 0.13, ht + 0.5 * r, (80, 62, 48))
    cy = ht + r
    for dx, dy, rr, col in it.p["blobs"]:
        pt.ellipse(dx - rr, cy + dy - rr, dx + rr, cy + dy + rr, col)


# ---------------------------------------------------------------- street light
def make_streetlight(X, Z, side: int, lamp: Color) -> Item:
    """A lamp post whose arm reaches towards `side` (+1 right, -1 left); no rng draws."""
    return Item("streetlight", X, Z, 0.3, 8.0, False, {"side": side, "lamp": lamp})


def draw_streetlight(pt: Painter, it: Item) -> None:
    H, s = it.h, it.p["side"]
    grey = (95, 95, 100)
    pt.rect(-0.08, 0, 0.08, H, grey)
    pt.poly([(0, H - 0.1), (0, H), (s * 1.6, H + 0.15), (s * 1.6, H + 0.05)], grey)
    x0, x1 = sorted((s * 1.25, s * 1.75))
    pt.ellipse(x0, H - 0.05, x1, H + 0.12, (215, 210, 190), it.p["lamp"])


# ---------------------------------------------------------------- traffic light
_TL = (("red", (220, 30, 25)), ("amber", (255, 170, 0)), ("green", (40, 220, 120)))


def make_traffic_light(rng, X, Z, state) -> Item:
    H = rng.uniform(2.4, 3.4)
    housing = (30, 30, 32) if rng.random() < 0.7 else (200, 170, 30)
    return Item("traffic_light", X, Z, 0.45, H + 1.0, False, {"H": H, "state": state, "housing": housing})


def draw_traffic_light(pt: Painter, it: Item) -> None:
    H = it.p["H"]
    pt.rect(-0.07, 0, 0.07, H, (60, 62, 65))
    pt.rect(-0.21, H, 0.21, H + 1.0, it.p["housing"])
    for i, (name, on) in enumerate(_TL):
        y = H + 0.82 - i * 0.32
        lit = name == it.p["state"]
        pt.ellipse(-0.12, y - 0.12, 0.12, y + 0.12, on if lit else shade(on, 0.25), on if lit else None)


# ================================================================ registries
DRAW: dict[str, Callable[[Painter, Item], None]] = {
    "cone": draw_cone,
    "drum": draw_drum,
    "barrier": draw_barrier,
    "arrow_board": draw_arrow_board,
    "work_sign": draw_diamond_sign,
    "warning_sign": draw_diamond_sign,
    "worker": draw_person,
    "person": draw_person,
    "car": draw_car,
    "bus": draw_car,
    "tree": draw_tree,
    "streetlight": draw_streetlight,
    "traffic_light": draw_traffic_light,
}


class RoadworkGroup(NamedTuple):
    """How `sampling` places a roadwork group: its maker, and the heights (metres) of the
    part whose on-screen size is sampled (`key_h`) and of the whole object (`total_h`)."""

    make: Callable[..., Item]
    key_h: float
    total_h: float


ROADWORK_GROUPS: dict[str, RoadworkGroup] = {
    "cones": RoadworkGroup(make_cone, 0.7, 0.9),
    "drums": RoadworkGroup(make_drum, 1.0, 1.0),
    "barrier": RoadworkGroup(make_barrier, 1.0, 1.6),
    "arrow_board": RoadworkGroup(make_arrow_board, 1.3, 3.0),
    "work_sign": RoadworkGroup(make_work_sign, 1.0, 3.1),
    "workers": RoadworkGroup(make_worker, 1.8, 1.9),
}
