"""Checkpoints: validated against ``CheckpointMeta``, written atomically, loaded only with
``weights_only=True``.

A checkpoint file is one dict: the fields of ``contracts.schemas.CheckpointMeta`` plus
``model_state_dict`` (the tensors, which stay outside the schema). It is checked on save,
so a checkpoint that lacks a field its readers need is never written, and again on load.
``weights_only=True`` makes torch's unpickler refuse anything but tensors and plain
containers, so a checkpoint crafted to run code on load is refused instead of run.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from roadwork_assets.contracts.errors import ArtifactIntegrityError
from roadwork_assets.contracts.schemas import CHECKPOINT_SCHEMA_VERSION, CheckpointMeta
from roadwork_assets.core.artifacts import atomic_torch_save

STATE_DICT = "model_state_dict"
REMATERIALIZE = "re-materialize `checkpoint`"


def save_checkpoint(path: Path, *, model_state_dict: dict[str, torch.Tensor],
                    **meta: Any) -> Path:
    """Write ``model_state_dict`` and ``meta`` (the fields of ``CheckpointMeta``)
    atomically; metadata that does not match the schema is refused before any byte is
    written."""
    try:
        checked = CheckpointMeta(**meta)
    except ValidationError as exc:
        missing, other = _problems(exc)
        what = "; ".join(([f"missing required field(s) {missing}"] if missing else [])
                         + ([other] if other else []))
        raise ArtifactIntegrityError(
            f"refusing to write checkpoint {path}: {what}; pass every field of "
            "contracts.schemas.CheckpointMeta to save_checkpoint") from None
    state = {k: v.detach().cpu().contiguous() for k, v in model_state_dict.items()}
    return atomic_torch_save(path, {**checked.model_dump(), STATE_DICT: state})


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint as a dict: ``CheckpointMeta``'s fields (validated) and
    ``model_state_dict``. Anything unsafe, truncated, of another schema_version or not
    matching the schema is refused with the key at fault and the fix."""
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
    if "schema_version" in payload and payload["schema_version"] != CHECKPOINT_SCHEMA_VERSION:
        raise ArtifactIntegrityError(
            f"checkpoint {path} has schema_version {payload['schema_version']!r}; this "
            f"code reads {CHECKPOINT_SCHEMA_VERSION}: {REMATERIALIZE}"
        )
    checked, missing, other = None, [], ""
    try:
        checked = CheckpointMeta.model_validate(
            {k: v for k, v in payload.items() if k != STATE_DICT})
    except ValidationError as exc:
        missing, other = _problems(exc)
    missing = sorted({*missing, *({"schema_version", STATE_DICT} - payload.keys())})
    if missing:
        raise ArtifactIntegrityError(
            f"checkpoint {path} lacks required keys {missing}: it was not written by "
            f"save_checkpoint of this version; {REMATERIALIZE}")
    if checked is None:
        raise ArtifactIntegrityError(
            f"checkpoint {path} does not match its schema (CheckpointMeta): {other}; "
            f"{REMATERIALIZE}")
    state = payload[STATE_DICT]
    if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ArtifactIntegrityError(
            f"checkpoint {path}: {STATE_DICT} is not a dict of named tensors; {REMATERIALIZE}")
    return {**checked.model_dump(), STATE_DICT: state}


def _problems(exc: ValidationError) -> tuple[list[str], str]:
    """(missing field names, the other errors on one line)."""
    missing = [".".join(map(str, e["loc"])) for e in exc.errors() if e["type"] == "missing"]
    other = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'checkpoint'}: "
                      f"{e['msg'].removeprefix('Value error, ')}"
                      for e in exc.errors() if e["type"] != "missing")
    return missing, other
