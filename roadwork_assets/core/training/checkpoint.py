"""Checkpoints: written atomically, loaded only with ``weights_only=True``.

``weights_only=True`` makes torch's unpickler refuse anything but tensors and plain
containers, so a checkpoint crafted to run code on load is refused instead of run.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from roadwork_assets.contracts.errors import ArtifactIntegrityError
from roadwork_assets.contracts.schemas import (
    CHECKPOINT_SCHEMA_VERSION,
    REQUIRED_CHECKPOINT_KEYS,
)
from roadwork_assets.core.artifacts import atomic_torch_save


def save_checkpoint(
    path: Path,
    *,
    model_state_dict: dict[str, torch.Tensor],
    epoch: int,
    best_metric: float,
    best_metric_name: str,
    config: dict[str, Any],
    backbone_name: str,
    mode: str,
    data_version: str,
    code_version: str,
    extra: dict[str, Any] | None = None,
) -> Path:
    payload = {
        "schema_version": CHECKPOINT_SCHEMA_VERSION,
        "model_state_dict": {k: v.detach().cpu().contiguous() for k, v in model_state_dict.items()},
        "epoch": int(epoch),
        "best_metric": float(best_metric),
        "best_metric_name": best_metric_name,
        "config": config,
        "backbone_name": backbone_name,
        "mode": mode,
        "data_version": data_version,
        "code_version": code_version,
        **(extra or {}),
    }
    return atomic_torch_save(path, payload)


def load_checkpoint(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ArtifactIntegrityError(f"checkpoint missing at {path}: materialize `checkpoint`")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ArtifactIntegrityError(
            f"refusing to load {path}: it contains objects that are not plain tensors or "
            f"containers (weights_only=True rejected it: {str(exc).splitlines()[0]}). "
            "Only load checkpoints you produced; re-create it with save_checkpoint."
        ) from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise ArtifactIntegrityError(f"checkpoint {path} is unreadable or truncated: {exc}") from exc
    if not isinstance(payload, dict):
        raise ArtifactIntegrityError(f"checkpoint {path} is not a dict of named entries")
    missing = sorted(REQUIRED_CHECKPOINT_KEYS - payload.keys())
    if missing:
        raise ArtifactIntegrityError(f"checkpoint {path} lacks required keys {missing}")
    if payload["schema_version"] != CHECKPOINT_SCHEMA_VERSION:
        raise ArtifactIntegrityError(
            f"checkpoint {path} has schema_version {payload['schema_version']!r}; this "
            f"code reads {CHECKPOINT_SCHEMA_VERSION}: re-materialize `checkpoint`"
        )
    return payload
