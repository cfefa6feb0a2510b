"""Drawing primitives: the two-layer `Painter` and the paint colours shared by all objects.

Each object's `draw_*` function (`objects`, `street`) paints into two layers: the base
colour layer and an emission layer (lamps, lit windows, retroreflective stripes) that the
lighting step adds back after darkening, so night scenes keep their lights.
"""

from __future__ import annotations

from PIL import Image, ImageDraw

from roadwork_assets.core.data.synthetic.types import Camera, Color

WHITE = (235, 235, 230)
REFLECT = (150, 150, 140)  # retroreflective sheeting lights up in headlights
AMBER = (255, 185, 40)
BLACK = (22, 22, 24)
GLASS = (45, 55, 68)


def shade(c: Color, f: float) -> Color:
    return (min(255, int(c[0] * f)), min(255, int(c[1] * f)), min(255, int(c[2] * f)))


class Painter:
    """Draws in local metres around an anchor (X, Z) on the road, y up."""

    def __init__(self, base: Image.Image, emit: Image.Image, cam: Camera):
        self.d, self.e, self.cam = ImageDraw.Draw(base), ImageDraw.Draw(emit), cam
        self.bx = self.by = 0.0
        self.k = 1.0
        self.glowed = False  # lets rendering skip the emission pass when nothing emits

    def at(self, X: float, Z: float) -> None:
        self.bx, self.by = self.cam.px(X, 0.0, Z)
        self.k = self.cam.ppm(Z)

    def poly(self, pts, fill: Color, glow: Color | None = None) -> None:
        xy = [(self.bx + self.k * x, self.by - self.k * y) for x, y in pts]
        self.d.polygon(xy, fill=fill)
        if glow:
            self.e.polygon(xy, fill=glow)
            self.glowed = True

    def rect(self, x0, y0, x1, y1, fill: Color, glow: Color | None = None) -> None:
        box = (self.bx + self.k * x0, self.by - self.k * y1, self.bx + self.k * x1, self.by - self.k * y0)
        self.d.rectangle(box, fill=fill)
        if glow:
            self.e.rectangle(box, fill=glow)
            self.glowed = True

    def ellipse(self, x0, y0, x1, y1, fill: Color, glow: Color | None = None) -> None:
        box = (self.bx + self.k * x0, self.by - self.k * y1, self.bx + self.k * x1, self.by - self.k * y0)
        self.d.ellipse(box, fill=fill)
        if glow:
            self.e.ellipse(box, fill=glow)
            self.glowed = True

    def world(self, pts3d, fill: Color, glow: Color | None = None) -> None:
        c = self.cam  # inlined projection: this is the hottest loop of the generator
        ox, oy, f, h, s = c.x_v + c.margin, c.y_h + c.margin, c.focal, c.height, c.scale
        xy = [((ox + f * X / Z) * s, (oy + f * (h - Y) / Z) * s) for X, Y, Z in pts3d]
        self.d.polygon(xy, fill=fill)
        if glow:
            self.e.polygon(xy, fill=glow)
            self.glowed = True
