"""Local backbone weight files, read without running any code from the file.

This network reaches no model hub, so every pretrained backbone comes from a file the
user gives (ROADWORK_WEIGHTS). Such a file must never be able to run code on load:

- ``.safetensors`` is read with ``safetensors.torch.load_file`` (a header + raw
  tensor bytes: no code can be in it);
- ``.pth`` / ``.pt`` / ``.bin`` are read with ``torch.load(weights_only=True)``,
  whose unpickler accepts only tensors and plain containers; a pickle that asks for
  any other callable (``os.system``, ``builtins.exec``...) is refused before it runs.

timm is not asked to read the file (older timm unpickled it with
``weights_only=False``); it only supplies the architecture (``pretrained=False``) and
its checkpoint filter, which converts original-format keys (Meta DINOv2/DINOv3) and
resamples position embeddings to the configured image size. The result is loaded
with ``strict=True``: every tensor of the architecture must come from the file.
"""

from __future__ import annotations

import argparse
import importlib
import pickle
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import timm
import torch
from torch import nn

from roadwork_assets.contracts.errors import BadInputError

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pth", ".pt", ".bin")
# Wrappers training code puts around a state dict; "teacher" is the DINO/DINOv2
# training checkpoint (its backbone is the network the papers evaluate).
_CONTAINER_KEYS = ("teacher", "model_ema", "model", "state_dict", "module")
_STRIPPED_PREFIXES = ("module.", "_orig_mod.", "teacher.", "backbone.")
_MAX_LISTED = 6


def read_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The flat ``{name: tensor}`` state dict stored in ``path``, read safely."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise BadInputError(
            f"backbone weights file {path} does not exist: download the weights "
            "(.safetensors or .pth) to this machine and point ROADWORK_WEIGHTS / the "
            "trainer's weights_path at it"
        )
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            raw = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise BadInputError(
                f"weights file {path} is not a readable safetensors file ({exc}): "
                "download it again"
            ) from exc
    elif suffix in PICKLE_SUFFIXES:
        raw = _torch_load_weights_only(path)
    else:
        raise BadInputError(
            f"weights file {path} has suffix {suffix or '(none)'!r}; accepted: "
            f"{', '.join(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)} (rename it if it is one of those)"
        )
    return unwrap_state_dict(raw, path)


def _torch_load_weights_only(path: Path) -> object:
    try:
        # argparse.Namespace: timm training checkpoints keep their args in one; it only
        # rebuilds attributes, so it is as harmless as a dict.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadInputError(
            f"refusing to load weights file {path}: it asks to run code or build objects "
            f"that are not tensors ({first}). Use the publisher's .safetensors file, or "
            "re-save a trusted copy as safetensors.torch.save_file(state_dict, ...)"
        ) from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise BadInputError(
            f"weights file {path} is unreadable or truncated ({exc}): download it again"
        ) from exc


def unwrap_state_dict(obj: object, path: str | Path) -> dict[str, torch.Tensor]:
    """Peel common checkpoint wrappers ({"model": ...}, {"state_dict": ...}, a DINO
    {"teacher": {"backbone.*": ...}}) and DDP / backbone prefixes off the key names."""
    for _ in range(4):  # wrappers nest at most a few levels
        if not isinstance(obj, Mapping):
            break
        if any(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        inner = next((obj[k] for k in _CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not obj:
        raise BadInputError(f"weights file {path} holds no state dict (found {type(obj).__name__})")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise BadInputError(
            f"weights file {path} holds no tensors at its top level (keys: "
            f"{_listing(sorted(map(str, obj)))}): save the model's state_dict() instead"
        )
    for prefix in _STRIPPED_PREFIXES:
        if any(k.startswith(prefix) for k in tensors):
            # a DINO teacher also holds heads (dino_head.*, ibot_head.*): keep the backbone
            tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    return tensors


def checkpoint_filter(name: str) -> Callable | None:
    """timm's own checkpoint filter for architecture ``name`` (the ``checkpoint_filter_fn``
    of the module that defines it, e.g. vision_transformer for DINOv2, eva for DINOv3)."""
    try:
        entrypoint = timm.models.model_entrypoint(timm.models.get_arch_name(name))
    except (RuntimeError, KeyError) as exc:
        raise BadInputError(f"timm has no model named {name!r}: {exc}") from exc
    module = importlib.import_module(entrypoint.__module__)
    return getattr(module, "checkpoint_filter_fn", None)


def load_backbone_weights(model: nn.Module, name: str, path: str | Path,
                          state: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """Load ``path`` into ``model`` (timm architecture ``name``) strictly; returns ``model``.

    ``state``: the file's tensors when already read by ``read_weights_file``.
    """
    path = Path(path).expanduser()
    state = dict(state) if state is not None else read_weights_file(path)
    filter_fn = checkpoint_filter(name)
    if filter_fn is not None:
        try:
            state = filter_fn(state, model)
        except (RuntimeError, ValueError, KeyError, IndexError) as exc:
            raise _mismatch(path, name, model, state, f"timm's checkpoint filter failed: {exc}") from exc
    # A classification head in the file is not part of a feature extractor (num_classes=0),
    # the same adaptation timm makes when num_classes differs from the pretrained head's.
    if getattr(model, "num_classes", None) == 0:
        heads = model.pretrained_cfg.get("classifier") if hasattr(model, "pretrained_cfg") else None
        for head in ([heads] if isinstance(heads, str) else list(heads or ())):
            state.pop(f"{head}.weight", None)
            state.pop(f"{head}.bias", None)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
                   for k in sorted(set(expected) & set(state)) if state[k].shape != expected[k].shape]
    if missing or unexpected or wrong_shape:
        parts = [f"{len(missing)} missing ({_listing(missing)})" if missing else "",
                 f"{len(unexpected)} unexpected ({_listing(unexpected)})" if unexpected else "",
                 f"{len(wrong_shape)} of another shape ({_listing(wrong_shape)})" if wrong_shape else ""]
        raise _mismatch(path, name, model, state, "; ".join(p for p in parts if p) + " keys")
    model.load_state_dict(state, strict=True)
    return model


def _mismatch(path: Path, name: str, model: nn.Module, state: Mapping[str, torch.Tensor],
              detail: str) -> BadInputError:
    return BadInputError(
        f"weights file {path} does not fit timm model {name!r}: {detail}. The file looks like "
        f"{_describe(state)}, the model is {_describe(model.state_dict())}: set "
        "ROADWORK_BACKBONE (trainer.backbone) to the timm architecture the file was saved from, "
        "e.g. vit_small_patch14_dinov2.lvd142m or vit_base_patch16_dinov3.lvd1689m"
    )


def _describe(state: Mapping[str, torch.Tensor]) -> str:
    """'12 blocks, width 384' from block indices and the class token's width."""
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    width = next((int(state[k].shape[-1]) for k in ("cls_token", "pos_embed", "norm.weight")
                  if k in state), None)
    return f"{len(blocks)} blocks, width {width}" if blocks and width else f"{len(state)} tensors"


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f", ... {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")
