"""LoRA / DoRA adapters on a timm ViT through peft, merged away before anything is saved.

timm models are "custom models" to peft, so the wrapped linears are named explicitly, by
one regular expression over module names: ``blocks.N.attn.qkv`` (fused q, k, v),
``blocks.N.attn.proj``, ``blocks.N.mlp.fc1`` and ``blocks.N.mlp.fc2``. A bare ``proj``
would also catch ``patch_embed.proj`` (a Conv2d), hence the anchored pattern.

DINOv3 ``_qkvb`` variants (timm ``EvaAttention`` with separate q/k/v biases) compute
``F.linear(x, qkv.weight, qkv_bias)``, which bypasses a LoRA wrapper on ``qkv``. timm
also has the equivalent ``qkv(x) + qkv_bias`` path (``qkv_bias_separate``); it is switched
on while adapters are attached and off again after the merge, so the adapted ``qkv`` is
used in training and the served model is timm's own. An attention module that reads
``qkv.weight`` directly without that switch is refused, naming its class.

After training ``merge_adapters`` folds every adapter into its base weight
(``merge_and_unload``): the state dict is the plain timm architecture again, so the
checkpoint, the ONNX export, the bundle and ``roadwork predict`` need no peft.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from roadwork_assets.contracts.errors import BadInputError
from roadwork_assets.core.models.classifier import RoadworkClassifier

_TARGET_PATHS = {"qkv": r"attn\.qkv", "proj": r"attn\.proj", "fc1": r"mlp\.fc1",
                 "fc2": r"mlp\.fc2"}
_ADAPTER_KEY_MARKS = ("lora_", "base_layer", "base_model.model.")


def target_module_regex(targets: Iterable[str] = tuple(_TARGET_PATHS),
                        blocks: Iterable[int] | None = None) -> str:
    """The peft ``target_modules`` pattern (matched in full against module names) for the
    ViT linears ``targets`` in ``blocks`` (None: every block)."""
    targets = list(targets)
    unknown = sorted(set(targets) - set(_TARGET_PATHS))
    if unknown or not targets:
        raise BadInputError(f"adapter targets must be a non-empty subset of "
                            f"{list(_TARGET_PATHS)}; got {targets}")
    which = r"\d+" if blocks is None else "(?:" + "|".join(str(int(b)) for b in blocks) + ")"
    linears = "|".join(_TARGET_PATHS[t] for t in targets)
    return rf"(?:.*\.)?blocks\.{which}\.(?:{linears})"


def adapter_targets(backbone: nn.Module, regex: str) -> list[str]:
    """Names of the nn.Linear modules of ``backbone`` that ``regex`` selects."""
    pattern = re.compile(regex)
    return [name for name, module in backbone.named_modules()
            if isinstance(module, nn.Linear) and pattern.fullmatch(name)]


def route_qkv_through_linear(backbone: nn.Module, through: bool) -> int:
    """Make attention call ``qkv(x)`` (then add its q/k/v bias) instead of F.linear on
    ``qkv.weight`` (``through=True``), or restore timm's default; returns how many
    attention modules it switched. Refuses attention that cannot be switched."""
    n = 0
    for module in backbone.modules():
        # a wrapped qkv is a peft layer, not an nn.Linear: test for the module, not its type
        if getattr(module, "q_bias", None) is None or getattr(module, "qkv", None) is None:
            continue
        if not hasattr(module, "qkv_bias_separate"):
            raise BadInputError(
                f"{type(module).__name__} adds its q/k/v bias through F.linear on qkv.weight, "
                "which bypasses a LoRA wrapper on qkv: drop 'qkv' from trainer.lora_targets "
                "or use a backbone without separate qkv biases (e.g. a non-_qkvb DINOv3)")
        module.qkv_bias_separate = through
        n += 1
    return n


def add_adapters(model: RoadworkClassifier, *, rank: int, alpha: float, dropout: float = 0.0,
                 targets: Iterable[str] = tuple(_TARGET_PATHS), dora: bool = False,
                 blocks: Iterable[int] | None = None) -> list[str]:
    """Wrap the backbone's target linears with LoRA (DoRA when ``dora``) through peft, in
    place: ``model.backbone`` becomes a ``PeftModel`` whose base weights are frozen; the
    head stays trainable. Returns the wrapped module names."""
    from peft import LoraConfig, get_peft_model

    targets = list(targets)
    regex = target_module_regex(targets, blocks)
    names = adapter_targets(model.backbone, regex)
    if not names:
        raise BadInputError(
            f"backbone {type(model.backbone).__name__} has no ViT linears matching "
            f"{targets} (blocks.N.attn.qkv / attn.proj / mlp.fc1 / mlp.fc2): "
            "lora, dora and explora need a timm ViT such as vit_small_patch14_dinov2.lvd142m")
    if "qkv" in targets:
        route_qkv_through_linear(model.backbone, through=True)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=regex,
                        use_dora=dora, bias="none")
    model.backbone = get_peft_model(model.backbone, config)
    return names


def merge_adapters(model: RoadworkClassifier) -> RoadworkClassifier:
    """Fold the adapters into the base weights and drop peft: ``model.backbone`` is the
    plain timm module again (in place; returns ``model``)."""
    from peft import PeftModel

    if isinstance(model.backbone, PeftModel):
        model.backbone = model.backbone.merge_and_unload(safe_merge=True)
    route_qkv_through_linear(model.backbone, through=False)
    left = [k for k in model.state_dict() if any(m in k for m in _ADAPTER_KEY_MARKS)]
    if left:
        raise BadInputError(f"adapters were not fully merged: {left[:4]} remain")
    return model


def trainable_parameters(model: nn.Module) -> dict[str, int]:
    """{"trainable": n, "total": n} parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": int(trainable), "total": int(total)}


@torch.no_grad()
def max_logit_gap(a: nn.Module, b_outputs: torch.Tensor, images: torch.Tensor) -> float:
    """max |a(images) - b_outputs| (a in eval mode)."""
    return float((a.eval()(images) - b_outputs).abs().max())
