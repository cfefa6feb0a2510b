"""Scene lighting: sampled per scene (`sample_lighting`), applied by `rendering`.

Day, dusk, night and rain differ in sky colours, an ambient RGB gain, light pools at
night (headlights, street lamps), how strongly emitting surfaces glow (`EMISSION`), rain
haze and blur, and sensor noise.
"""

from __future__ import annotations

import numpy as np

from roadwork_assets.core.data.synthetic.types import Camera, Item, Scene

EMISSION = {"day": (0.15, 0.0), "dusk": (0.45, 0.35), "night": (0.9, 0.9), "rain": (0.4, 0.5)}  # (gain, bloom)


def sample_lighting(rng, lighting, cam: Camera, items: list[Item]) -> dict:
    """Scene-level light: sky colours, ambient RGB gain, light pools, haze, noise."""
    u = rng.uniform
    out = {"pools": [], "vignette": u(0.1, 0.5), "contrast": 1.0, "blur": 0.0, "streak": 0.0}
    if lighting == "day":
        overcast = rng.random() < 0.3
        out["sky"] = ((170, 175, 185), (212, 214, 218)) if overcast else ((70, 125, 205), (185, 210, 238))
        out["ambient"] = tuple(u(0.9, 1.1) * u(0.96, 1.04, 3))
        out["noise"], out["blur"] = u(2, 5), (u(0.2, 0.5) if rng.random() < 0.3 else 0.0)
    elif lighting == "dusk":
        out["sky"] = ((60, 60, 115), (235, u(120, 160), 80))
        out["ambient"] = tuple(np.array((1.0, 0.8, 0.62)) * u(0.5, 0.75))
        out["noise"] = u(3, 7)
    elif lighting == "night":
        out["sky"] = ((6, 8, 18), (30, 28, 40))
        out["ambient"] = tuple(np.array((0.22, 0.24, 0.32)) * u(0.7, 1.2))
        out["pools"].append((cam.x_v, 1.05, 0.4, 0.35, tuple(np.array((0.9, 0.85, 0.75)) * u(0.6, 1.0))))
        for it in items:
            if it.kind == "streetlight":
                X = it.X + it.p["side"] * 1.6
                ug, vg = cam.view(X, 0.0, it.Z)
                vl = cam.view(X, it.h, it.Z)[1]
                col = tuple(0.8 * c / 255 for c in it.p["lamp"])
                out["pools"].append((ug, (vg + vl) / 2, cam.focal * 5 / it.Z, max(0.7 * (vg - vl), 1e-3), col))
        out["noise"] = u(5, 11)
    else:  # rain
        out["sky"] = ((115, 120, 130), (165, 170, 175))
        out["ambient"] = tuple(np.array((0.82, 0.85, 0.9)) * u(0.7, 0.95))
        out.update(contrast=u(0.55, 0.8), blur=u(0.4, 0.9), streak=u(50, 110), noise=u(3, 7))
    out["ambient"] = tuple(float(a) for a in out["ambient"])
    return out


def lut(gains) -> list[int]:
    """Per-channel 8-bit gain table for Image.point."""
    table = np.arange(256, dtype=np.float64)[None, :] * np.asarray(gains, dtype=np.float64)[:, None]
    return np.clip(np.round(table), 0, 255).astype(np.int64).ravel().tolist()


def light_map(scene: Scene, v: np.ndarray) -> np.ndarray:
    """RGB gain: the ambient tint, plus light pools (headlights, street lamps) at night."""
    ambient = np.asarray(scene.ambient, dtype=np.float32)
    if not scene.pools:
        return ambient  # broadcasts; avoids a full-size gain map for most scenes
    gain = np.broadcast_to(ambient, (len(v), len(v), 3)).copy()
    for cu, cv, su, sv, col in scene.pools:  # square canvas: u uses the same grid as v
        g = np.exp(-(((v - cv) / sv) ** 2))[:, None] * np.exp(-(((v - cu) / su) ** 2))[None, :]
        gain += g[..., None] * np.asarray(col, dtype=np.float32)
    return gain
