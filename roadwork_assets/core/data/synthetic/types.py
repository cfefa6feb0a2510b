"""The records a synthetic scene is made of, and the camera that projects them.

Everything is placed in world metres (X right, Y up, Z forward) and projected through a
level pinhole camera onto view units where the nominal frame is [0, 1]^2. Keeping the
world metric makes size, road perspective and occlusion order consistent: a cone looks
small *because* it is far, the way it does in a real dashcam frame.

Sampling (`sampling`) fills these records; drawing (`objects`, `street`) and rendering
(`rendering`) read them. Nothing here draws random numbers or pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

Color = tuple[int, int, int]

# Frame-to-frame camera motion (`rendering.camera_frame`). Sampling needs it too: objects
# meant to be seen are placed inside SAFE, the view region every frame's crop contains.
MAX_SHIFT = 0.025  # frame-to-frame camera shift (view units)
MAX_ZOOM = 1.08
SAFE = (0.5 - (0.5 / MAX_ZOOM - MAX_SHIFT), 0.5 + (0.5 / MAX_ZOOM - MAX_SHIFT))


@dataclass(frozen=True)
class Camera:
    """Level pinhole camera; `margin` is how far the canvas extends past the nominal view."""

    x_v: float  # vanishing point (view units)
    y_h: float  # horizon (view units)
    focal: float  # view units per unit of X/Z
    height: float  # metres above the road
    margin: float
    scale: float  # canvas pixels per view unit

    def view(self, X: float, Y: float, Z: float) -> tuple[float, float]:
        return self.x_v + self.focal * X / Z, self.y_h + self.focal * (self.height - Y) / Z

    def px(self, X: float, Y: float, Z: float) -> tuple[float, float]:
        u, v = self.view(X, Y, Z)
        return (u + self.margin) * self.scale, (v + self.margin) * self.scale

    def ppm(self, Z: float) -> float:
        """Canvas pixels per metre of a fronto-parallel object at depth Z."""
        return self.focal * self.scale / Z

    def lateral(self, u: float, Z: float) -> float:
        """World X that projects to view column u at depth Z."""
        return (u - self.x_v) * Z / self.focal


@dataclass
class Item:
    """One object standing on the road plane; (w, h) is its front face, for bounding boxes."""

    kind: str
    X: float
    Z: float
    w: float
    h: float
    roadwork: bool = False
    p: dict = field(default_factory=dict)

    def bbox(self, cam: Camera) -> tuple[float, float, float, float]:
        x0, y0 = cam.view(self.X - self.w / 2, self.h, self.Z)
        x1, y1 = cam.view(self.X + self.w / 2, 0.0, self.Z)
        return x0, y0, x1, y1


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
    skyline: list[tuple[float, float, float, Color]]  # (X0, X1, height, colour) at street.Z_FAR


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
