"""INT8 bundle: the fp32 cascade bundle's networks dynamically quantized, its policy
re-certified on the quantized model's own scores, closed and verified on load, refused
when the guarantee no longer holds or a file was swapped."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from roadwork_assets.contracts.errors import ArtifactIntegrityError, RoadworkError
from roadwork_assets.core.calibration.cascade import CascadeConfig
from roadwork_assets.core.calibration.policy_config import PolicyFitConfig
from roadwork_assets.core.export.bundle import load_bundle
from roadwork_assets.core.export.engines import OnnxEngine
from roadwork_assets.core.export.int8_bundle import Int8Fit, build_int8_bundle
from roadwork_assets.core.export.onnx_export import onnx_probe_logits, probe_images_uint8
from roadwork_assets.core.export.predictor import BundlePredictor
from roadwork_assets.core.export.quantize import (
    CalibScores,
    GuaranteeNotMet,
    op_counts,
    score_images,
)
from roadwork_assets_tests.core.export.conftest import IMG
from roadwork_assets_tests.core.export.test_cascade_bundle import forge


def _calib_images(n: int = 240) -> np.ndarray:
    return np.concatenate([probe_images_uint8(8, IMG, seed=s) for s in range(1, n // 8 + 1)])


def _labels(fp32_bundle, images: np.ndarray) -> np.ndarray:
    """Labels stage 2 (fp32) predicts well, as the cascade fixture draws them."""
    z2 = OnnxEngine(fp32_bundle.directory, True).stage2_logits(images, 64)
    m2 = z2[:, 1] - z2[:, 0]
    noise = np.random.default_rng(0).normal(0, 0.3 * m2.std(), len(m2))
    return (m2 + noise > np.median(m2)).astype(int)


def _fit(images, labels, alpha: float = 0.1) -> Int8Fit:
    def scores_fn(engine):
        z1, z2 = score_images(engine, lambda a, b: images[a:b], len(images), 2, True, 64)
        return CalibScores(view_logits=z1, stage2_logits=z2, labels=labels,
                           item_ids=[f"i{i}" for i in range(len(images))])

    return Int8Fit(scores_fn=scores_fn, policy_config=PolicyFitConfig(),
                   cascade_config=CascadeConfig(alpha=alpha, latency_stage1_s=0.001,
                                                latency_stage2_s=0.01, alphas=(),
                                                n_lambda=51),
                   data_version="d" * 64)


@pytest.fixture(scope="module")
def int8(cascade_bundle, tmp_path_factory):
    fp32 = load_bundle(cascade_bundle.directory)
    images = _calib_images()
    labels = _labels(fp32, images)
    out = tmp_path_factory.mktemp("int8") / "bundles_int8"
    return fp32, images, labels, build_int8_bundle(fp32, out, _fit(images, labels))


def test_int8_bundle_quantizes_both_stages_and_verifies(int8):
    fp32, _, _, result = int8
    m = result.manifest
    assert (m.precision, m.source_bundle_id, m.policy_kind) == (
        "int8-dynamic", fp32.manifest.bundle_id, "cascade")
    assert set(m.files) == set(fp32.manifest.files)
    for name in ("model.onnx", "stage2.onnx"):
        q = m.quantization["files"][name]
        # the tiny backbone's 15 convolutions and the linear head (Gemm) all became
        # integer ops: no weighted op is left in fp32
        assert q["integer_ops"] == {"ConvInteger": 15, "MatMulInteger": 1}
        assert q["float_weighted_ops"] == {}
        assert {"Conv", "Gemm"}.isdisjoint(op_counts(result.directory / name))
        assert q["int8_bytes"] < 0.35 * q["fp32_bytes"]
    # model.pt and stage2.json are byte copies; the ONNX files and the policy are new
    for role in ("checkpoint", "stage2"):
        assert m.files[role].sha256 == fp32.manifest.files[role].sha256
    for role in ("onnx", "stage2_onnx", "policy", "probe"):
        assert m.files[role].sha256 != fp32.manifest.files[role].sha256
    loaded = load_bundle(result.directory)
    assert loaded.onnx_checked and loaded.manifest.bundle_id == m.bundle_id
    assert loaded.policy.crc_bound <= loaded.policy.alpha == 0.1


def test_int8_policy_is_fitted_on_the_quantized_models_own_scores(int8):
    fp32, images, labels, result = int8
    z_int8 = result.scores.view_logits
    # the scores the policy was fitted on are what ORT computes with the INT8 model.onnx,
    # one image per call ...
    ort_int8 = np.concatenate([onnx_probe_logits(result.directory / "model.onnx",
                                                 images[i:i + 1], 2) for i in range(len(images))])
    np.testing.assert_array_equal(z_int8, ort_int8)
    # ... which matters: in a batch, an image's INT8 scores depend on its batch-mates (the
    # activations' int8 scale is the whole tensor's), while fp32 scores barely move
    batched = onnx_probe_logits(result.directory / "model.onnx", images[:64], 2)
    assert np.abs(batched - z_int8[:64]).max() > 1e-2 * np.abs(z_int8[:64]).max()
    # ... and not the fp32 model's
    ort_fp32 = onnx_probe_logits(fp32.directory / "model.onnx", images, 2)
    gap = np.abs(z_int8 - ort_fp32).max()
    assert gap > 100 * np.abs(ort_fp32).max() * 2.0 ** -24
    cal_int8 = result.policy.calibrator_stage1.model_dump()
    assert cal_int8 != fp32.policy.calibrator_stage1.model_dump()
    # refitting on the stored INT8 scores gives exactly the bundle's policy
    from roadwork_assets.core.export.quantize import refit_policy

    again = refit_policy("cascade", result.scores, PolicyFitConfig(),
                         _fit(images, labels).cascade_config)
    assert (again.lam, again.t2, again.t_exit_neg, again.t_exit_pos) == (
        result.policy.lam, result.policy.t2, result.policy.t_exit_neg, result.policy.t_exit_pos)


def test_predictor_serves_int8_with_onnx_only(int8):
    _, images, _, result = int8
    predictor = BundlePredictor.from_dir(result.directory, engine="auto")
    assert predictor.engine.name == "onnx" and "int8-dynamic" in predictor.engine_reason
    prob, decision, stage = predictor.predict_arrays(images[:40])
    assert set(np.unique(stage)) <= {1, 2} and np.array_equal(decision, (prob > 0.5))
    with pytest.raises(RoadworkError, match="int8-dynamic.*torch does not compute"):
        BundlePredictor.from_dir(result.directory, engine="torch")


def test_edited_quantized_onnx_is_refused_on_load(int8, tmp_path):
    fp32, _, _, result = int8
    edited = tmp_path / "edited"
    shutil.copytree(result.directory, edited)
    data = bytearray((edited / "model.onnx").read_bytes())
    data[-20] ^= 0xFF
    (edited / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ArtifactIntegrityError, match="onnx: model.onnx sha256 differs"):
        load_bundle(edited)
    # swapped for the fp32 network and re-hashed: the policy names other INT8 files
    swapped = tmp_path / "swapped"
    shutil.copytree(result.directory, swapped)
    shutil.copyfile(fp32.directory / "model.onnx", swapped / "model.onnx")
    forge(swapped)
    with pytest.raises(ArtifactIntegrityError, match="fitted on the scores of .*certified for "
                       "other scores"):
        load_bundle(swapped)


def test_forged_probe_logits_are_refused_by_ort_rerun(int8, tmp_path):
    """Stored probe outputs re-derived from logits the INT8 network does not compute (so
    they follow from the policy): only re-running ONNX Runtime can tell, and it does."""
    from roadwork_assets.core.artifacts import atomic_write_npz, read_npz
    from roadwork_assets.core.export.cascade_serving import served_outputs

    _, _, _, result = int8
    forged = tmp_path / "forged"
    shutil.copytree(result.directory, forged)
    probe = dict(read_npz(forged / "probe.npz"))
    policy = load_bundle(result.directory).policy
    z1 = probe["logits"].astype(np.float64)
    z1[..., 1] += 5.0  # every image pushed towards roadwork
    decision, prob, stage = served_outputs(policy, z1, probe["stage2_logits"].astype(np.float64))
    probe.update(logits=z1.astype(np.float32), probability=prob, decision=decision, stage=stage)
    atomic_write_npz(forged / "probe.npz", **probe)
    forge(forged)
    with pytest.raises(ArtifactIntegrityError, match=r"model.onnx \(int8-dynamic\) no longer "
                       "serves the outputs stored in probe.npz"):
        load_bundle(forged)


def test_failed_recertification_refuses_the_int8_bundle(int8, tmp_path):
    """alpha = 0.001 needs (0 + 1)/(n + 1) <= 0.001, i.e. 999 units with roadwork; the
    threshold part has a few dozen: no lambda certifies, so nothing is published."""
    fp32, images, labels, _ = int8
    out = tmp_path / "bundles_int8"
    with pytest.raises(GuaranteeNotMet, match=r"no certified lambda at alpha = 0\.001"):
        build_int8_bundle(fp32, out, _fit(images, labels, alpha=0.001))
    assert [p.name for p in out.iterdir()] == []  # the staging folder is gone too
    manifest = json.loads((fp32.directory / "manifest.json").read_text())
    assert manifest["precision"] == "fp32"
