"""The street backdrop: lanes, markings, sidewalks, building facades and the skyline.

`sample_street` draws its layout from the scene's rng (and returns the lanes traffic can
use); `draw_street` paints it on the canvas before any item, far facades first.
"""

from __future__ import annotations

from roadwork_assets.core.data.synthetic.drawing import GLASS, WHITE, Painter, shade
from roadwork_assets.core.data.synthetic.palette import AWNINGS, BUILDINGS, pick
from roadwork_assets.core.data.synthetic.types import Color, Facade, Street

WARM = (210, 170, 110)  # lit window
LINE = (215, 215, 205)
YELLOW_LINE = (225, 180, 40)
Z_FAR = 260.0


# ---------------------------------------------------------------- sampling
def sample_street(rng) -> tuple[Street, tuple]:
    """The street and its lanes: (same-direction lane centres, oncoming lane centres,
    parking on the right, parking on the left)."""
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
            f = Facade(X=Xb + s * rng.uniform(0, 1.5), z0=z, z1=z + L, height=H, color=pick(rng, BUILDINGS),
                       glass=pick(rng, ((45, 55, 68), (110, 130, 150), (70, 80, 90))), seed=int(rng.integers(1 << 30)))
            if z < 45 and rng.random() < 0.18:  # ordinary shops: awnings in non-orange colours
                f.awning, f.striped = pick(rng, AWNINGS), bool(rng.random() < 0.5)
                f.sign = pick(rng, ((30, 30, 35), (200, 200, 200), (40, 80, 140), (150, 30, 30)))
            facades.append(f)
            z += L
    skyline, x = [], -160.0
    while x < 160:
        wdt = rng.uniform(12, 35)
        skyline.append((x, x + wdt, rng.uniform(10, 80), pick(rng, ((150, 155, 165), (125, 130, 140)), 12)))
        x += wdt
    st = Street(road_l, road_r, walk_l, walk_r, asphalt, walk, lines, rng.uniform(0, 12),
                rng.uniform(8, 30) if rng.random() < 0.2 else None, patches, facades, skyline)
    return st, (same, oncoming, park_r, park_l)


# ---------------------------------------------------------------- drawing
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
