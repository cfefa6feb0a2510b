"""A real tiny cascade bundle: a saved checkpoint, a "mean" MultiviewCheckpoint fitted on
it, and a cascade policy fitted (``fit_cascade_policy``) on logits both stages compute."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from roadwork_assets.contracts.multiview_schemas import AttentionParams, MultiviewCheckpoint
from roadwork_assets.core.artifacts import (
    ArtifactRegistry,
    atomic_write_json,
    file_sha256,
    make_provenance,
)
from roadwork_assets.core.calibration.cascade import CascadeConfig, fit_cascade_policy
from roadwork_assets.core.calibration.policy_config import PolicyFitConfig
from roadwork_assets.core.export.bundle import build_bundle
from roadwork_assets.core.export.onnx_export import probe_images_uint8
from roadwork_assets.core.models.multiview import TEN_CROP_VIEWS
from roadwork_assets.core.training.checkpoint import load_checkpoint, save_checkpoint
from roadwork_assets.core.training.config import TrainerConfig
from roadwork_assets.core.training.multiview import predict_stage2_logits, stage2_model
from roadwork_assets.core.training.pipeline import build_model, model_from_checkpoint
from roadwork_assets.core.training.trainer import predict_view_logits

IMG = 32


def save_tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    cfg = TrainerConfig(img_size=IMG)
    torch.manual_seed(seed)
    save_checkpoint(path, model_state_dict=build_model(cfg).state_dict(), epoch=1,
                    best_metric=0.5, best_metric_name="val_select_nll", config=cfg.model_dump(),
                    backbone_name=cfg.backbone, mode=cfg.mode, data_version="d" * 64,
                    code_version="c", assignment_version="a", weights_sha256="")
    return path


def write_stage2(path: Path, checkpoint_sha256: str, aggregator: str = "mean") -> Path:
    """A MultiviewCheckpoint as `multiview_checkpoint` writes it (aggregator.json)."""
    attention = AttentionParams(u=0.8, r=-0.3, view_bias=[0.1 * i for i in range(10)],
                                margin_scale=0.05, l2=0.01)
    artifact = MultiviewCheckpoint(
        aggregator=aggregator, view_source="ten_crop", views=list(TEN_CROP_VIEWS),
        attention=attention if aggregator == "attention" else None,
        crop_scale=0.875, input_size=IMG, comparison=[], checkpoint_sha256=checkpoint_sha256,
        assignment_version="a", data_version="d" * 64, code_version="c")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, artifact)
    return path


@dataclass
class CascadeFixture:
    root: Path
    checkpoint: Path
    policy: Path
    stage2: Path
    directory: Path
    extra: dict[str, Any]


def fit_cascade_artifacts(reg: ArtifactRegistry, n: int = 400,
                          aggregator: str = "mean") -> tuple[Path, Path]:
    """Fit the cascade on this checkpoint's own logits of probe-like images, with labels
    both stages see (stage 2 better), so stage 1 routes its uncertain middle."""
    stage2_path = write_stage2(reg.root / "multiview_checkpoint" / "aggregator.json",
                               file_sha256(reg.checkpoint), aggregator)
    payload = load_checkpoint(reg.checkpoint)
    model, _ = model_from_checkpoint(payload)
    images = np.concatenate([probe_images_uint8(8, IMG, seed=s) for s in range(1, n // 8 + 1)])
    z1 = predict_view_logits(model, images, n_views=2, batch_size=64, device="cpu")
    from roadwork_assets.contracts.multiview_schemas import load_multiview_checkpoint

    mv = stage2_model(model, load_multiview_checkpoint(stage2_path))
    z2 = predict_stage2_logits(mv, images, batch_size=64)
    m2 = z2[:, 1] - z2[:, 0]
    rng = np.random.default_rng(0)
    y = (m2 + rng.normal(0, 0.3 * m2.std(), len(m2)) > np.median(m2)).astype(int)
    params = fit_cascade_policy(
        z1, z2, y, [f"i{i}" for i in range(len(y))], None, policy=PolicyFitConfig(),
        cascade=CascadeConfig(alpha=0.1, latency_stage1_s=0.001, latency_stage2_s=0.01,
                              alphas=(), n_lambda=51))
    params = params.model_copy(update={
        "stage2_sha256": file_sha256(stage2_path),
        "provenance": make_provenance("d" * 64, file_sha256(reg.checkpoint))})
    atomic_write_json(reg.policy("cascade"), params)
    return reg.policy("cascade"), stage2_path


@pytest.fixture(scope="session")
def cascade_bundle(tmp_path_factory) -> CascadeFixture:
    root = tmp_path_factory.mktemp("cascade")
    reg = ArtifactRegistry(root)
    save_tiny_checkpoint(reg.checkpoint)
    policy_path, stage2_path = fit_cascade_artifacts(reg)
    directory, _manifest, extra = build_bundle(
        reg.bundles_dir, checkpoint_path=reg.checkpoint, policy_path=policy_path,
        policy_asset="cascade_policy", export_onnx_model=True, stage2_path=stage2_path)
    return CascadeFixture(root, reg.checkpoint, policy_path, stage2_path, directory, extra)
