"""The adapted_backbone artifact: ExPLoRA's continued pre-training, written and read.

``build_adapted_backbone`` runs only when ``trainer.mode == "explora"``; in every other
mode it writes a small record saying so (no weights, no decoding, milliseconds), so the
default run pays nothing. It sees the train split's decoded images (the embeddings
cache) and, optionally, a folder of unlabelled images, never a val_* split; the labels
in the cache are not read. ``adapted_state_for`` is how a checkpoint in mode explora
reads it back, refusing one made for another backbone, weights file, image size or
split assignment (another assignment's train split may hold this one's val images).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError

from roadwork_assets.contracts.adaptation_schemas import (
    ADAPTED_BACKBONE_SCHEMA_VERSION,
    AdaptedBackboneMeta,
)
from roadwork_assets.contracts.errors import ArtifactIntegrityError, BadInputError, LeakageError
from roadwork_assets.core.artifacts import atomic_torch_save, code_version, combine_versions, file_sha256
from roadwork_assets.core.data.array_cache import (
    ConcatRows,
    MappedRows,
    open_npz,
    streaming_npz,
)
from roadwork_assets.core.data.transforms import iter_model_batches
from roadwork_assets.core.models.classifier import RoadworkClassifier, create_backbone
from roadwork_assets.core.progress import Progress, no_progress
from roadwork_assets.core.training.config import TrainerConfig
from roadwork_assets.core.training.explora import OBJECTIVE, pretrain_explora

STATE = "backbone_state_dict"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
MATERIALIZE = "materialize adapted_backbone with trainer.mode=explora"


def unlabelled_images(folder: str | Path, forbidden_roots: list[Path] = ()) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted). A folder inside a labelled
    dataset root (or holding one) is refused: it would hold val_* images."""
    root = Path(folder).expanduser().resolve()
    if not root.is_dir():
        raise BadInputError(f"trainer.explora_unlabelled_dir = {folder}: no such folder")
    for other in forbidden_roots:
        other = Path(other).expanduser().resolve()
        if root == other or other in root.parents or root in other.parents:
            raise LeakageError(
                f"trainer.explora_unlabelled_dir = {folder} overlaps the labelled dataset "
                f"{other}, whose val_select / val_calib / val_test images ExPLoRA may not "
                "see: point it at a folder of unlabelled images only")
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def _folder_version(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for f in files:
        digest.update(f"{f}\0{f.stat().st_size}\n".encode())
    return digest.hexdigest()


def _train_images(cache: dict[str, np.ndarray], cfg: TrainerConfig) -> np.ndarray:
    found = (str(cache["kind"]), str(cache["backbone"]), int(cache["img_size"]))
    if found != ("preprocessed_images", cfg.backbone, cfg.img_size):
        raise BadInputError(
            f"embeddings[train] hold {found} but explora needs decoded images of "
            f"{cfg.backbone} at {cfg.img_size} px: re-materialize embeddings[train] with the "
            "current trainer config (mode=explora)")
    return cache["features"]


def build_adapted_backbone(train_cache: dict[str, np.ndarray], cfg: TrainerConfig, dest: Path,
                           forbidden_roots: list[Path] = (), log: Any = None,
                           progress: Progress = no_progress) -> AdaptedBackboneMeta:
    """Write the artifact at ``dest``: ExPLoRA's adapted backbone in mode explora, a
    not-used record otherwise."""
    common = {"mode": cfg.mode, "backbone_name": cfg.backbone, "img_size": cfg.img_size,
              "assignment_version": str(train_cache["assignment_version"]),
              "code_version": code_version(), "splits_read": ["train"]}
    if cfg.mode != "explora":
        meta = AdaptedBackboneMeta(
            used=False, reason=f"trainer.mode={cfg.mode}: only mode explora fine-tunes from "
            "an adapted backbone", weights_sha256="", data_version="", **common)
        atomic_torch_save(dest, {**meta.model_dump(), STATE: {}})
        return meta
    images = _train_images(train_cache, cfg)
    files = unlabelled_images(cfg.explora_unlabelled_dir, forbidden_roots) \
        if cfg.explora_unlabelled_dir else []
    model = RoadworkClassifier(create_backbone(cfg.backbone, img_size=cfg.img_size,
                                               weights_path=cfg.weights_path,
                                               attn_impl=cfg.attn_impl))
    with _unlabelled_rows(files, cfg, dest, progress) as extra:
        if extra is not None:
            images = ConcatRows([images, extra])
        result = pretrain_explora(model, images, cfg, log=log, progress=progress)
    settings = {k: v for k, v in cfg.model_dump().items() if k.startswith(("explora_", "lora_"))}
    meta = AdaptedBackboneMeta(
        used=True, reason="trainer.mode=explora", objective=OBJECTIVE,
        weights_sha256=file_sha256(Path(cfg.weights_path).expanduser()),
        data_version=combine_versions({"embeddings[train]": str(train_cache["data_version"]),
                                       "unlabelled": _folder_version(files)}),
        n_train_images=len(images) - len(files), n_unlabelled_images=len(files),
        settings=settings, unfrozen_blocks=result.unfrozen_blocks,
        n_adapted_modules=result.n_adapted_modules, trainable_params=result.trainable_params,
        history=result.history, **common)
    atomic_torch_save(dest, {**meta.model_dump(), STATE: result.state_dict})
    return meta


@contextlib.contextmanager
def _unlabelled_rows(files: list[Path], cfg: TrainerConfig, dest: Path,
                     progress: Progress) -> Iterator[MappedRows | None]:
    """The unlabelled folder decoded once into a temporary memory-mapped cache beside
    ``dest`` (a folder may hold far more images than fit in memory); removed on exit,
    and by ``collect_dead_leftovers`` if this process is killed (its name holds the pid)."""
    if not files:
        yield None
        return
    tmp = Path(dest).with_name(f".{Path(dest).name}.tmp-{os.getpid()}-unlabelled.npz")
    try:
        with streaming_npz(tmp) as out, \
                out.rows("features", (len(files), 3, cfg.img_size, cfg.img_size), np.uint8) as rows:
            for _, batch in iter_model_batches([str(f) for f in files], [f.name for f in files],
                                               cfg.img_size, batch_size=cfg.batch_size,
                                               progress=progress, stage="decode unlabelled"):
                rows.write(batch)
        yield open_npz(tmp, ("features",), "explora unlabelled images",
                       "rerun adapted_backbone")["features"]
    finally:
        tmp.unlink(missing_ok=True)


def load_adapted_backbone(path: Path) -> tuple[AdaptedBackboneMeta, dict[str, torch.Tensor]]:
    """(meta, backbone state) read with ``weights_only=True`` and checked against the schema."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactIntegrityError(f"adapted_backbone missing at {path}: {MATERIALIZE}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
        raise ArtifactIntegrityError(f"adapted_backbone {path} is unreadable or unsafe "
                                     f"({str(exc).splitlines()[0]}): {MATERIALIZE}") from exc
    if not isinstance(payload, dict) or not isinstance(payload.get(STATE), dict):
        raise ArtifactIntegrityError(f"adapted_backbone {path} holds no {STATE}: {MATERIALIZE}")
    if payload.get("schema_version") != ADAPTED_BACKBONE_SCHEMA_VERSION:
        raise ArtifactIntegrityError(f"adapted_backbone {path} has schema_version "
                                     f"{payload.get('schema_version')!r}: {MATERIALIZE}")
    try:
        meta = AdaptedBackboneMeta.model_validate({k: v for k, v in payload.items() if k != STATE})
    except ValidationError as exc:
        raise ArtifactIntegrityError(f"adapted_backbone {path} does not match its schema "
                                     f"({exc.errors()[0]['msg']}): {MATERIALIZE}") from None
    return meta, payload[STATE]


def adapted_state_for(path: Path | None, cfg: TrainerConfig, assignment_version: str
                      ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The adapted backbone's state for a mode-explora checkpoint, and what to record of
    it; refuses one made with other settings or on another split assignment."""
    if path is None:
        raise BadInputError(f"trainer.mode=explora fine-tunes from adapted_backbone: {MATERIALIZE}")
    meta, state = load_adapted_backbone(path)
    if not meta.used:
        raise BadInputError(f"adapted_backbone at {path} was materialized with "
                            f"trainer.mode={meta.mode} and holds no weights: {MATERIALIZE}")
    if meta.assignment_version != assignment_version:
        raise LeakageError(
            "adapted_backbone was pre-trained on the train split of another split assignment, "
            "which may hold this assignment's val images: re-materialize adapted_backbone")
    wanted = {"backbone_name": cfg.backbone, "img_size": cfg.img_size,
              "weights_sha256": file_sha256(Path(cfg.weights_path).expanduser())}
    stale = {k: (getattr(meta, k), v) for k, v in wanted.items() if getattr(meta, k) != v}
    if stale:
        detail = ", ".join(f"{k}: adapted {a!r} vs trainer {b!r}" for k, (a, b) in stale.items())
        raise BadInputError(f"adapted_backbone was made with other settings ({detail}): "
                            "re-materialize adapted_backbone")
    return state, {"adapted_backbone_sha256": file_sha256(path), "objective": meta.objective,
                   "unfrozen_blocks": meta.unfrozen_blocks,
                   "ssl_epochs": len(meta.history)}
