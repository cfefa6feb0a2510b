"""A policy that cannot be fitted never blocks the bundle of another one.

Data: val_calib with plenty of roadwork but only 20 'none' images, so the Mondrian
conformal sets (which need 19 negatives in the threshold part at α_c = 0.05) cannot be
fitted, while the softmax thresholds can. Also: a near-perfect model gives a gate that
accepts everything instead of an error.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from roadwork_assets.contracts.errors import (
    ArtifactIntegrityError,
    InsufficientDataError,
)
from roadwork_assets.contracts.policy_schemas import (
    UnfittedPolicy,
    parse_policy,
    parse_policy_artifact,
)
from roadwork_assets.contracts.schemas import Provenance
from roadwork_assets.core.artifacts import (
    ArtifactRegistry,
    atomic_write_json,
    file_sha256,
)
from roadwork_assets.core.calibration.policies import apply_policy, fit_policy
from roadwork_assets.core.export.bundle import build_bundle
from roadwork_assets.core.training.checkpoint import save_checkpoint
from roadwork_assets.core.training.config import TrainerConfig
from roadwork_assets.core.training.pipeline import build_model

N_POS, N_NEG = 400, 20


def _few_negatives(seed=0):
    rng = np.random.default_rng(seed)
    y = np.r_[np.ones(N_POS, np.int64), np.zeros(N_NEG, np.int64)]
    z = 2.0 * (2 * y - 1) + rng.normal(0, 1.5, y.size)
    logits = np.stack([np.zeros_like(z), z], axis=-1)[:, None, :]
    return logits, y, [f"img{i}" for i in range(y.size)]


def _checkpoint(reg: ArtifactRegistry) -> None:
    cfg = TrainerConfig(img_size=32)
    torch.manual_seed(0)
    save_checkpoint(reg.checkpoint, model_state_dict=build_model(cfg).state_dict(), epoch=1,
                    best_metric=0.5, best_metric_name="val_select_nll", config=cfg.model_dump(),
                    backbone_name=cfg.backbone, mode=cfg.mode, data_version="d" * 64,
                    code_version="c", assignment_version="a", weights_sha256="")


# ------------------------------------------------------------------ core level
def test_near_perfect_model_gives_a_gate_that_accepts_everything():
    """Saturated logits (every roadwork image at the same margin): CRC puts t_lo just
    below it, no stage-1 decision of the fit part is wrong, and the gate accepts all."""
    rng = np.random.default_rng(1)
    n = 400
    y = (np.arange(n) % 2).astype(np.int64)
    z = np.where(y == 1, 6.0, -6.0 + rng.normal(0, 0.5, n))
    logits = np.stack([np.zeros(n), z], axis=-1)[:, None, :]
    params = fit_policy("gate", logits, y, [f"i{i}" for i in range(n)], alpha=0.05,
                        calibrator_methods=("platt",))
    assert params.gate.accepts_all and params.gate.tau == 1.0 and params.gate.accept_rate == 1.0
    assert "the gate accepts every image" in params.guarantee_statement
    decision, _ = apply_policy(params, logits)
    np.testing.assert_array_equal(decision, y)  # nothing deferred, every decision right
    assert parse_policy(json.loads(params.model_dump_json())) == params


def test_unfitted_record_round_trips_and_cannot_be_applied():
    rec = UnfittedPolicy(kind="scrc", reason="val_calib threshold part negatives: 9 items; ...")
    data = json.loads(rec.model_dump_json())
    assert data["fitted"] is False and data["schema_version"] == 2
    assert parse_policy_artifact(data) == rec
    with pytest.raises(ArtifactIntegrityError, match="records fitted: false"):
        parse_policy(data)


def test_unfittable_policy_blocks_only_its_own_bundle(tmp_path):
    logits, y, ids = _few_negatives()
    with pytest.raises(InsufficientDataError, match="needs at least 19") as err:
        fit_policy("scrc", logits, y, ids, alpha=0.05, conformal_alpha=0.05)
    reg = ArtifactRegistry(tmp_path)
    _checkpoint(reg)
    fitted_on = Provenance(data_version="d" * 64, code_version="c", created_at="t",
                           checkpoint_sha256=file_sha256(reg.checkpoint))
    softmax = fit_policy("softmax", logits, y, ids, alpha=0.05)
    atomic_write_json(reg.policy("softmax"), softmax.model_copy(update={"provenance": fitted_on}))
    atomic_write_json(reg.policy("scrc"), UnfittedPolicy(kind="scrc", reason=str(err.value)))
    _, manifest, _ = build_bundle(reg.bundles_dir, checkpoint_path=reg.checkpoint,
                                  policy_path=reg.policy("softmax"), policy_asset="thresholds",
                                  export_onnx_model=False)
    assert manifest.policy_kind == "softmax"
    with pytest.raises(InsufficientDataError) as refused:
        build_bundle(reg.bundles_dir, checkpoint_path=reg.checkpoint,
                     policy_path=reg.policy("scrc"), policy_asset="conformal_sets",
                     export_onnx_model=False)
    msg = str(refused.value)
    assert "\n" not in msg and msg.startswith("cannot bundle policy 'scrc': `conformal_sets` could not be fitted")
    assert "needs at least 19" in msg and "Set exit_policy.bundle_policy to a policy that was fitted" in msg
