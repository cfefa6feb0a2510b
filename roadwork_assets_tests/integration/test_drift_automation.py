"""The drift asset materialized for real on the tiny graph, against val_test, and the
drift sensor reading its materializations from a persistent Dagster instance.

Incoming folders: "same" = copies of val_calib images (another split of the same
generated distribution: no drift); "night" = the same images darkened to 35% (a camera
at dusk: drift). The bundle, val_test and the images are the session's tiny graph's.
"""

import shutil

import dagster as dg
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from roadwork_assets.core.artifacts import ArtifactRegistry
from roadwork_assets.defs.automation.jobs import RETRAIN_JOB, TRIGGER_TAG
from roadwork_assets.defs.automation.sensors import DRIFT_SENSOR

N_INCOMING = 80


@pytest.fixture(scope="module")
def incoming(materialized_root, tmp_path_factory):
    root, _, _ = materialized_root
    calib = pd.read_parquet(ArtifactRegistry(root).split_manifest("val_calib"))
    # a seeded sample: the manifest's row order is not random (it may follow the label)
    pick = np.random.default_rng(0).choice(len(calib), N_INCOMING, replace=False)
    uris = calib["uri"].astype(str).to_numpy()[np.sort(pick)].tolist()
    base = tmp_path_factory.mktemp("incoming")
    same, night, few = base / "same", base / "night", base / "few"
    for folder in (same, night, few):
        folder.mkdir()
    for i, uri in enumerate(uris):
        src = Image.open(uri).convert("RGB")
        shutil.copy(uri, same / f"{i:04d}{_suffix(uri)}")
        dark = (np.asarray(src, dtype=np.float32) * 0.35).astype(np.uint8)
        Image.fromarray(dark).save(night / f"{i:04d}.png")
    for i, uri in enumerate(uris[:3]):
        shutil.copy(uri, few / f"{i}{_suffix(uri)}")
    (same / "notes.txt").write_text("not an image: ignored")
    return {"same": same, "night": night, "few": few, "n": len(uris)}


def _suffix(uri: str) -> str:
    return "." + uri.rsplit(".", 1)[-1] if "." in uri.rsplit("/", 1)[-1] else ".png"


@pytest.fixture(scope="module")
def instance():
    with dg.instance_for_test() as inst:
        yield inst


def _drift(defs, instance, folder):
    job = defs.resolve_implicit_global_asset_job_def()
    result = job.execute_in_process(
        instance=instance, asset_selection=[dg.AssetKey("drift")], raise_on_error=True,
        run_config={"ops": {"drift": {"config": {"incoming": str(folder)}}}})
    (mat,) = result.asset_materializations_for_node("drift")
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    return mat.metadata, checks


def _tick(defs, instance, cursor):
    sensor = defs.get_repository_def().get_sensor_def(DRIFT_SENSOR)
    ctx = dg.build_sensor_context(instance=instance, cursor=cursor, definitions=defs,
                                  resources={"dataset": defs.resources["dataset"]})
    return sensor.evaluate_tick(ctx)


def test_drift_asset_and_sensor_fire_on_night_images_only(materialized_root, incoming, instance):
    _, defs, _ = materialized_root
    meta, checks = _drift(defs, instance, incoming["same"])
    assert meta["verdict"].value == "no drift", meta["reasons"].value
    assert meta["n_incoming"].value == incoming["n"]
    assert meta["splits_read"].value == ["val_test"]  # the reference, and only it
    assert checks["split_reads_allowed"].passed and checks["no_drift"].passed
    assert meta["score_psi"].value <= meta["score_psi_limit"].value
    assert meta["thresholds"].value["psi_threshold"] == 0.2
    quiet = _tick(defs, instance, None)
    assert quiet.run_requests == [] and "verdict 'no drift'" in quiet.skip_message
    assert quiet.cursor

    meta, checks = _drift(defs, instance, incoming["night"])
    assert meta["verdict"].value == "drift"
    assert meta["promoted"].value  # a finding, not a bad artifact: the report is published
    assert not checks["no_drift"].passed  # a WARN: the run itself succeeded
    assert checks["no_drift"].severity == dg.AssetCheckSeverity.WARN
    # darkness moves the backbone's features far past the limits
    assert meta["embedding_ks_p_value"].value < 1e-6
    assert meta["embedding_psi"].value > meta["embedding_psi_limit"].value
    fired = _tick(defs, instance, quiet.cursor)
    (request,) = fired.run_requests
    assert request.job_name == RETRAIN_JOB and request.tags[TRIGGER_TAG] == "drift"
    assert "embedding" in request.tags["roadwork/drift"]
    assert fired.cursor != quiet.cursor  # advanced to the materialization it read

    assert _tick(defs, instance, fired.cursor).run_requests == []  # nothing new
    # the same drift again (a retrain that changed neither the incoming images nor the
    # data) asks for the same run key: Dagster runs a key once, so retraining cannot loop
    _drift(defs, instance, incoming["night"])
    again = _tick(defs, instance, fired.cursor)
    assert again.run_requests[0].run_key == request.run_key


def test_too_few_incoming_images_is_not_checked_and_does_not_fire(materialized_root, incoming,
                                                                 instance):
    _, defs, _ = materialized_root
    before = _tick(defs, instance, None).cursor  # the latest materialization so far
    meta, checks = _drift(defs, instance, incoming["few"])
    assert meta["verdict"].value == "not checked"
    assert "3 incoming images, fewer than min_images = 20" in meta["why"].value
    assert checks["no_drift"].passed
    assert _tick(defs, instance, before).run_requests == []


def test_a_missing_incoming_folder_fails_naming_it(materialized_root, instance, tmp_path):
    _, defs, _ = materialized_root
    with pytest.raises(Exception, match="incoming folder .*nowhere.* does not exist"):
        _drift(defs, instance, tmp_path / "nowhere")
