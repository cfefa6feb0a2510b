"""defs.tracking on a real MLflow SQLite store and real Dagster materializations (small
assets, seconds): run names with the partition, FAILED runs, artifacts under the root
(never ./mlruns of the cwd), an old experiment renamed aside, one model version per
bundle id, and the number flattening the metrics come from."""

import math
from pathlib import Path

import dagster as dg
import pytest

from roadwork_assets.core.artifacts import ArtifactRegistry
from roadwork_assets.defs.tracking import (
    MlflowTracking,
    TrackedRun,
    flatten_numbers,
    run_name,
)

parts = dg.StaticPartitionsDefinition(["train", "val_calib"])


@dg.asset(partitions_def=parts)
def tiny(context: dg.AssetExecutionContext, mlflow: MlflowTracking) -> dg.MaterializeResult:
    note = Path(mlflow.artifact_root).parent / "note.txt"
    note.parent.mkdir(parents=True, exist_ok=True)
    note.write_text(context.partition_key)
    with mlflow.run(context) as run:
        run.log(params={"alpha": 0.1}, metrics={f"{context.partition_key}.n": 3.0})
        run.log_artifact(note, "notes")
    return dg.MaterializeResult(metadata={"mlflow_run_id": run.run_id})


@dg.asset
def broken(context: dg.AssetExecutionContext, mlflow: MlflowTracking) -> None:
    with mlflow.run(context):
        raise ValueError("the asset body failed")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module (creating one runs MLflow's migrations, seconds);
    each test uses its own experiment / registered model name."""
    return tmp_path_factory.mktemp("home")


def _tracking(root, name: str) -> MlflowTracking:
    reg = ArtifactRegistry(root)
    return MlflowTracking(tracking_uri=reg.mlflow_tracking_uri, experiment_name=name,
                          artifact_root=str(reg.mlflow_artifact_root),
                          registered_model=f"bundles_{name}")


def test_partitioned_run_is_named_with_its_partition_and_artifacts_stay_under_root(
        store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow's default would put ./mlruns here
    tracking = _tracking(store, "partitioned")
    result = dg.materialize([tiny], partition_key="val_calib", resources={"mlflow": tracking})
    run_id = result.asset_materializations_for_node("tiny")[0].metadata["mlflow_run_id"].value
    client = tracking.client()
    run = client.get_run(run_id)
    assert run.info.run_name == "tiny[val_calib]"
    assert run.info.status == "FINISHED"
    assert run.data.tags["dagster.partition"] == "val_calib"
    assert run.data.tags["dagster_run_id"] == result.run_id
    assert run.data.metrics == {"val_calib.n": 3.0} and run.data.params == {"alpha": "0.1"}
    stored = store / "mlflow" / "artifacts" / run_id / "artifacts" / "notes"
    assert (stored / "note.txt").read_text() == "val_calib"
    assert list(tmp_path.iterdir()) == []


def test_a_failing_asset_leaves_a_failed_run(store):
    tracking = _tracking(store, "failing")
    result = dg.materialize([broken], resources={"mlflow": tracking}, raise_on_error=False)
    assert not result.success
    runs = tracking.client().search_runs(
        [tracking.client().get_experiment_by_name("failing").experiment_id])
    assert [(r.info.run_name, r.info.status) for r in runs] == [("broken", "FAILED")]


def test_an_experiment_with_artifacts_elsewhere_is_renamed_aside_with_its_runs(store, tmp_path):
    tracking = _tracking(store, "t")
    client = tracking.client()
    old = client.create_experiment("t", artifact_location=(tmp_path / "mlruns").as_uri())
    old_run = client.create_run(old).info.run_id
    new = tracking.experiment_id(client)
    assert new != old
    assert client.get_experiment(new).artifact_location == tracking.artifact_location()
    assert client.get_experiment(new).name == "t"
    assert client.get_experiment(old).name.startswith("t (before")
    assert client.get_run(old_run).info.experiment_id == old  # history kept
    assert tracking.experiment_id(client) == new  # settled: no second rename


def test_an_experiment_another_home_created_is_shared_not_renamed(store, tmp_path):
    other = tmp_path / "other_home" / "mlflow" / "artifacts"
    client = _tracking(store, "shared").client()
    made = client.create_experiment("shared", artifact_location=other.as_uri())
    assert _tracking(store, "shared").experiment_id(client) == made
    assert client.get_experiment(made).name == "shared"


def test_a_server_uri_keeps_the_servers_artifact_store():
    assert MlflowTracking(tracking_uri="http://mlflow:5000",
                          artifact_root="/x").artifact_location() is None


def test_one_model_version_per_bundle_id(store, tmp_path):
    tracking = _tracking(store, "registry")
    client = tracking.client()
    exp = tracking.experiment_id(client)
    folder = tmp_path / "bundle_a"
    folder.mkdir()
    (folder / "manifest.json").write_text("{}")

    def register(bundle_id: str) -> str:
        run = TrackedRun(client, client.create_run(exp).info.run_id)
        return tracking.register_bundle(run, folder, bundle_id, tags={"alpha": 0.05},
                                        description=f"bundle {bundle_id}")

    assert register("aaa") == "1"
    assert register("aaa") == "1"  # the same bundle again: no second version
    assert register("bbb") == "2"
    assert tracking.tag_bundle_version("bbb", {"val_test.mcc": 0.5}) == "2"
    assert tracking.tag_bundle_version("never_built", {"x": 1}) is None
    model = tracking.registered_model
    (v2,) = client.search_model_versions(f"name = '{model}' and tags.bundle_id = 'bbb'")
    assert v2.tags == {"bundle_id": "bbb", "alpha": "0.05", "val_test.mcc": "0.5"}
    assert len(client.search_model_versions(f"name = '{model}'")) == 2


def test_flatten_numbers_names_values_rows_and_drops_the_rest():
    record = {"mcc": 0.25, "fnr": {"value": 0.1, "ci_high": 0.3, "method": "exact"},
              "auroc": None, "ece": math.nan, "met": True,
              "comparison": [{"name": "cascade_served", "mcc": 0.2}, {"mcc": 9.0}],
              "scores": [0.1, 0.2], "provenance": {"n": 1}}
    assert flatten_numbers(record, "val_test", skip=("provenance",)) == {
        "val_test.mcc": 0.25, "val_test.fnr": 0.1, "val_test.fnr.ci_high": 0.3,
        "val_test.met": 1.0, "val_test.comparison.cascade_served.mcc": 0.2}


@dg.asset(name="bundle")
def bundle_like(context: dg.AssetExecutionContext, mlflow: MlflowTracking) -> dg.MaterializeResult:
    with mlflow.run(context, name=run_name(context, "abc")) as run:
        pass
    return dg.MaterializeResult(metadata={"mlflow_run_id": run.run_id})


def test_run_name_with_a_bundle_id(store):
    tracking = _tracking(store, "named")
    result = dg.materialize([bundle_like], resources={"mlflow": tracking})
    run_id = result.asset_materializations_for_node("bundle")[0].metadata["mlflow_run_id"].value
    assert tracking.client().get_run(run_id).info.run_name == "bundle:abc"


def test_keys_from_the_data_are_made_valid_not_fatal(store):
    tracking = _tracking(store, "keys")
    client = tracking.client()
    run = TrackedRun(client, client.create_run(tracking.experiment_id(client)).info.run_id)
    run.log(metrics={"val_test.per_source.cam:3/a b.mcc": 0.5, "..hidden": 1.0},
            params={"source/name": "x"})
    data = client.get_run(run.run_id).data
    assert data.metrics == {"val_test.per_source.cam_3_a b.mcc": 0.5, "hidden": 1.0}
    assert data.params == {"source_name": "x"}
