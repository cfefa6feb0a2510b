"""MLflow, read back from the SQLite store the tiny full graph (``materialized_root``,
shared with test_full_graph) wrote: one run per logging asset, named after it, its
params, val_calib / val_test metrics and artifacts under ROADWORK_HOME, the bundle as a
registered model version, and every run id in the asset's Dagster metadata."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from roadwork_assets.contracts.policy_schemas import POLICY_ASSET_NAMES
from roadwork_assets.core.artifacts import ArtifactRegistry, file_sha256

LOGGING_ASSETS = ("checkpoint", *POLICY_ASSET_NAMES.values(), "bundle", "test_report")


@pytest.fixture(scope="module")
def tracked(materialized_root):
    import mlflow

    root, _, results = materialized_root
    reg = ArtifactRegistry(root)
    client = mlflow.MlflowClient(tracking_uri=reg.mlflow_tracking_uri,
                                 registry_uri=reg.mlflow_tracking_uri)
    experiment = client.get_experiment_by_name("roadwork_tests")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    metadata = {}
    for result in results:
        for event in result.get_asset_materialization_events():
            meta = event.materialization.metadata
            if "mlflow_run_id" in meta:
                metadata[event.asset_key.to_user_string()] = meta
    return reg, client, experiment, runs, metadata


def _run(runs, asset: str):
    found = [r for r in runs if r.data.tags.get("dagster.asset") == asset]
    assert len(found) == 1, (asset, [r.info.run_name for r in found])
    return found[0]


def test_one_finished_run_per_logging_asset_named_by_asset_and_bundle(tracked):
    reg, _, _, runs, _ = tracked
    bundle_id = reg.latest_bundle().name
    names = sorted(r.info.run_name for r in runs)
    assert names == sorted(["checkpoint", *POLICY_ASSET_NAMES.values(),
                            f"bundle:{bundle_id}", f"test_report:{bundle_id}"])
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert all(r.data.tags["dagster_run_id"] for r in runs)


def test_run_ids_in_asset_metadata_match_the_store(tracked):
    _, _, _, runs, metadata = tracked
    assert set(metadata) == set(LOGGING_ASSETS)
    for asset in LOGGING_ASSETS:
        assert metadata[asset]["mlflow_run_id"].value == _run(runs, asset).info.run_id, asset


def test_policy_runs_log_settings_guarantee_and_val_calib_estimates(tracked, tmp_path):
    reg, client, _, runs, _ = tracked
    for kind, asset in POLICY_ASSET_NAMES.items():
        run = _run(runs, asset)
        published = json.loads(reg.policy(kind).read_text())
        if not published["fitted"]:
            assert run.data.params["fitted"] == "False"
            continue
        assert run.data.params["kind"] == kind
        assert float(run.data.params["alpha"]) == published["alpha"] == 0.05
        assert run.data.params["guarantee"] == published["guarantee"]
        local = client.download_artifacts(run.info.run_id, f"policy/{reg.policy(kind).name}",
                                          dst_path=str(tmp_path))
        assert json.loads(Path(local).read_text()) == published
    softmax = _run(runs, POLICY_ASSET_NAMES["softmax"])
    sm = json.loads(reg.policy("softmax").read_text())
    assert float(softmax.data.params["delta"]) == sm["delta"]
    assert softmax.data.metrics["val_calib.t_lo"] == pytest.approx(sm["t_lo"])
    assert softmax.data.metrics["val_calib.threshold_part.fnr"] == pytest.approx(
        sm["threshold_part"]["fnr"])
    cascade = _run(runs, POLICY_ASSET_NAMES["cascade"])
    cp = json.loads(reg.policy("cascade").read_text())
    assert cascade.data.metrics["val_calib.crc_bound"] == pytest.approx(cp["crc_bound"])
    assert cascade.data.metrics["val_calib.routing_rate"] == pytest.approx(cp["routing_rate"])
    plots = {a.path for a in client.list_artifacts(cascade.info.run_id, "plots")}
    assert plots == {"plots/cascade_frontier.png", "plots/cascade_alpha_frontier.png"}


def test_test_report_logs_val_test_metrics_and_its_files(tracked):
    reg, client, _, runs, _ = tracked
    report = json.loads(reg.test_report.read_text())
    run = _run(runs, "test_report")
    m = run.data.metrics
    assert m["val_test.mcc"] == pytest.approx(report["mcc"])
    assert m["val_test.fnr"] == pytest.approx(report["fnr"]["value"])
    assert m["val_test.fnr.ci_high"] == pytest.approx(report["fnr"]["ci_high"])
    assert m["val_test.fpr"] == pytest.approx(report["fpr"]["value"])
    assert m["val_test.balanced_accuracy"] == pytest.approx(report["balanced_accuracy"])
    row = next(r for r in report["comparison"] if r["name"] == "cascade_served")
    assert m["val_test.comparison.cascade_served.mcc"] == pytest.approx(row["mcc"])
    assert not any(k.startswith("val_calib") for k in m)  # test_report reads val_test only
    assert run.data.params["policy_kind"] == report["policy_kind"] == "cascade"
    files = {a.path for a in client.list_artifacts(run.info.run_id, "report")}
    files |= {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert files == {"report/report.json", "plots/reliability.png"}


def test_artifacts_live_under_roadwork_home(tracked):
    reg, _, experiment, runs, _ = tracked
    home = reg.mlflow_artifact_root.resolve().as_uri()
    assert experiment.artifact_location == home
    for run in runs:
        assert run.info.artifact_uri.startswith(home + "/"), run.info.run_name
    assert any((reg.mlflow_artifact_root).rglob("report.json"))


def test_bundle_is_a_registered_model_version_with_policy_metrics_and_ids(tracked):
    reg, client, _, runs, _ = tracked
    directory = reg.latest_bundle()
    versions = client.search_model_versions(
        f"name = 'roadwork_bundle' and tags.bundle_id = '{directory.name}'")
    assert len(versions) == 1
    v = versions[0]
    bundle_run = _run(runs, "bundle")
    assert v.run_id == bundle_run.info.run_id
    assert v.tags["manifest_sha256"] == file_sha256(directory / "manifest.json")
    assert bundle_run.data.tags["roadwork.manifest_sha256"] == v.tags["manifest_sha256"]
    assert v.tags["policy_kind"] == "cascade" and float(v.tags["alpha"]) == 0.05
    assert v.tags["guarantee"] == "crc_expectation"
    policy = json.loads((directory / "policy.json").read_text())
    assert float(v.tags["val_calib.crc_bound"]) == pytest.approx(policy["crc_bound"])
    report = json.loads(reg.test_report.read_text())
    assert float(v.tags["val_test.mcc"]) == pytest.approx(report["mcc"])
    assert float(v.tags["val_test.fnr"]) == pytest.approx(report["fnr"]["value"])
    assert v.tags["test_report_run_id"] == _run(runs, "test_report").info.run_id
    assert directory.name in v.description and "alpha 0.05" in v.description
    logged = {a.path.rsplit("/", 1)[-1]
              for a in client.list_artifacts(bundle_run.info.run_id, "bundle")}
    assert logged == {p.name for p in directory.iterdir()}
    assert v.source == f"{bundle_run.info.artifact_uri}/bundle"
