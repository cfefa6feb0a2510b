"""Heatmaps of the worst val_test failures: Grad-CAM for CNN backbones, attention
rollout for ViT backbones.

Which failures (``select_failures``): the served answer is ``decision`` (1 roadwork,
0 none) against the label y. False negatives come first — a missed roadwork scene is the
error the policy's FNR guarantee is about — ranked by how sure the model was that
there was no roadwork (calibrated p ascending); then false positives, p descending.
The first ``top_k`` are explained.

Grad-CAM (Selvaraju et al. 2017), through the ``grad-cam`` package (pytorch-grad-cam):
for the feature map A^k of a convolutional layer and the roadwork margin
m = z_roadwork - z_none,

    w_k = mean_{i,j} dm / dA^k_ij,     L = ReLU(sum_k w_k A^k),

upsampled to the image and min-max scaled to [0, 1]. The layer is the last backbone
stage whose map is still at least ``min_cam_size`` cells wide (``cam_layer``): a 64 px
image leaves timm's ResNets a 2 x 2 last stage, too coarse to say where anything is.

Attention rollout (Abnar & Zuidema 2020), written here because pytorch-grad-cam has no
rollout (its ViT support is Grad-CAM on reshaped tokens): per block l, with the
heads' attention averaged, Ā_l = mean_h softmax(q_h k_h^T / sqrt(d)), and the residual
connection accounted for,

    Â_l = r Ā_l + (1 - r) I,   row-normalised,      R = Â_L Â_{L-1} ... Â_1,

(r = 0.5 in the paper). Every Â_l is row-stochastic, so R is too: row t of R is how much
of token t's final representation flows from each input token. The heatmap is the
class token's row over the patch tokens (a model pooled by averaging: the mean of the
patch rows), reshaped to the patch grid. Attention is recomputed from each block's
qkv projection (a forward hook on its input), so rollout works whichever kernel the
model serves with (SDPA, eager or the Triton one: they return no weights).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from pydantic import BaseModel, Field

from roadwork_assets.contracts.errors import BadInputError
from roadwork_assets.core.data.images import decode_image
from roadwork_assets.core.data.transforms import to_float, to_model_array


class ExplainConfig(BaseModel):
    """How many failures test_report explains, and how."""

    top_k: int = Field(6, ge=0, description="failures explained (false negatives first); 0: none")
    residual: float = Field(0.5, ge=0.0, le=1.0, description="rollout: weight r of attention "
                            "against the residual identity")
    min_cam_size: int = Field(4, ge=1, description="Grad-CAM: the layer's map must be at "
                              "least this many cells wide")
    panel_size: int = Field(160, ge=32, le=512, description="pixels per side of each panel")


@dataclass(frozen=True)
class Failure:
    index: int  # row in the evaluated arrays
    kind: str  # "false negative" | "false positive"
    label: int
    probability: float  # calibrated P(roadwork)


def select_failures(labels, decision, probability, top_k: int) -> list[Failure]:
    """The ``top_k`` worst failures: false negatives by p ascending, then false
    positives by p descending (ties: lower row first)."""
    y = np.asarray(labels).astype(np.int64).ravel()
    d = np.asarray(decision).astype(np.int64).ravel()
    p = np.asarray(probability, dtype=np.float64).ravel()
    if not (len(y) == len(d) == len(p)):
        raise BadInputError(f"labels ({len(y)}), decisions ({len(d)}) and probabilities "
                            f"({len(p)}) must have one entry per image")
    fn = np.flatnonzero((y == 1) & (d == 0))
    fp = np.flatnonzero((y == 0) & (d == 1))
    fn = fn[np.lexsort((fn, p[fn]))]
    fp = fp[np.lexsort((fp, -p[fp]))]
    out = [Failure(int(i), "false negative", 1, float(p[i])) for i in fn]
    out += [Failure(int(i), "false positive", 0, float(p[i])) for i in fp]
    return out[:top_k]


# ------------------------------------------------------------------- rollout
def attention_rollout(attentions, residual: float = 0.5) -> np.ndarray:
    """R = Â_L ... Â_1 with Â_l = row-normalised (r Ā_l + (1 - r) I).

    ``attentions``: per block, [T, T] or [H, T, T] (heads averaged) or [B, H, T, T];
    returns [T, T] or [B, T, T] float64, every row summing to 1."""
    mats = [np.asarray(a, dtype=np.float64) for a in attentions]
    if not mats:
        raise BadInputError("attention rollout needs the attention of at least one block")
    mats = [m.mean(axis=-3) if m.ndim >= 3 else m for m in mats]
    eye = np.eye(mats[0].shape[-1])
    out = None
    for a in mats:
        a_hat = residual * a + (1.0 - residual) * eye
        a_hat = a_hat / a_hat.sum(axis=-1, keepdims=True)
        out = a_hat if out is None else a_hat @ out
    return out


def _attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules()
            if all(hasattr(m, a) for a in ("qkv", "num_heads", "q_norm", "k_norm"))]


def is_vit(model: torch.nn.Module) -> bool:
    return bool(_attention_modules(model))


@torch.no_grad()
def block_attentions(model: torch.nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """Each attention block's softmax attention [B, H, T, T], recomputed from its qkv."""
    captured: list[torch.Tensor] = []

    def hook(module, args, _kwargs):
        x = args[0]
        b, n, _ = x.shape
        head_dim = module.qkv.out_features // (3 * module.num_heads)
        qkv = module.qkv(x).reshape(b, n, 3, module.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        q, k = module.q_norm(qkv[0]), module.k_norm(qkv[1])
        captured.append(torch.softmax(q @ k.transpose(-2, -1) * head_dim ** -0.5, dim=-1))

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True)
               for m in _attention_modules(model)]
    try:
        model(images)
    finally:
        for h in handles:
            h.remove()
    return captured


def rollout_maps(model: torch.nn.Module, images: torch.Tensor, residual: float = 0.5) -> np.ndarray:
    """[B, S, S] rollout heatmaps in [0, 1] of float images [B, 3, S, S]."""
    backbone = getattr(model, "backbone", model)
    rollout = attention_rollout([a.cpu().numpy() for a in block_attentions(model, images)],
                                residual)
    prefix = int(getattr(backbone, "num_prefix_tokens", 1))
    grid = tuple(backbone.patch_embed.grid_size)
    if prefix and getattr(backbone, "global_pool", "token") == "token":
        rows = rollout[:, 0, prefix:]
    else:  # average pooling: every patch token feeds the head equally
        rows = rollout[:, prefix:, prefix:].mean(axis=1)
    maps = torch.from_numpy(rows.reshape(len(rows), 1, *grid)).float()
    maps = torch.nn.functional.interpolate(maps, size=images.shape[-2:], mode="bilinear",
                                           align_corners=False)[:, 0].numpy()
    return _minmax(maps)


# ------------------------------------------------------------------ Grad-CAM
def cam_layer(model: torch.nn.Module, images: torch.Tensor, min_cam_size: int) -> torch.nn.Module:
    """The last top-level backbone stage with a [B, C, H, W] output at least
    ``min_cam_size`` wide (else the last spatial one)."""
    backbone = getattr(model, "backbone", model)
    shapes: dict[str, tuple[int, ...]] = {}
    handles = [child.register_forward_hook(
        lambda _m, _i, out, name=name: shapes.__setitem__(name, tuple(out.shape))
        if isinstance(out, torch.Tensor) else None)
        for name, child in backbone.named_children()]
    try:
        with torch.no_grad():
            model(images[:1])
    finally:
        for h in handles:
            h.remove()
    spatial = [n for n, s in shapes.items() if len(s) == 4 and min(s[2:]) > 1]
    if not spatial:
        raise BadInputError("Grad-CAM needs a convolutional stage with a spatial map; this "
                            "backbone has none (and no attention blocks for rollout)")
    wide = [n for n in spatial if min(shapes[n][2:]) >= min_cam_size]
    return getattr(backbone, (wide or spatial)[-1])


class _RoadworkMargin:
    """pytorch-grad-cam target: z_roadwork - z_none of one image's output."""

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        return output[..., 1] - output[..., 0]


def grad_cam_maps(model: torch.nn.Module, images: torch.Tensor, min_cam_size: int = 4) -> np.ndarray:
    """[B, S, S] Grad-CAM heatmaps in [0, 1] of the roadwork margin."""
    from pytorch_grad_cam import GradCAM

    layer = cam_layer(model, images, min_cam_size)
    # a frozen backbone has no parameter gradients: ask for the input's, so the
    # activations are part of an autograd graph
    x = images.clone().requires_grad_(True)
    with GradCAM(model=model, target_layers=[layer]) as cam:
        maps = cam(input_tensor=x, targets=[_RoadworkMargin() for _ in range(len(x))])
    return np.asarray(maps, dtype=np.float64)


def _minmax(maps: np.ndarray) -> np.ndarray:
    lo = maps.min(axis=(1, 2), keepdims=True)
    span = maps.max(axis=(1, 2), keepdims=True) - lo
    return np.where(span > 0, (maps - lo) / np.where(span > 0, span, 1.0), 0.0)


def heatmaps(model: torch.nn.Module, images_uint8: np.ndarray,
             config: ExplainConfig | None = None) -> tuple[np.ndarray, str]:
    """([N, S, S] heatmaps in [0, 1], method name) for uint8 images [N, 3, S, S]."""
    config = config or ExplainConfig()
    model = model.eval()
    images = to_float(torch.from_numpy(np.ascontiguousarray(images_uint8)))
    if is_vit(model):
        return rollout_maps(model, images, config.residual), "attention rollout"
    return grad_cam_maps(model, images, config.min_cam_size), "Grad-CAM"


# ----------------------------------------------------------------- rendering
def render_panel(image_uint8: np.ndarray, heatmap: np.ndarray, caption: str,
                 size: int = 160) -> bytes:
    """PNG bytes: the image, and the heatmap laid over it (jet), side by side, with a
    caption underneath."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    rgb = np.asarray(image_uint8).transpose(1, 2, 0).astype(np.float32) / 255.0
    overlay = show_cam_on_image(rgb, np.asarray(heatmap, dtype=np.float32), use_rgb=True)
    left = Image.fromarray(np.asarray(image_uint8).transpose(1, 2, 0)).resize((size, size))
    right = Image.fromarray(overlay).resize((size, size))
    canvas = Image.new("RGB", (2 * size + 4, size + 18), "white")
    canvas.paste(left, (0, 0))
    canvas.paste(right, (size + 4, 0))
    ImageDraw.Draw(canvas).text((2, size + 3), caption[:2 * size // 6], fill="black")
    buf = io.BytesIO()
    # 128-colour palette: the panels travel inline in Dagster's event log; a 24-bit
    # PNG of a photo is several times larger and looks the same at this size
    canvas.quantize(colors=128).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


@dataclass
class Explanation:
    failure: Failure
    item_id: str
    png: bytes | None  # None: the image could not be read (``error`` says why)
    method: str = ""
    error: str = ""

    @property
    def caption(self) -> str:
        return (f"{self.failure.kind}: {self.item_id} (label "
                f"{'roadwork' if self.failure.label else 'none'}, p={self.failure.probability:.3f})")


def explain_failures(model: torch.nn.Module, uris, item_ids, failures: list[Failure],
                     img_size: int, config: ExplainConfig | None = None) -> list[Explanation]:
    """Decode each failure's image as the model sees it and render its heatmap panel;
    an unreadable image becomes an Explanation with its error, the others go on."""
    config = config or ExplainConfig()
    out: list[Explanation] = []
    arrays, ok = [], []
    for f in failures:
        item = str(item_ids[f.index])
        try:
            arrays.append(to_model_array(decode_image(Path(uris[f.index]), item), img_size))
            ok.append(len(out))
        except BadInputError as exc:
            out.append(Explanation(f, item, None, error=str(exc)))
            continue
        out.append(Explanation(f, item, None))
    if arrays:
        stacked = np.stack(arrays)
        maps, method = heatmaps(model, stacked, config)
        for slot, img, hm in zip(ok, stacked, maps, strict=True):
            e = out[slot]
            e.method = method
            e.png = render_panel(img, hm, e.caption, config.panel_size)
    return out
