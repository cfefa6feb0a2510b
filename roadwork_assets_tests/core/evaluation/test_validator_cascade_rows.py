"""The validator simulator's rows for a real tiny cascade bundle (``build_bundle`` +
``load_bundle``, stage 2 = the stage-1 network on ten crops): each row answers what its
definition says, stage 2 runs once per image and batch, rows that do not apply are left
out with the reason; and the test report's checks of the stage-2 logits and of the
``thresholds`` policy."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from roadwork_assets.contracts.errors import ArtifactIntegrityError, InsufficientDataError
from roadwork_assets.core.artifacts import ArtifactRegistry, file_sha256, make_provenance
from roadwork_assets.core.calibration.cascade import apply_cascade, cascade_stage2_probability
from roadwork_assets.core.calibration.policies import (
    apply_policy,
    fit_policy,
    policy_probability,
)
from roadwork_assets.core.data.transforms import to_model_array
from roadwork_assets.core.evaluation.report import check_same_stage2, stage1_policy_for
from roadwork_assets.core.evaluation.validator_rows import ServedModels, simulate_bundle
from roadwork_assets.core.export.bundle import build_bundle, load_bundle
from roadwork_assets.core.export.onnx_export import probe_images_uint8
from roadwork_assets.core.training.multiview import predict_stage2_logits
from roadwork_assets.core.training.trainer import predict_view_logits
from roadwork_assets_tests.core.export.conftest import (
    IMG,
    fit_cascade_artifacts,
    save_tiny_checkpoint,
)

ROW_NAMES = ["cascade_served", "stage1_served", "single_view_0.5", "stage2_0.5"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(cascade bundle with stage 2 loaded, thresholds softmax policy of its checkpoint)."""
    root = tmp_path_factory.mktemp("cascade_rows")
    reg = ArtifactRegistry(root)
    save_tiny_checkpoint(reg.checkpoint)
    policy_path, stage2_path = fit_cascade_artifacts(reg, n=240)
    directory, _, _ = build_bundle(reg.bundles_dir, checkpoint_path=reg.checkpoint,
                                   policy_path=policy_path, policy_asset="cascade_policy",
                                   export_onnx_model=False, stage2_path=stage2_path)
    bundle = load_bundle(directory, check_onnx=False)
    assert bundle.stage2_model is not None and bundle.policy.kind == "cascade"
    images = np.concatenate([probe_images_uint8(8, IMG, seed=s) for s in range(1, 31)])
    z1 = predict_view_logits(bundle.model, images, n_views=2, batch_size=64, device="cpu")
    y = (z1[:, 0, 1] - z1[:, 0, 0] > np.median(z1[:, 0, 1] - z1[:, 0, 0])).astype(int)
    softmax = fit_policy("softmax", z1, y, [f"i{i}" for i in range(len(y))], alpha=0.1)
    softmax = softmax.model_copy(update={"provenance": make_provenance(
        "d" * 64, file_sha256(reg.checkpoint))})
    return bundle, softmax


def _pil_batch(n: int, seed: int) -> list[Image.Image]:
    arr = probe_images_uint8(n, 48, seed=seed)  # uint8 [n, 3, 48, 48]
    return [Image.fromarray(a.transpose(1, 2, 0)) for a in arr]


def test_each_row_answers_its_definition_and_stage2_runs_once_per_image(tiny):
    bundle, softmax = tiny
    served = ServedModels.of(bundle, stage1_policy=softmax)
    images = _pil_batch(24, seed=50)
    arrays = np.stack([to_model_array(im, IMG) for im in images])
    v = predict_view_logits(bundle.model, arrays, n_views=1, batch_size=64, device="cpu")
    z2 = predict_stage2_logits(bundle.stage2_model, arrays)
    from roadwork_assets.core.evaluation.validator_rows import ROWS

    fns = {name: ROWS[name].build(served) for name in ROW_NAMES}
    decision, expected, stage = apply_cascade(bundle.policy, v, z2)
    got = fns["cascade_served"](images)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert np.array_equal(np.round(got).astype(int), decision)
    assert served.stage2.n_computed == int(np.sum(stage == 2))  # routed images only
    np.testing.assert_allclose(fns["stage2_0.5"](images),
                               cascade_stage2_probability(bundle.policy, z2), atol=1e-6)
    assert served.stage2.n_computed == len(images)  # the rest, once: not routed ones twice
    np.testing.assert_allclose(fns["stage1_served"](images), apply_policy(softmax, v)[1])
    np.testing.assert_allclose(fns["single_view_0.5"](images),
                               policy_probability(bundle.policy, v))


def _uris(tmp_path, n: int) -> list[str]:
    out = []
    for k, im in enumerate(_pil_batch(n, seed=70)):
        path = tmp_path / f"{k}.png"
        im.save(path)
        out.append(str(path))
    return out


def test_simulator_scores_the_four_rows_on_the_same_images(tiny, tmp_path):
    bundle, softmax = tiny
    served = ServedModels.of(bundle, stage1_policy=softmax)
    n = 8
    labels = np.array([0, 1] * (n // 2))
    sim = simulate_bundle(served, _uris(tmp_path, n), [f"i{k}" for k in range(n)], labels,
                          [f"g{k}" for k in range(n)], max_images=n, seed=3)
    assert [r.name for r in sim.rows] == ROW_NAMES and sim.skipped == {}
    assert all(len(r.per_level) == 4 and r.per_level[0].n == n for r in sim.rows)
    assert served.stage2.n_computed == n * 4  # each image once per level, for both rows
    again = simulate_bundle(ServedModels.of(bundle, stage1_policy=softmax),
                            _uris(tmp_path, n), [f"i{k}" for k in range(n)], labels,
                            [f"g{k}" for k in range(n)], max_images=n, seed=3)
    assert [r.reward.mean for r in again.rows] == [r.reward.mean for r in sim.rows]


def test_rows_that_do_not_apply_are_left_out_with_the_reason(tiny, tmp_path):
    bundle, _ = tiny
    n = 4
    args = (_uris(tmp_path, n), [f"i{k}" for k in range(n)], np.array([0, 1, 0, 1]),
            [f"g{k}" for k in range(n)])
    sim = simulate_bundle(bundle, *args, max_images=n)  # no thresholds policy given
    assert [r.name for r in sim.rows] == ["cascade_served", "single_view_0.5", "stage2_0.5"]
    assert "`thresholds`" in sim.skipped["stage1_served"]
    no_stage2 = dataclasses.replace(bundle, stage2=None, stage2_model=None)
    sim = simulate_bundle(no_stage2, *args, max_images=n, rows=["cascade_served",
                                                                 "single_view_0.5"])
    assert [r.name for r in sim.rows] == ["single_view_0.5"]
    assert "carries no stage-2 network" in sim.skipped["cascade_served"]


def test_stage1_bundle_serves_its_own_policy_and_has_no_stage2_rows(tiny, tmp_path):
    bundle, softmax = tiny
    stage1 = dataclasses.replace(bundle, policy=softmax, stage2=None, stage2_model=None)
    n = 4
    sim = simulate_bundle(stage1, _uris(tmp_path, n), [f"i{k}" for k in range(n)],
                          np.array([0, 1, 0, 1]), [f"g{k}" for k in range(n)], max_images=n)
    assert [r.name for r in sim.rows] == ["stage1_served", "single_view_0.5"]
    assert set(sim.skipped) == {"cascade_served", "stage2_0.5"}
    assert "stage-1 bundle has no stage 2" in sim.skipped["stage2_0.5"]


def test_report_refuses_stage2_logits_of_another_stage2_or_other_images(tiny):
    bundle, _ = tiny
    ids = np.array(["a", "b"])
    good = {"checkpoint_sha256": np.array(bundle.manifest.files["checkpoint"].sha256),
            "multiview_checkpoint_sha256": np.array(bundle.policy.stage2_sha256),
            "item_ids": ids}
    check_same_stage2(bundle, good, ids)
    with pytest.raises(ArtifactIntegrityError, match="ships stage 2"):
        check_same_stage2(bundle, good | {"multiview_checkpoint_sha256": np.array("f" * 64)}, ids)
    with pytest.raises(ArtifactIntegrityError, match="ships checkpoint"):
        check_same_stage2(bundle, good | {"checkpoint_sha256": np.array("f" * 64)}, ids)
    with pytest.raises(ArtifactIntegrityError, match="other images"):
        check_same_stage2(bundle, good, ids[::-1])


def test_thresholds_policy_must_be_fitted_on_the_bundles_checkpoint(tiny):
    bundle, softmax = tiny
    raw = json.loads(softmax.model_dump_json())
    assert stage1_policy_for(bundle, raw) == softmax
    foreign = raw | {"provenance": raw["provenance"] | {"checkpoint_sha256": "0" * 64}}
    with pytest.raises(ArtifactIntegrityError, match="fitted on checkpoint 000000000000"):
        stage1_policy_for(bundle, foreign)
    unfitted = {"schema_version": raw["schema_version"], "fitted": False, "kind": "softmax",
                "reason": "too few roadwork scenes"}
    with pytest.raises(InsufficientDataError, match="too few roadwork scenes"):
        stage1_policy_for(bundle, unfitted)
