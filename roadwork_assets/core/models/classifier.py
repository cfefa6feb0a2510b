"""The classifier: a timm backbone, input normalisation, and a two-logit head.

Two backbone modes share this module:
- ``frozen``: a pretrained DINOv2/DINOv3 ViT read from a local weights file (this
  network reaches no model hub), never updated; only the head trains, on cached
  embeddings.
- ``end_to_end``: a small timm backbone trained from scratch on CPU. A randomly
  initialised *frozen* ViT gives chance-level features, so the default must train
  its backbone.

The model takes float images in [0, 1], [B, 3, H, W], and normalises inside, so the
exported ONNX graph and the predictor need no preprocessing beyond resize + /255.
"""

from __future__ import annotations

import sys
from pathlib import Path

import timm
import torch
from torch import nn

from roadwork_assets.contracts.errors import BadInputError
from roadwork_assets.core.models.weights import load_backbone_weights, read_weights_file


def create_backbone(
    name: str,
    *,
    img_size: int,
    weights_path: str | Path | None = None,
    drop_rate: float = 0.0,
    attn_impl: str = "sdpa",
) -> nn.Module:
    """A timm feature extractor (``num_classes=0``), optionally with local weights.

    Local weights are read by ``core.models.weights`` (safetensors, or ``torch.load``
    with ``weights_only=True``; never timm's own file loader), passed through timm's
    checkpoint filter for the architecture (DINOv2/DINOv3 key conversion, position
    embeddings resampled to ``img_size``) and loaded strictly.
    """
    kwargs: dict = {"num_classes": 0, "drop_rate": drop_rate}
    if _is_vit(name):
        kwargs["img_size"] = img_size
    # a missing or unsafe file fails before any model is built
    state = read_weights_file(weights_path) if weights_path is not None else None
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except Exception as exc:
        if "Unknown model" in str(exc) or "Invalid model" in str(exc):
            raise BadInputError(f"timm has no model named {name!r}: {exc}") from exc
        raise
    if weights_path is not None:
        load_backbone_weights(model, name, weights_path, state=state)
    set_attention_impl(model, attn_impl)
    return model


def _is_vit(name: str) -> bool:
    base = name.split(".")[0]
    return base.startswith(("vit_", "eva", "deit", "test_vit"))


def set_attention_impl(model: nn.Module, attn_impl: str) -> int:
    """Switch timm attention blocks between fused SDPA, the eager reference and the
    Triton kernel (``core.models.triton_attention``; refused for a CNN).

    Returns how many attention modules were switched (0 for a CNN).
    """
    if attn_impl not in {"sdpa", "eager", "triton"}:
        raise BadInputError(f"attn_impl must be 'sdpa', 'eager' or 'triton', got {attn_impl!r}")
    if attn_impl == "triton":
        # imported here: triton reads TRITON_INTERPRET when the kernel module is imported
        from roadwork_assets.core.models.triton_attention import use_triton_attention

        return use_triton_attention(model)
    if "roadwork_assets.core.models.triton_attention" in sys.modules:
        sys.modules["roadwork_assets.core.models.triton_attention"].restore_timm_attention(model)
    n = 0
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = attn_impl == "sdpa"
            n += 1
    return n


HEAD_TYPES = ("linear", "evidential")


class RoadworkClassifier(nn.Module):
    """backbone -> dropout -> Linear(dim, 2). Logit 1 is roadwork.

    ``head_type='evidential'`` (Sensoy et al. 2018) reads the linear outputs h as
    Dirichlet evidence e = softplus(h) and returns log alpha = log(e + 1): softmax of
    the output is then the Dirichlet mean alpha / S, so calibration, policies and ONNX
    export consume it like any two logits, and u = K / S = 2 / sum(exp(output)) is
    recoverable from the stored logits.
    """

    def __init__(self, backbone: nn.Module, head_dropout: float = 0.0,
                 head_type: str = "linear") -> None:
        super().__init__()
        if head_type not in HEAD_TYPES:
            raise BadInputError(f"head must be one of {HEAD_TYPES}, got {head_type!r}")
        self.head_type = head_type
        self.backbone = backbone
        cfg = getattr(backbone, "pretrained_cfg", {}) or {}
        mean = cfg.get("mean", (0.485, 0.456, 0.406))
        std = cfg.get("std", (0.229, 0.224, 0.225))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        # Feature standardisation before the head (identity unless a linear probe sets it):
        # folding it into the head weights loses float32 precision when some frozen
        # features have tiny variance.
        dim = backbone.num_features
        self.register_buffer("feat_mean", torch.zeros(dim))
        self.register_buffer("feat_std", torch.ones(dim))
        self.dropout = nn.Dropout(head_dropout)
        self.head = nn.Linear(dim, 2)

    @property
    def num_features(self) -> int:
        return int(self.backbone.num_features)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone((images - self.mean) / self.std)

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        out = self.head(self.dropout((feats - self.feat_mean) / self.feat_std))
        if self.head_type == "evidential":
            out = torch.log1p(nn.functional.softplus(out))
        return out

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.features(images))


def build_classifier(
    name: str,
    *,
    img_size: int,
    weights_path: str | Path | None = None,
    drop_rate: float = 0.0,
    head_dropout: float = 0.0,
    attn_impl: str = "sdpa",
    head: str = "linear",
) -> RoadworkClassifier:
    backbone = create_backbone(
        name, img_size=img_size, weights_path=weights_path, drop_rate=drop_rate,
        attn_impl=attn_impl,
    )
    return RoadworkClassifier(backbone, head_dropout=head_dropout, head_type=head)


def freeze_backbone(model: RoadworkClassifier) -> None:
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    model.backbone.eval()
