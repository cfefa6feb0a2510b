"""A cascade bundle: stage2.json + stage2.onnx hashed beside the stage-1 files, lineage at
build and on load, stage 2 checked on every probe image, and the predictor running stage 2
on the routed images only."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

from roadwork_assets.contracts.errors import ArtifactIntegrityError
from roadwork_assets.core.artifacts import ArtifactRegistry, file_sha256, read_npz
from roadwork_assets.core.calibration.cascade import apply_cascade
from roadwork_assets.core.export.bundle import build_bundle, load_bundle, verify_bundle
from roadwork_assets.core.export.bundle_checks import content_id
from roadwork_assets.core.export.cascade_serving import CascadeParity
from roadwork_assets.core.export.onnx_export import probe_images_uint8
from roadwork_assets.core.export.predictor import BundlePredictor
from roadwork_assets.core.training.multiview import predict_stage2_logits
from roadwork_assets.core.training.trainer import predict_view_logits
from roadwork_assets_tests.core.export.conftest import (
    IMG,
    fit_cascade_artifacts,
    save_tiny_checkpoint,
    write_stage2,
)


def _copy(src, tmp_path):
    dest = tmp_path / "b"
    shutil.copytree(src, dest)
    return dest


def forge(directory, edit=None):
    """Re-hash every listed file and re-derive the id, as someone who can write the
    bundle would: only the lineage and probe checks can tell then."""
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    if edit:
        edit(manifest)
    for entry in manifest["files"].values():
        target = directory / entry["path"]
        if target.is_file():
            entry["sha256"] = file_sha256(target)
            entry["size_bytes"] = target.stat().st_size
    manifest["bundle_id"] = content_id(
        {r: SimpleNamespace(sha256=f["sha256"]) for r, f in manifest["files"].items()})
    path.write_text(json.dumps(manifest))
    return directory


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


# ------------------------------------------------------------------------- build
def test_cascade_bundle_holds_both_stages_and_verifies(cascade_bundle):
    parity = cascade_bundle.extra["onnx_parity"]
    assert isinstance(parity, CascadeParity) and parity.passed, parity.summary()
    assert parity.stage2.n_images == 8 and parity.stage2.n_views == 1
    assert cascade_bundle.extra["stage2_onnx_max_abs_diff"] <= parity.stage2.max_logit_tolerance
    bundle = load_bundle(cascade_bundle.directory)
    m = bundle.manifest
    assert set(m.files) == {"checkpoint", "policy", "probe", "onnx", "stage2", "stage2_onnx"}
    assert (m.policy_kind, m.stages, m.stage2.aggregator, len(m.stage2.views)) == (
        "cascade", 2, "mean", 10)
    assert m.files["stage2"].sha256 == file_sha256(cascade_bundle.stage2)  # a byte copy
    assert bundle.policy.stage2_sha256 == m.files["stage2"].sha256
    assert bundle.stage2.checkpoint_sha256 == m.files["checkpoint"].sha256
    assert bundle.stage2_model is not None and bundle.stage2_model.base is bundle.model
    assert bundle.onnx_checked is True


def test_probe_routes_some_images_and_keeps_stage2_logits_of_all(cascade_bundle):
    probe = read_npz(cascade_bundle.directory / "probe.npz")
    stage = probe["stage"]
    assert set(stage.tolist()) == {1, 2}  # the stage-2 check is not vacuous either way
    assert probe["stage2_logits"].shape == (8, 2)
    bundle = load_bundle(cascade_bundle.directory, check_onnx=False)
    again = predict_stage2_logits(bundle.stage2_model, probe["images"])
    np.testing.assert_allclose(again, probe["stage2_logits"], rtol=0, atol=1e-5)
    decision, _prob, st = apply_cascade(bundle.policy, probe["logits"], probe["stage2_logits"])
    np.testing.assert_array_equal(st, stage)
    np.testing.assert_array_equal(decision, probe["decision"])


def test_cascade_without_stage2_path_is_refused(cascade_bundle, tmp_path):
    with pytest.raises(ArtifactIntegrityError,
                       match=r"policy 'cascade' needs its stage 2: pass stage2_path, the "
                             r"`multiview_checkpoint` artifact"):
        build_bundle(tmp_path / "bundles", checkpoint_path=cascade_bundle.checkpoint,
                     policy_path=cascade_bundle.policy, policy_asset="cascade_policy")


def test_stage2_of_another_checkpoint_or_policy_is_refused_at_build(cascade_bundle, tmp_path):
    other = write_stage2(tmp_path / "other" / "aggregator.json", "0" * 64)
    with pytest.raises(ArtifactIntegrityError, match=r"the cascade policy was fitted with "
                       r"stage 2 \w{12} \(stage2_sha256\), but .*aggregator\.json"):
        build_bundle(tmp_path / "bundles", checkpoint_path=cascade_bundle.checkpoint,
                     policy_path=cascade_bundle.policy, stage2_path=other)
    policy = tmp_path / "cascade_policy.json"
    shutil.copyfile(cascade_bundle.policy, policy)
    _edit_json(policy, stage2_sha256=file_sha256(other))
    with pytest.raises(ArtifactIntegrityError, match=r"aggregator\.json \(`multiview_checkpoint`"
                       r"\) was fitted on the logits of checkpoint 000000000000, but the "
                       r"checkpoint is \w{12}: re-materialize `multiview_checkpoint`"):
        build_bundle(tmp_path / "bundles", checkpoint_path=cascade_bundle.checkpoint,
                     policy_path=policy, stage2_path=other)
    assert not list((tmp_path / "bundles").glob("*"))  # nothing staged was left behind


def test_one_stage_bundle_ignores_stage2_path_and_carries_no_stage2(tmp_path):
    from roadwork_assets.contracts.schemas import Provenance
    from roadwork_assets.core.artifacts import atomic_write_json
    from roadwork_assets.core.calibration.policies import fit_policy

    reg = ArtifactRegistry(tmp_path)
    save_tiny_checkpoint(reg.checkpoint)
    stage2 = write_stage2(tmp_path / "aggregator.json", file_sha256(reg.checkpoint))
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    views = np.stack([np.zeros(400), 3 * (2 * y - 1) + rng.normal(size=400)], 1)[:, None, :]
    policy = fit_policy("softmax", np.repeat(views, 2, 1), y, [f"i{i}" for i in range(400)],
                        alpha=0.1, mode="three_way")
    atomic_write_json(reg.policy("softmax"), policy.model_copy(update={"provenance": Provenance(
        data_version="d", code_version="c", created_at="t",
        checkpoint_sha256=file_sha256(reg.checkpoint))}))
    directory, manifest, _ = build_bundle(reg.bundles_dir, checkpoint_path=reg.checkpoint,
                                          policy_path=reg.policy("softmax"),
                                          export_onnx_model=False, stage2_path=stage2)
    assert set(manifest.files) == {"checkpoint", "policy", "probe"}
    assert (manifest.stages, manifest.stage2) == (1, None)
    predictor = BundlePredictor.from_dir(directory)
    images = rng.integers(0, 255, (6, 3, IMG, IMG), dtype=np.uint8)
    _prob, decision, stage = predictor.predict_arrays(images)
    assert (stage == 1).all() and predictor.stage2_rows == 0
    assert set(decision.tolist()) <= {-1, 0, 1}
    # stage-2 files smuggled into a one-stage bundle are refused, listed or not
    shutil.copyfile(stage2, directory / "stage2.json")
    with pytest.raises(ArtifactIntegrityError, match=r"\['stage2\.json'\] not listed in "
                       r"manifest\.json: only a cascade bundle carries stage-2 files"):
        load_bundle(directory)
    forge(directory, lambda m: m["files"].update(
        stage2={"path": "stage2.json", "sha256": "0" * 64, "size_bytes": 1}))
    with pytest.raises(ArtifactIntegrityError, match=r"a 'softmax' bundle has one stage and "
                       r"carries no stage-2 files"):
        load_bundle(directory)


# -------------------------------------------------------------------------- load
def _stage2_of_another_checkpoint(copy, tmp_path):
    """stage2.json swapped for one fitted on another checkpoint, the policy's
    stage2_sha256 and the manifest rewritten to match: only lineage can tell."""
    other = save_tiny_checkpoint(tmp_path / "other.pt", seed=1)
    write_stage2(copy / "stage2.json", file_sha256(other))
    _edit_json(copy / "policy.json", stage2_sha256=file_sha256(copy / "stage2.json"))
    return forge(copy)


def _stage2_onnx_of_another_model(copy, tmp_path):
    from roadwork_assets.contracts.multiview_schemas import load_multiview_checkpoint
    from roadwork_assets.core.export.onnx_export import export_onnx
    from roadwork_assets.core.training.checkpoint import load_checkpoint
    from roadwork_assets.core.training.multiview import stage2_model
    from roadwork_assets.core.training.pipeline import model_from_checkpoint

    other = model_from_checkpoint(load_checkpoint(save_tiny_checkpoint(tmp_path / "o.pt", 1)))[0]
    mv = stage2_model(other, load_multiview_checkpoint(copy / "stage2.json"))
    export_onnx(mv, IMG, copy / "stage2.onnx")
    return forge(copy)


def _edited_stage2_rehashed(copy, tmp_path):
    _edit_json(copy / "stage2.json", aggregator="max")
    return forge(copy)


def _stage2_logits_replaced(copy, tmp_path):
    from roadwork_assets.core.artifacts import atomic_write_npz

    probe = dict(read_npz(copy / "probe.npz"))
    probe["stage2_logits"] = probe["stage2_logits"] * np.float32([1.0, -1.0])  # margins flip
    # keep the stored served outputs consistent with the replaced logits
    d, p, s = apply_cascade(json_policy(copy), probe["logits"], probe["stage2_logits"])
    probe.update(decision=d.astype(np.int8), probability=p, stage=s.astype(np.int8))
    atomic_write_npz(copy / "probe.npz", **probe)
    return forge(copy)


def json_policy(copy):
    from roadwork_assets.contracts.policy_schemas import parse_policy

    return parse_policy(json.loads((copy / "policy.json").read_text()))


HOSTILE = {
    "edited_stage2": (lambda c, t: _edit_json(c / "stage2.json", aggregator="max") or c,
                      r"stage2: stage2\.json sha256 differs from the manifest"),
    "missing_stage2_onnx": (lambda c, t: (c / "stage2.onnx").unlink() or c,
                            r"stage2_onnx: stage2\.onnx is missing"),
    "stage2_of_another_checkpoint": (
        _stage2_of_another_checkpoint,
        r"stage2\.json was fitted on the logits of checkpoint \w{12}, but model\.pt is \w{12}: "
        r"stage 2 belongs to another model"),
    "edited_stage2_rehashed": (
        _edited_stage2_rehashed,
        r"policy\.json was fitted with stage 2 \w{12}, but stage2\.json is \w{12}: the "
        r"cascade's FNR guarantee does not hold"),
    "stage2_onnx_of_another_model": (
        _stage2_onnx_of_another_model,
        r"stage2\.onnx does not serve what stage 2 in torch serves on the probe batch"),
    "stage2_logits_replaced": (
        _stage2_logits_replaced,
        r"stage2\.json with model\.pt no longer serves the stage-2 outputs stored in probe\.npz"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_cascade_bundle_is_refused_on_load(case, cascade_bundle, tmp_path):
    make, message = HOSTILE[case]
    copy = make(_copy(cascade_bundle.directory, tmp_path), tmp_path)
    with pytest.raises(ArtifactIntegrityError, match=message) as info:
        verify_bundle(copy)
    assert "\n" not in str(info.value)  # one line, naming the file


# ----------------------------------------------------------------------- predict
def test_predictor_runs_stage2_on_the_routed_images_only(cascade_bundle):
    predictor = BundlePredictor.from_dir(cascade_bundle.directory)
    images = np.concatenate([probe_images_uint8(8, IMG, seed=s) for s in (101, 102, 103, 104)])
    prob, decision, stage = predictor.predict_arrays(images)
    routed = int((stage == 2).sum())
    assert 0 < routed < len(images)
    assert predictor.stage2_rows == routed  # stage 2 ran on exactly the routed rows
    assert set(decision.tolist()) <= {0, 1}
    np.testing.assert_array_equal(np.round(prob).astype(int), decision)  # 0.5 -> 0
    assert not (prob == 0.5).any()
    # the same as the cascade with stage 2 computed on every image
    z2_all = predictor.stage2_logits(images)
    z1 = predict_view_logits(predictor.model, images, n_views=2, batch_size=32, device="cpu")
    d_all, p_all, s_all = apply_cascade(predictor.bundle.policy, z1, z2_all)
    np.testing.assert_array_equal(d_all, decision)
    np.testing.assert_array_equal(s_all, stage)
    np.testing.assert_allclose(p_all, prob, rtol=0, atol=1e-9)


def test_fit_cascade_artifacts_route_between_the_exits(tmp_path):
    """The fixture's cascade routes a real share of images (else these tests say little)."""
    reg = ArtifactRegistry(tmp_path)
    save_tiny_checkpoint(reg.checkpoint)
    policy_path, _ = fit_cascade_artifacts(reg, n=200)
    policy = json.loads(policy_path.read_text())
    assert 0.05 < policy["routing_rate"] < 0.95


@pytest.mark.parametrize("aggregator", ["max", "attention"])
def test_every_aggregator_exports_and_passes_its_parity(aggregator, tmp_path):
    reg = ArtifactRegistry(tmp_path)
    save_tiny_checkpoint(reg.checkpoint)
    policy_path, stage2_path = fit_cascade_artifacts(reg, n=200, aggregator=aggregator)
    directory, manifest, extra = build_bundle(
        reg.bundles_dir, checkpoint_path=reg.checkpoint, policy_path=policy_path,
        stage2_path=stage2_path)
    assert extra["onnx_parity"].passed, extra["onnx_parity"].summary()
    assert manifest.stage2.aggregator == aggregator
    assert load_bundle(directory).onnx_checked is True
