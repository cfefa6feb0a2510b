"""The whole graph, materialized in-process on a tiny generated dataset."""

from __future__ import annotations

import json

import numpy as np
import pytest

from roadwork_assets.contracts.policy_schemas import parse_policy
from roadwork_assets.contracts.splits import SPLITS
from roadwork_assets.core.artifacts import ArtifactRegistry, read_npz
from roadwork_assets.core.export.bundle import load_bundle
from roadwork_assets.core.training.checkpoint import load_checkpoint
from roadwork_assets.defs.freshness import OPTIONAL_TAG


def test_every_asset_and_check_succeeded(materialized_root):
    _, defs, results = materialized_root
    materialized = set()
    for result in results:
        assert result.success
        for event in result.get_asset_materialization_events():
            materialized.add(event.asset_key.to_user_string())
        for ev in result.get_asset_check_evaluations():
            assert ev.passed, (ev.asset_key, ev.check_name, ev.description)
    graph = defs.resolve_asset_graph()
    every = {k.to_user_string() for k in graph.get_all_asset_keys()
             if graph.get(k).tags.get(OPTIONAL_TAG) != "true"}
    assert materialized == every
    assert "bundle_int8" not in every  # optional: materialized on request only


def test_artifacts_exist_and_metrics_are_sane(materialized_root):
    root, _, _ = materialized_root
    reg = ArtifactRegistry(root)
    for split in SPLITS:
        assert reg.split_manifest(split).exists()
        z = read_npz(reg.logits(split))
        assert np.isfinite(z["logits"]).all()
    payload = load_checkpoint(reg.checkpoint)
    assert {"model_state_dict", "epoch", "best_metric", "config", "backbone_name"} <= set(payload)
    report = json.loads(reg.test_report.read_text())
    assert report["split"] == "val_test"
    # 16 short epochs on ~440 images at 64 px: clearly better than chance, no more promised
    assert report["model_balanced_accuracy"] > 0.6
    assert report["auroc"] > 0.65
    # what is served obeys the policy: every stage-1 negative is emitted below 0.5
    assert report["served"]["confusion_matrix"]["fn"] == report["policy"]["confusion_matrix"]["fn"]
    assert 0.0 <= report["fnr"]["ci_low"] <= report["fnr"]["ci_high"] <= 1.0
    bundle = load_bundle(reg.latest_bundle())
    assert bundle.manifest.policy_kind == "cascade"  # the default: both stages ship
    assert {"checkpoint", "policy", "onnx", "probe", "stage2", "stage2_onnx"} == set(
        bundle.manifest.files)


def test_served_fnr_on_val_test_is_consistent_with_alpha(materialized_root):
    """Out of sample: the policy never saw val_test, so its exact FNR interval there must
    admit alpha (the in-sample threshold-part FNR is <= alpha by construction)."""
    root, _, _ = materialized_root
    reg = ArtifactRegistry(root)
    for kind in ("cascade", "softmax"):  # what the bundle serves, and stage 1 alone
        policy = parse_policy(json.loads(reg.policy(kind).read_text()))
        assert policy.alpha == 0.05 and policy.calibration_unit == "group"
    report = json.loads(reg.test_report.read_text())
    assert report["policy_kind"] == "cascade"
    for row in report["comparison"]:
        if row["name"] in ("cascade_served", "stage1_served"):  # both certified at alpha
            assert row["fnr"]["ci_low"] <= policy.alpha, row["name"]


def test_training_is_tracked_in_mlflow_sqlite(materialized_root):
    import mlflow

    root, _, _ = materialized_root
    client = mlflow.MlflowClient(tracking_uri=ArtifactRegistry(root).mlflow_tracking_uri)
    experiment = client.get_experiment_by_name("roadwork_tests")
    runs = client.search_runs([experiment.experiment_id],  # one run per logging asset
                              filter_string="attributes.run_name = 'checkpoint'")
    assert runs, "the checkpoint asset logged no MLflow run"
    run = runs[0]
    assert "best_nll" in run.data.metrics
    assert run.data.params["backbone"] == "test_resnet.r160_in1k"
    history = client.get_metric_history(run.info.run_id, "val_select_nll")
    assert len(history) >= 1


def test_every_artifact_records_data_and_code_version(materialized_root):
    from roadwork_assets.core.artifacts import code_version, read_parquet_provenance

    root, _, _ = materialized_root
    reg = ArtifactRegistry(root)
    assert read_parquet_provenance(reg.split_manifest("train"))["code_version"] == code_version()
    assert str(read_npz(reg.embedding_shard("train", 0))["data_version"])
    assert str(read_npz(reg.logits("val_calib"))["code_version"]) == code_version()
    assert load_checkpoint(reg.checkpoint)["code_version"] == code_version()
    for policy in ("softmax", "gate", "scrc"):
        prov = json.loads(reg.policy(policy).read_text())["provenance"]
        assert prov["data_version"] == str(read_npz(reg.logits("val_calib"))["data_version"])
    report = json.loads(reg.test_report.read_text())
    assert report["provenance"]["code_version"] == code_version()


def test_materializations_carry_the_artifacts_data_and_code_version(materialized_root):
    """Dagster's DataVersion of a materialization is its artifact's content (sha256; a
    bundle's content id), so a new setting that changes an artifact makes its readers
    stale; the lineage data_version the artifact records is in the metadata, and the
    code_version is the one the artifact was stamped with."""
    from roadwork_assets.core.artifacts import code_version, file_sha256, read_parquet_provenance

    root, _, results = materialized_root
    reg = ArtifactRegistry(root)
    lineage = {
        ("split_manifest", "train"): read_parquet_provenance(
            reg.split_manifest("train"))["data_version"],
        ("logits", "val_calib"): str(read_npz(reg.logits("val_calib"))["data_version"]),
        ("checkpoint", None): load_checkpoint(reg.checkpoint)["data_version"],
        ("thresholds", None): json.loads(reg.policy("softmax").read_text())["provenance"][
            "data_version"],
        ("test_report", None): json.loads(reg.test_report.read_text())["provenance"][
            "data_version"],
    }
    content = {
        ("split_manifest", "train"): file_sha256(reg.split_manifest("train")),
        ("logits", "val_calib"): file_sha256(reg.logits("val_calib")),
        ("checkpoint", None): file_sha256(reg.checkpoint),
        ("thresholds", None): file_sha256(reg.policy("softmax")),
        ("test_report", None): file_sha256(reg.test_report),
        ("bundle", None): reg.latest_bundle().name,
    }
    mats = {}
    for result in results:
        for event in result.get_asset_materialization_events():
            mat = event.materialization
            mats[(event.asset_key.to_user_string(), mat.partition)] = mat
    for key, sha in content.items():
        assert mats[key].tags["dagster/data_version"] == sha, key
        assert mats[key].tags["dagster/data_version_is_user_provided"] == "true", key
        assert mats[key].tags["dagster/code_version"] == code_version(), key
    for key, data_version in lineage.items():
        assert mats[key].metadata["data_version"].value == data_version, key
        assert data_version != content[key], key


def test_report_carries_the_validator_simulator_rows(materialized_root):
    """test_report runs the StreetVision validator simulator on val_test's original images,
    one row per way of serving, and shows it in the UI."""
    import pandas as pd

    from roadwork_assets.contracts.schemas import TestReport, load_json_artifact

    root, _, results = materialized_root
    reg = ArtifactRegistry(root)
    report = load_json_artifact(reg.test_report, TestReport)
    sim = report.validator
    assert sim is not None and sim.split == "val_test" and sim.flips
    assert [r.name for r in sim.rows] == ["cascade_served", "stage1_served", "single_view_0.5",
                                          "stage2_0.5"]
    n_test = len(pd.read_parquet(reg.split_manifest("val_test")))
    assert sim.n_images == sim.n_available == n_test == report.n_images  # under the cap
    for row in sim.rows:
        rw = row.reward
        assert 0.0 <= rw.ci_low <= rw.mean <= rw.ci_high <= 1.0, row.name
        assert rw.expected is not None and 0.0 <= rw.expected <= 1.0
        assert abs(rw.mean - rw.expected) < 0.03, row.name  # simulation vs closed form
        assert [m.level for m in row.per_level] == [0, 1, 2, 3]
        assert all(m.n == sim.n_images and m.n_invalid == 0 for m in row.per_level)
    # L0 is the validator's centre crop + JPEG: close to what the logits say, image for image
    l0 = sim.row("single_view_0.5").per_level[0]
    assert abs(l0.balanced_accuracy - report.model_balanced_accuracy) < 0.1
    served_l0 = sim.row("cascade_served").per_level[0]
    assert abs(served_l0.balanced_accuracy - report.balanced_accuracy) < 0.1
    stage1 = next(r for r in report.comparison if r.name == "stage1_served")
    l0 = sim.row("stage1_served").per_level[0]
    assert abs(l0.balanced_accuracy - stage1.balanced_accuracy) < 0.1
    meta = next(ev.materialization.metadata for r in results
                for ev in r.get_asset_materialization_events()
                if ev.asset_key.to_user_string() == "test_report")
    assert "| cascade_served |" in meta["validator"].value
    assert "| stage1_served |" in meta["validator"].value
    assert "| single_view_0.5 |" in meta["validator"].value


def test_validator_rows_score_a_perfect_answer_one(materialized_root):
    """Perfect-label sanity through the same sampling and decoding: an oracle that answers
    each validator image with its true label earns reward 1 and MCC 1 at every level."""
    import pandas as pd

    from roadwork_assets.core.evaluation.validator_rows import sample_by_group, simulate_rows

    root, _, _ = materialized_root
    m = pd.read_parquet(ArtifactRegistry(root).split_manifest("val_test"))
    keep = sample_by_group(m["group_key"].astype(str).tolist(), 30, seed=3)
    truth = m["label"].to_numpy()[keep]
    seen = []

    def oracle(images):  # the simulator asks image by image, level by level, in order
        start = sum(seen) % truth.size
        seen.append(len(images))
        return truth[start:start + len(images)].astype(float)

    sim = simulate_rows(m["uri"].tolist(), m["item_id"].tolist(), m["label"].to_numpy(),
                        m["group_key"].astype(str).tolist(), {"oracle": ("truth", oracle)},
                        max_images=30, seed=3, n_windows=500)
    assert 0 < sim.n_images <= 30 and sum(seen) == 4 * sim.n_images
    row = sim.row("oracle")
    assert row.reward.mean == 1.0 and row.reward.expected == pytest.approx(1.0)
    assert all(lv.mcc == 1.0 and lv.accuracy == 1.0 for lv in row.per_level)
