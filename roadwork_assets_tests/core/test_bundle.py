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
from roadwork_assets.core.artifacts import (
    ArtifactRegistry,
    atomic_write_json,
    file_sha256,
)
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
                    data_version="d" * 64, code_version="c",
                    assignment_version="a", weights_sha256="")
    rng = np.random.default_rng(0)
    n = 600
    y = rng.integers(0, 2, n)
    z = np.stack([np.zeros(n), 3 * (2 * y - 1) + rng.normal(size=n)], 1)
    views = np.repeat(z[:, None, :], 2, axis=1)
    policy = fit_policy("softmax", views, y, [f"i{i}" for i in range(n)], alpha=0.1,
                        mode="three_way")
    fitted_on = Provenance(data_version="d" * 64, code_version="c", created_at="t",
                           checkpoint_sha256=file_sha256(reg.checkpoint))
    atomic_write_json(reg.policy("softmax"), policy.model_copy(update={"provenance": fitted_on}))
    directory, _manifest, extra = build_bundle(
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
    assert set(manifest.files) == {"checkpoint", "policy", "onnx", "probe"}
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
    prob, decision, stage = predictor.predict_arrays(images)
    assert (stage == 1).all()
    assert ((prob >= 0) & (prob <= 1)).all()
    assert ((prob < 0.5) == (decision == 0)).all()
    assert not (prob == 0.5).any()


def test_policy_fitted_on_another_checkpoint_is_refused(tmp_path):
    from roadwork_assets.core.export.bundle import bundle_lineage

    reg = ArtifactRegistry(tmp_path)
    cfg = TrainerConfig(img_size=32)
    save_checkpoint(reg.checkpoint, model_state_dict=build_model(cfg).state_dict(), epoch=1,
                    best_metric=0.5, best_metric_name="nll", config=cfg.model_dump(),
                    backbone_name=cfg.backbone, mode=cfg.mode, data_version="d", code_version="c",
                    assignment_version="a", weights_sha256="")
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


# ---------------------------------------------------------------- a closed bundle, on load
def _forge(directory, edit=None):
    """What someone who can write the bundle does: edit, then re-hash every named file and
    re-derive the bundle id, so only the load-time lineage checks can tell."""
    from types import SimpleNamespace

    from roadwork_assets.core.export.bundle_checks import content_id

    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    if edit:
        edit(manifest)
    for entry in manifest["files"].values():
        target = directory / entry["path"]  # an absolute path replaces directory
        if target.is_file():
            entry["sha256"] = file_sha256(target)
            entry["size_bytes"] = target.stat().st_size
    manifest["bundle_id"] = content_id(
        {r: SimpleNamespace(sha256=f["sha256"]) for r, f in manifest["files"].items()})
    path.write_text(json.dumps(manifest))
    return directory


def _other_checkpoint(path, seed=1):
    cfg = TrainerConfig(img_size=32)
    torch.manual_seed(seed)
    save_checkpoint(path, model_state_dict=build_model(cfg).state_dict(), epoch=1,
                    best_metric=0.5, best_metric_name="val_select_nll", config=cfg.model_dump(),
                    backbone_name=cfg.backbone, mode=cfg.mode, data_version="d" * 64,
                    code_version="c", assignment_version="a", weights_sha256="")
    return path


def _set(key, value):
    return lambda m: m.update({key: value})


def _outside_model(copy, tmp_path, name):
    """A checkpoint outside the bundle, named from inside by ``name(outside_path)``."""
    outside = tmp_path / "B" / "model.pt"
    outside.parent.mkdir()
    _other_checkpoint(outside)
    return lambda m: m["files"]["checkpoint"].update(path=name(outside))


def _hostile(case, copy, tmp_path):
    if case == "dotdot_path":
        return _forge(copy, _outside_model(copy, tmp_path, lambda p: "../B/model.pt"))
    if case == "absolute_path":
        return _forge(copy, _outside_model(copy, tmp_path, str))
    if case == "symlink_leaving_dir":
        outside = tmp_path / "outside.pt"
        shutil.copyfile(copy / "model.pt", outside)
        (copy / "model.pt").unlink()
        (copy / "model.pt").symlink_to(outside)
        return copy
    if case == "unlisted_file":
        (copy / "notes.txt").write_text("hello")
        return copy
    if case == "policy_from_another_checkpoint":
        policy = json.loads((copy / "policy.json").read_text())
        policy["provenance"]["checkpoint_sha256"] = "0" * 64
        (copy / "policy.json").write_text(json.dumps(policy))
        return _forge(copy)
    if case == "swapped_checkpoint":
        _other_checkpoint(copy / "model.pt")
        return _forge(copy)
    if case == "onnx_from_another_model":
        from roadwork_assets.core.export.onnx_export import export_onnx
        from roadwork_assets.core.training.checkpoint import load_checkpoint
        from roadwork_assets.core.training.pipeline import model_from_checkpoint

        other = load_checkpoint(_other_checkpoint(tmp_path / "other.pt"))
        export_onnx(model_from_checkpoint(other)[0], 32, copy / "model.onnx")
        return _forge(copy)
    if case == "img_size_4":
        return _forge(copy, _set("img_size", 4))
    if case == "n_views_50":
        return _forge(copy, _set("n_views", 50))
    raise AssertionError(case)


HOSTILE = {
    "dotdot_path": r"files\.checkpoint\.path: '\.\./B/model\.pt' climbs out of the bundle",
    "absolute_path": r"files\.checkpoint\.path: '/.*/B/model\.pt' is an absolute path",
    "symlink_leaving_dir": r"model\.pt is a symlink \(to /.*outside\.pt\)",
    "unlisted_file": r"\['notes\.txt'\] not listed in manifest\.json",
    "policy_from_another_checkpoint":
        r"policy\.json was fitted on the logits of checkpoint 000000000000, but model\.pt is",
    "swapped_checkpoint":
        r"model\.pt has sha256 \w{12} but the manifest's provenance\.checkpoint_sha256 is",
    "onnx_from_another_model": r"model\.onnx does not serve what model\.pt serves on the probe",
    "img_size_4": r"manifest\.json is refused: img_size: img_size 4 is outside 16\.\.1024",
    "n_views_50": r"manifest\.json is refused: n_views: n_views 50 is outside 1\.\.4",
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_bundle_is_refused_on_load_and_by_the_cli(case, bundle_dir, tmp_path, capsys):
    from PIL import Image

    from roadwork_assets.cli import main

    copy = _hostile(case, _copy(bundle_dir, tmp_path), tmp_path)
    with pytest.raises(ArtifactIntegrityError, match=HOSTILE[case]):
        load_bundle(copy)
    image = tmp_path / "street.png"
    Image.new("RGB", (40, 40), (120, 90, 30)).save(image)
    for argv in (["verify", str(copy)], ["predict", "--bundle", str(copy), str(image)]):
        capsys.readouterr()
        assert main(argv) == 2, argv
        out = capsys.readouterr()
        assert out.out == ""  # nothing served
        lines = out.err.strip().splitlines()
        assert len(lines) == 1, out.err
        assert lines[0].startswith(f"roadwork {argv[0]}: error: bundle {copy}")


def test_swapped_checkpoint_with_forged_lineage_fails_the_stored_probe(bundle_dir, tmp_path):
    """Provenance and the policy's checkpoint rewritten too: torch no longer serves the
    probe outputs stored at build time."""
    copy = _copy(bundle_dir, tmp_path)
    _other_checkpoint(copy / "model.pt")
    sha = file_sha256(copy / "model.pt")
    policy = json.loads((copy / "policy.json").read_text())
    policy["provenance"]["checkpoint_sha256"] = sha
    (copy / "policy.json").write_text(json.dumps(policy))
    _forge(copy, lambda m: m["provenance"].update(checkpoint_sha256=sha))
    with pytest.raises(ArtifactIntegrityError,
                       match=r"model\.pt no longer serves the outputs stored in probe\.npz"):
        load_bundle(copy)


def test_rehashed_file_without_a_new_bundle_id_is_refused(bundle_dir, tmp_path):
    copy = _copy(bundle_dir, tmp_path)
    manifest = json.loads((copy / "manifest.json").read_text())
    fixed = json.loads((_forge(copy) / "manifest.json").read_text())
    assert fixed["bundle_id"] == manifest["bundle_id"]  # _forge derives ids as the build does
    policy = json.loads((copy / "policy.json").read_text())
    policy["alpha"] = 0.3
    (copy / "policy.json").write_text(json.dumps(policy))
    fixed["files"]["policy"]["sha256"] = file_sha256(copy / "policy.json")
    fixed["files"]["policy"]["size_bytes"] = (copy / "policy.json").stat().st_size
    (copy / "manifest.json").write_text(json.dumps(fixed))
    with pytest.raises(ArtifactIntegrityError, match=r"bundle_id \w+ is not the id of its files"):
        load_bundle(copy)


def test_img_size_in_bounds_but_not_the_checkpoints_is_refused(bundle_dir, tmp_path):
    copy = _forge(_copy(bundle_dir, tmp_path), _set("img_size", 64))
    with pytest.raises(ArtifactIntegrityError,
                       match=r"manifest\.json says img_size 64 but model\.pt was built with 32"):
        load_bundle(copy)


def test_old_manifest_version_is_refused_with_rebuild(bundle_dir, tmp_path):
    copy = _forge(_copy(bundle_dir, tmp_path), _set("schema_version", 1))
    with pytest.raises(ArtifactIntegrityError,
                       match=r"schema_version 1, from before bundles were closed.*rebuild"):
        load_bundle(copy)


def test_manifest_schema_refuses_paths_outside_the_bundle():
    from pydantic import ValidationError

    from roadwork_assets.contracts.schemas import BundleFile

    ok = {"sha256": "a" * 64, "size_bytes": 1}
    assert BundleFile(path="model.pt", **ok).path == "model.pt"
    for bad in ("../B/model.pt", "/etc/hostname", "../../../../etc/hostname", "sub/model.pt",
                "..", "", ".hidden", "C:\\model.pt", "a\\b"):
        with pytest.raises(ValidationError, match="path"):
            BundleFile(path=bad, **ok)


def test_onnx_check_can_be_skipped_by_predict_only(bundle_dir, tmp_path):
    copy = _hostile("onnx_from_another_model", _copy(bundle_dir, tmp_path), tmp_path)
    bundle = load_bundle(copy, check_onnx=False)
    assert bundle.onnx_checked is False
    assert load_bundle(bundle_dir).onnx_checked is True


def test_policy_without_a_recorded_checkpoint_is_not_bundled(bundle_dir, tmp_path):
    from roadwork_assets.core.export.bundle import bundle_lineage

    policy = json.loads((bundle_dir / "policy.json").read_text())
    policy["provenance"] = None
    (tmp_path / "policy.json").write_text(json.dumps(policy))
    with pytest.raises(ArtifactIntegrityError,
                       match=r"policy\.json records no checkpoint it was fitted on"):
        bundle_lineage(bundle_dir / "model.pt", tmp_path / "policy.json", "thresholds")


def test_bundle_folder_and_files_have_the_modes_of_other_artifacts(bundle_dir):
    """Folders 0777 & ~umask (0755 under 022), files 0666 & ~umask (0644), like every other
    artifact -- not mkdtemp's 0700 (issue 8.5)."""
    import os
    import stat

    def mode(path) -> int:
        return stat.S_IMODE(os.stat(path).st_mode)

    umask = os.umask(0)
    os.umask(umask)
    bundles = bundle_dir.parent
    assert mode(bundle_dir) == 0o777 & ~umask == mode(bundles)
    files = [p for p in bundle_dir.iterdir() if p.is_file()]
    assert files and {p.name: mode(p) for p in files} == {p.name: 0o666 & ~umask for p in files}
    assert mode(bundles.parent / "checkpoint" / "model.pt") == 0o666 & ~umask


def test_latest_pointer_that_leaves_the_bundles_folder_is_refused(tmp_path):
    from roadwork_assets.contracts.errors import ArtifactIntegrityError

    reg = ArtifactRegistry(tmp_path)
    reg.bundles_dir.mkdir(parents=True)
    reg.latest_bundle_pointer.write_text("../../etc\n")
    with pytest.raises(ArtifactIntegrityError, match="not a bundle id"):
        reg.latest_bundle()
