"""Bundles: exactly one policy, every hash verified, tampering and missing files refused,
the predictor's emitted probability agrees with the policy at StreetVision's 0.5."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from roadwork_assets.contracts.errors import ArtifactIntegrityError
from roadwork_assets.contracts.schemas import Provenance
from roadwork_assets.core.artifacts import ArtifactRegistry, atomic_write_json
from roadwork_assets.core.calibration.policies import fit_policy
from roadwork_assets.core.export.bundle import build_bundle, load_bundle, verify_bundle
from roadwork_assets.core.export.predictor import BundlePredictor
from roadwork_assets.core.training.checkpoint import save_checkpoint
from roadwork_assets.core.training.config import TrainerConfig
from roadwork_assets.core.training.pipeline import build_model


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundle")
    reg = ArtifactRegistry(root)
    cfg = TrainerConfig(img_size=32)
    torch.manual_seed(0)
    model = build_model(cfg)
    save_checkpoint(reg.checkpoint, model_state_dict=model.state_dict(), epoch=1,
                    best_metric=0.5, best_metric_name="val_select_nll",
                    config=cfg.model_dump(), backbone_name=cfg.backbone, mode=cfg.mode,
                    data_version="d" * 64, code_version="c")
    rng = np.random.default_rng(0)
    n = 600
    y = rng.integers(0, 2, n)
    z = np.stack([np.zeros(n), 3 * (2 * y - 1) + rng.normal(size=n)], 1)
    views = np.repeat(z[:, None, :], 2, axis=1)
    policy = fit_policy("softmax", views, y, [f"i{i}" for i in range(n)], alpha=0.1,
                        mode="three_way")
    atomic_write_json(reg.policy("softmax"), policy)
    directory, manifest, extra = build_bundle(
        reg.bundles_dir, checkpoint_path=reg.checkpoint,
        policy_path=reg.policy("softmax"), policy_asset="thresholds",
        export_onnx_model=True)
    parity = extra["onnx_parity"]
    assert parity.passed, parity.summary()
    assert parity.n_views == 2 and parity.n_images == 8
    assert extra["onnx_max_abs_diff"] <= parity.max_logit_tolerance
    return directory


def _copy(bundle_dir, tmp_path):
    dest = tmp_path / "b"
    shutil.copytree(bundle_dir, dest)
    return dest


def test_fresh_bundle_verifies_and_names_every_file(bundle_dir):
    manifest = verify_bundle(bundle_dir)
    assert set(manifest.files) == {"checkpoint", "policy", "onnx"}
    assert manifest.policy_kind == "softmax"
    assert load_bundle(bundle_dir).policy.alpha == 0.1


def test_tampered_file_is_refused(bundle_dir, tmp_path):
    copy = _copy(bundle_dir, tmp_path)
    with open(copy / "model.pt", "r+b") as fh:
        fh.seek(200)
        fh.write(b"\x00\x01\x02")
    with pytest.raises(ArtifactIntegrityError, match="checkpoint: model.pt sha256 differs"):
        load_bundle(copy)


def test_missing_file_is_refused(bundle_dir, tmp_path):
    copy = _copy(bundle_dir, tmp_path)
    (copy / "model.onnx").unlink()
    with pytest.raises(ArtifactIntegrityError, match="onnx: model.onnx is missing"):
        verify_bundle(copy)


def test_two_policies_or_none_are_refused(bundle_dir, tmp_path):
    two = _copy(bundle_dir, tmp_path)
    shutil.copyfile(two / "policy.json", two / "gate_policy.json")
    with pytest.raises(ArtifactIntegrityError, match="exactly one exit policy"):
        verify_bundle(two)
    none = tmp_path / "none"
    shutil.copytree(bundle_dir, none)
    manifest = json.loads((none / "manifest.json").read_text())
    del manifest["files"]["policy"]
    (none / "manifest.json").write_text(json.dumps(manifest))
    (none / "policy.json").unlink()
    with pytest.raises(ArtifactIntegrityError, match="exactly one exit policy"):
        verify_bundle(none)


def test_predictor_emits_probabilities_that_binarise_to_the_policy(bundle_dir):
    predictor = BundlePredictor.from_dir(bundle_dir)
    images = np.random.default_rng(1).integers(0, 255, (16, 3, 32, 32), dtype=np.uint8)
    prob, decision = predictor.predict_arrays(images)
    assert ((prob >= 0) & (prob <= 1)).all()
    assert ((prob < 0.5) == (decision == 0)).all()
    assert not (prob == 0.5).any()


def test_policy_fitted_on_another_checkpoint_is_refused(tmp_path):
    from roadwork_assets.core.export.bundle import bundle_lineage

    reg = ArtifactRegistry(tmp_path)
    cfg = TrainerConfig(img_size=32)
    save_checkpoint(reg.checkpoint, model_state_dict=build_model(cfg).state_dict(), epoch=1,
                    best_metric=0.5, best_metric_name="nll", config=cfg.model_dump(),
                    backbone_name=cfg.backbone, mode=cfg.mode, data_version="d", code_version="c")
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    views = np.stack([np.zeros(400), 3 * (2 * y - 1) + rng.normal(size=400)], 1)[:, None, :]
    policy = fit_policy("softmax", views, y, [f"i{i}" for i in range(400)], alpha=0.1)
    stale = Provenance(data_version="d", code_version="c", created_at="t",
                       checkpoint_sha256="0" * 64)
    atomic_write_json(reg.policy("softmax"), policy.model_copy(update={"provenance": stale}))
    with pytest.raises(ArtifactIntegrityError, match=r"re-materialize logits\[val_calib\]"):
        bundle_lineage(reg.checkpoint, reg.policy("softmax"), "thresholds")
    with pytest.raises(ArtifactIntegrityError, match="materialize `gate_params`"):
        bundle_lineage(reg.checkpoint, reg.policy("gate"), "gate_params")


def test_report_refuses_logits_from_another_checkpoint(bundle_dir):
    from roadwork_assets.core.evaluation.report import check_same_model

    bundle = load_bundle(bundle_dir)
    check_same_model(bundle, bundle.manifest.files["checkpoint"].sha256)
    with pytest.raises(ArtifactIntegrityError, match=r"re-materialize logits\[val_test\]"):
        check_same_model(bundle, "f" * 64)
