"""Stage 2 of the cascade: multi-view input and aggregators over per-view logits.

Views (``ten_crop``): the four corners and the centre of the cached image, each at
``crop_scale`` of its side, each also mirrored left-right (torchvision's TenCrop order),
every crop resized back to the model's input size so the stage-1 backbone + head sees
the scale it was trained at. The default scale 0.875 is the classic 224/256 ten-crop
ratio: at the validator's 224 input a crop is 196 px (resized back to 224); at the CPU
default's 128 px cache it is 112 px. A corner crop loses an eighth of the frame on two
sides, which can drop the only cone (docs/domain.md, "Test-time augmentation"), so mean
aggregation can raise the miss rate: hence max and a learned aggregator, and the
comparison against the single full view that the model is served with today.

Aggregators map per-view logits [N, V, 2] to one pair of logits [N, 2]:
- ``mean_aggregate``: the mean of the views' logits.
- ``max_aggregate``: the logits of the view with the largest positive-class margin
  (z1 - z0): one view that sees roadwork is enough.
- ``AttentionAggregator``: softmax weights from per-view scores
  ``u·m_v/s + r·|m_v|/s + b_v`` (m_v the view's margin, s a fixed margin scale, b_v one
  bias per view position), pooled logits ``Σ w_v z_v``. V + 2 parameters; with all of
  them 0 it is the mean, u → +∞ the max, a large b_v trusts view v.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_CROP_SCALE = 0.875
CROP_POSITIONS = ("top_left", "top_right", "bottom_left", "bottom_right", "centre")
TEN_CROP_VIEWS: tuple[str, ...] = (*CROP_POSITIONS, *(f"{p}_hflip" for p in CROP_POSITIONS))
AGGREGATORS = ("mean", "max", "attention")


def crop_boxes(height: int, width: int, crop_scale: float) -> list[tuple[int, int, int, int]]:
    """(top, left, crop_h, crop_w) of the five crops, in ``CROP_POSITIONS`` order."""
    if not 0.0 < crop_scale <= 1.0:
        raise ValueError(f"crop_scale must be in (0, 1], got {crop_scale}")
    ch, cw = max(1, int(round(height * crop_scale))), max(1, int(round(width * crop_scale)))
    top_c, left_c = int(round((height - ch) / 2)), int(round((width - cw) / 2))
    return [(0, 0, ch, cw), (0, width - cw, ch, cw), (height - ch, 0, ch, cw),
            (height - ch, width - cw, ch, cw), (top_c, left_c, ch, cw)]


def ten_crop(images: torch.Tensor, crop_scale: float = DEFAULT_CROP_SCALE,
             out_size: int | None = None) -> list[torch.Tensor]:
    """[B, C, H, W] -> ten views in ``TEN_CROP_VIEWS`` order, each [B, C, out, out]
    (bilinear; ``out_size=None`` keeps the crop size, for inspecting the geometry)."""
    _, _, h, w = images.shape
    crops = [images[..., t:t + ch, left:left + cw]
             for t, left, ch, cw in crop_boxes(h, w, crop_scale)]
    if out_size is not None:
        crops = [F.interpolate(c, size=(out_size, out_size), mode="bilinear",
                               align_corners=False) for c in crops]
    return [*crops, *(torch.flip(c, dims=[3]) for c in crops)]


def margins(view_logits: np.ndarray) -> np.ndarray:
    """[N, V, 2] -> [N, V] positive-class margin z1 - z0 (> 0 means p > 0.5)."""
    return view_logits[..., 1] - view_logits[..., 0]


def mean_aggregate(view_logits: np.ndarray) -> np.ndarray:
    return view_logits.mean(axis=1)


def max_aggregate(view_logits: np.ndarray) -> np.ndarray:
    best = margins(view_logits).argmax(axis=1)
    return view_logits[np.arange(len(view_logits)), best]


class AttentionAggregator:
    """Learned softmax weights over views; ``fit(view_logits, labels)`` minimises the
    class-balanced NLL of the pooled logits plus ``l2``·‖params‖² (which pulls it
    towards the mean aggregator). Learned attributes end in ``_``."""

    def __init__(self, l2: float = 1e-2, max_iter: int = 200) -> None:
        self.l2 = l2
        self.max_iter = max_iter

    def fit(self, view_logits: np.ndarray, labels: np.ndarray) -> AttentionAggregator:
        z = torch.from_numpy(np.asarray(view_logits, dtype=np.float64))
        y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        n_views = z.shape[1]
        m = z[..., 1] - z[..., 0]
        self.margin_scale_ = float(m.std()) if float(m.std()) > 1e-6 else 1.0
        counts = torch.bincount(y, minlength=2).double()
        class_w = len(y) / (2 * counts.clamp(min=1))
        params = torch.zeros(n_views + 2, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([params], lr=1.0, max_iter=self.max_iter,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            pooled = self._pool(z, params)
            loss = F.cross_entropy(pooled, y, weight=class_w) + self.l2 * (params ** 2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        p = params.detach().numpy()
        if not np.isfinite(p).all():
            raise ValueError("attention aggregator diverged (non-finite parameters)")
        self.u_, self.r_, self.view_bias_ = float(p[0]), float(p[1]), p[2:].tolist()
        return self

    def _pool(self, z: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        return (self._weights(z, params).unsqueeze(-1) * z).sum(dim=1)

    def _weights(self, z: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        m = (z[..., 1] - z[..., 0]) / self.margin_scale_
        return torch.softmax(params[0] * m + params[1] * m.abs() + params[2:], dim=1)

    def _params(self) -> torch.Tensor:
        return torch.tensor([self.u_, self.r_, *self.view_bias_], dtype=torch.float64)

    def _check(self, view_logits: np.ndarray) -> torch.Tensor:
        if not hasattr(self, "u_"):
            raise ValueError("AttentionAggregator is not fitted")
        if view_logits.shape[1] != len(self.view_bias_):
            raise ValueError(f"fitted on {len(self.view_bias_)} views, got "
                             f"{view_logits.shape[1]}")
        return torch.from_numpy(np.asarray(view_logits, dtype=np.float64))

    def weights(self, view_logits: np.ndarray) -> np.ndarray:
        """[N, V] attention weights (rows sum to 1)."""
        return self._weights(self._check(view_logits), self._params()).numpy()

    def aggregate(self, view_logits: np.ndarray) -> np.ndarray:
        return self._pool(self._check(view_logits), self._params()).numpy().astype(np.float32)

    def to_params(self) -> dict[str, float | list[float]]:
        return {"u": self.u_, "r": self.r_, "view_bias": list(self.view_bias_),
                "margin_scale": self.margin_scale_, "l2": self.l2}

    @classmethod
    def from_params(cls, params: dict) -> AttentionAggregator:
        agg = cls(l2=float(params["l2"]))
        agg.u_, agg.r_ = float(params["u"]), float(params["r"])
        agg.view_bias_ = [float(b) for b in params["view_bias"]]
        agg.margin_scale_ = float(params["margin_scale"])
        if not all(math.isfinite(v) for v in (agg.u_, agg.r_, agg.margin_scale_,
                                               *agg.view_bias_)):
            raise ValueError("attention parameters are not finite")
        return agg


def aggregate(name: str, view_logits: np.ndarray,
              attention: AttentionAggregator | None = None) -> np.ndarray:
    """[N, V, 2] -> [N, 2] with the named aggregator."""
    if name == "mean":
        return mean_aggregate(view_logits).astype(np.float32)
    if name == "max":
        return max_aggregate(view_logits).astype(np.float32)
    if name == "attention":
        if attention is None:
            raise ValueError("the attention aggregator needs its fitted parameters")
        return attention.aggregate(view_logits)
    raise ValueError(f"unknown aggregator {name!r}; expected one of {AGGREGATORS}")



# ------------------------------------------------------------- stage 2 as one network
def torch_aggregate(name: str, z: torch.Tensor, attention: dict | None = None) -> torch.Tensor:
    """[B, V, 2] -> [B, 2] in torch, the same arithmetic as ``aggregate`` (so it exports to
    ONNX and serves what the graph's ``multiview_logits`` computed)."""
    if name == "mean":
        return z.mean(dim=1)
    m = z[..., 1] - z[..., 0]
    if name == "max":
        best = m.argmax(dim=1)
        return z[torch.arange(z.shape[0]), best]
    if name == "attention":
        if attention is None:
            raise ValueError("the attention aggregator needs its fitted parameters")
        s = float(attention["margin_scale"])
        bias = torch.tensor(attention["view_bias"], dtype=z.dtype)
        w = torch.softmax(float(attention["u"]) * m / s + float(attention["r"]) * m.abs() / s
                          + bias, dim=1)
        return (w.unsqueeze(-1) * z).sum(dim=1)
    raise ValueError(f"unknown aggregator {name!r}; expected one of {AGGREGATORS}")


class MultiviewModel(torch.nn.Module):
    """Stage 2 as one module: float images [B, 3, S, S] in [0, 1] -> pooled logits [B, 2].

    ``view_source='ten_crop'``: the ten crops of ``ten_crop`` resized to ``input_size``;
    ``'cached_views'``: the first ``n_views`` deterministic views of
    ``core.data.transforms.make_views`` (frozen mode). Every view goes through the stage-1
    network ``base`` in one batch, then ``aggregator`` pools them.
    """

    def __init__(self, base: torch.nn.Module, *, view_source: str, n_views: int,
                 crop_scale: float | None, input_size: int, aggregator: str,
                 attention: dict | None = None) -> None:
        super().__init__()
        if view_source not in ("ten_crop", "cached_views"):
            raise ValueError(f"unknown view_source {view_source!r}")
        if aggregator not in AGGREGATORS:
            raise ValueError(f"unknown aggregator {aggregator!r}; expected one of {AGGREGATORS}")
        self.base = base
        self.view_source, self.n_views = view_source, int(n_views)
        self.crop_scale = float(crop_scale or DEFAULT_CROP_SCALE)
        self.input_size, self.aggregator = int(input_size), aggregator
        self.attention = None if attention is None else dict(attention)

    def views(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.view_source == "ten_crop":
            return ten_crop(x, self.crop_scale, out_size=self.input_size)
        from roadwork_assets.core.data.transforms import make_views

        return make_views(x, self.n_views)

    def view_logits(self, x: torch.Tensor) -> torch.Tensor:
        """[B, V, 2] per-view logits."""
        views = self.views(x)
        out = self.base(torch.cat(views))
        return out.reshape(len(views), x.shape[0], 2).transpose(0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch_aggregate(self.aggregator, self.view_logits(x), self.attention)
