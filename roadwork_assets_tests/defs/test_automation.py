"""Retrain triggers on real files and a real (temporary, persistent) Dagster instance:
the new-data sensor over each source layout, its cursor, the weekly schedule, and the
split-stability rule when the sensor's new data is materialized."""

import json
import os
import uuid

import dagster as dg
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from roadwork_assets.contracts.errors import BadInputError
from roadwork_assets.core.artifacts import ArtifactRegistry
from roadwork_assets.definitions import build_definitions
from roadwork_assets.defs.automation.jobs import RETRAIN_JOB, TRIGGER_TAG
from roadwork_assets.defs.automation.schedules import (
    CRON_ENV,
    DEFAULT_CRON,
    build_retrain_schedule,
)
from roadwork_assets.defs.data.assets import source_images, split_assignment
from roadwork_assets.defs.resources import DatasetSource, ExitPolicyResource
from roadwork_assets_tests.conftest import tiny_resources


def _images(folder, names, seed):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        arr = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / name, quality=90)


def _class_folders(root, n_per_class, start=0, seed=0):
    for k, label in enumerate(("roadwork", "none")):
        _images(root / label, [f"{label}_{i:03d}.jpg" for i in range(start, start + n_per_class)],
                seed + k)
    return root


def _defs(tmp_path, spec):
    res = tiny_resources(tmp_path / "home")
    res["dataset"] = DatasetSource(spec=str(spec) if spec else None)
    res["exit_policy"] = ExitPolicyResource(alpha=0.2)
    return build_definitions(res)


def _tick(defs, instance, cursor, name="new_data"):
    sensor = defs.get_repository_def().get_sensor_def(name)
    # the sensor's resource as the Definitions configure it (build_sensor_context takes
    # resources only from `resources`, not from `definitions`)
    ctx = dg.build_sensor_context(instance=instance, cursor=cursor, definitions=defs,
                                  resources={"dataset": defs.resources["dataset"]})
    return sensor.evaluate_tick(ctx)


@pytest.fixture(scope="module")
def instance():  # one persistent temp instance: creating one costs ~3 s
    with dg.instance_for_test() as inst:
        yield inst


def test_new_files_fire_once_and_the_cursor_advances(tmp_path, instance):
    data = _class_folders(tmp_path / "data", 5)
    defs = _defs(tmp_path, data)
    first = _tick(defs, instance, None)
    assert first.run_requests == [] and "10 files, 10 rows recorded" in first.skip_message
    cursor = json.loads(first.cursor)
    assert cursor["n_files"] == 10 and len(cursor["digest"]) == 64
    assert len(first.cursor) < 300  # a hash plus counts, not a file list

    same = _tick(defs, instance, first.cursor)
    assert same.run_requests == [] and "no new data" in same.skip_message
    assert same.cursor == first.cursor  # nothing to advance

    _images(data / "none", ["late_0.png", "late_1.png"], seed=7)
    (data / "none" / ".hidden.jpg").write_bytes(b"ignored")  # hidden: not data
    fired = _tick(defs, instance, first.cursor)
    (request,) = fired.run_requests
    assert request.job_name == RETRAIN_JOB
    assert request.tags[TRIGGER_TAG] == "new data"
    assert request.tags["roadwork/change"].startswith("+2 files (10 -> 12)")
    assert json.loads(fired.cursor)["n_files"] == 12

    after = _tick(defs, instance, fired.cursor)
    assert after.run_requests == [] and after.cursor == fired.cursor


def test_new_manifest_rows_fire_and_an_identical_rewrite_does_not(tmp_path, instance):
    data = _class_folders(tmp_path / "imgs", 3)
    manifest = tmp_path / "manifest.csv"
    rows = pd.DataFrame({"path": [f"imgs/none/none_{i:03d}.jpg" for i in range(3)],
                         "label": [0, 0, 0]})
    rows.to_csv(manifest, index=False)
    defs = _defs(tmp_path, manifest)
    base = _tick(defs, instance, None).cursor
    rows.to_csv(manifest, index=False)  # rewritten, same content: new mtime, same data
    assert _tick(defs, instance, base).run_requests == []
    more = pd.concat([rows, pd.DataFrame({"path": ["imgs/roadwork/roadwork_000.jpg"],
                                          "label": [1]})])
    more.to_csv(manifest, index=False)
    fired = _tick(defs, instance, base)
    assert len(fired.run_requests) == 1
    assert fired.run_requests[0].tags["roadwork/change"] == "+1 rows (3 -> 4)"
    assert data.exists()


def test_a_new_parquet_file_in_a_natix_folder_fires_with_its_rows(tmp_path, instance):
    folder = tmp_path / "natix"
    folder.mkdir()

    def write(name, n):
        table = pa.table({"image": [{"bytes": b"x" * 10, "path": f"{i}.jpg"} for i in range(n)],
                          "label": [1] * n, "id": [f"{name}-{i}" for i in range(n)],
                          "scene_description": ["s"] * n})
        pq.write_table(table, folder / name)

    write("part-0.parquet", 4)
    defs = _defs(tmp_path, folder)
    base = _tick(defs, instance, None)
    assert "4 rows recorded" in base.skip_message
    write("part-1.parquet", 6)
    fired = _tick(defs, instance, base.cursor)
    assert fired.run_requests[0].tags["roadwork/change"] == "+1 files (1 -> 2), +6 rows (4 -> 10)"


def test_unreadable_or_unset_source_skips_naming_why_and_keeps_the_cursor(tmp_path, instance):
    data = _class_folders(tmp_path / "data", 2)
    defs = _defs(tmp_path, data)
    base = _tick(defs, instance, None).cursor
    data.rename(tmp_path / "moved")
    gone = _tick(defs, instance, base)
    assert gone.run_requests == [] and gone.cursor in (None, base)
    assert f"data source {str(data)!r} does not exist" in gone.skip_message
    unset = _tick(_defs(tmp_path, None), instance, None)
    assert unset.run_requests == [] and "ROADWORK_DATA is not set" in unset.skip_message


def test_a_running_retrain_defers_the_request_and_keeps_the_cursor(tmp_path, instance):
    data = _class_folders(tmp_path / "data", 2)
    defs = _defs(tmp_path, data)
    base = _tick(defs, instance, None).cursor
    _images(data / "roadwork", ["new.jpg"], seed=3)
    run = instance.create_run_for_job(defs.get_job_def(RETRAIN_JOB), run_id=str(uuid.uuid4()),
                                      status=dg.DagsterRunStatus.NOT_STARTED)
    waiting = _tick(defs, instance, base)
    assert waiting.run_requests == [] and run.run_id in waiting.skip_message
    assert waiting.cursor in (None, base)  # not advanced: the change is still pending
    instance.report_run_canceled(run)
    assert len(_tick(defs, instance, base).run_requests) == 1


def test_weekly_schedule_is_stopped_by_default_and_requests_a_retrain(tmp_path, instance):
    defs = _defs(tmp_path, None)
    schedule = defs.get_repository_def().get_schedule_def("weekly_retrain")
    assert schedule.cron_schedule == DEFAULT_CRON
    assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED
    ctx = dg.build_schedule_context(instance=instance,
                                    scheduled_execution_time=pd.Timestamp("2026-11-29T03:00Z"))
    data = schedule.evaluate_tick(ctx)
    (request,) = data.run_requests
    assert request.job_name == RETRAIN_JOB and request.tags[TRIGGER_TAG] == "schedule"
    custom = build_retrain_schedule(defs.get_job_def(RETRAIN_JOB), {CRON_ENV: "30 1 * * 3"})
    assert custom.cron_schedule == "30 1 * * 3"
    with pytest.raises(BadInputError, match=rf"{CRON_ENV}='every sunday' is not a cron"):
        build_retrain_schedule(defs.get_job_def(RETRAIN_JOB), {CRON_ENV: "every sunday"})


def test_new_data_keeps_every_existing_image_in_its_split(tmp_path, instance):
    data = _class_folders(tmp_path / "data", 60)
    defs = _defs(tmp_path, data)
    resources = {k: v for k, v in defs.resources.items()}
    assert dg.materialize([source_images, split_assignment], resources=resources).success
    reg = ArtifactRegistry(tmp_path / "home")
    before = pd.read_parquet(reg.split_assignment).set_index("item_id")["split"]
    base = _tick(defs, instance, None).cursor
    _class_folders(data, 30, start=60, seed=11)  # 60 new images arrive
    assert len(_tick(defs, instance, base).run_requests) == 1
    assert dg.materialize([source_images, split_assignment], resources=resources).success
    after = pd.read_parquet(reg.split_assignment).set_index("item_id")["split"]
    assert len(after) == len(before) + 60
    assert after.loc[before.index].equals(before), "an existing image moved split"
    assert set(after.drop(before.index)) - {"train", "val_select", "val_calib", "val_test"} == set()
    assert os.path.exists(reg.split_assignment)


def test_retrain_job_runs_every_stage_as_its_own_run_on_the_instance(tmp_path, instance):
    """The job's mechanism on a three-asset graph (the full one is the runner's own
    tests' business): one op that runs each stage, and each split, as a run of the
    job's instance, and holds the ROADWORK_HOME lock while it does."""
    from roadwork_assets.core.runlock import LOCK_NAME
    from roadwork_assets.defs.automation.jobs import build_retrain_job
    from roadwork_assets.defs.data.assets import split_manifest

    data = _class_folders(tmp_path / "data", 60)
    resources = dict(_defs(tmp_path, data).resources)
    graph = dg.Definitions(assets=[source_images, split_assignment, split_manifest],
                           resources=resources)
    job = build_retrain_job(lambda: graph)
    result = job.execute_in_process(instance=instance, tags={TRIGGER_TAG: "test"})
    assert result.success
    stage_runs = result.output_for_node("materialize_graph")
    assert len(stage_runs) == 1 + 4  # source_images + split_assignment, then 4 splits
    for run_id in stage_runs:
        assert instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.SUCCESS
    keys = instance.get_materialized_partitions(dg.AssetKey("split_manifest"))
    assert keys == {"train", "val_select", "val_calib", "val_test"}
    assert "dagster job retrain" in (tmp_path / "home" / LOCK_NAME).read_text()


def test_several_sources_are_watched_each_and_a_change_in_the_second_fires(tmp_path, instance):
    first = _class_folders(tmp_path / "city", 3)
    second = _class_folders(tmp_path / "rural", 2, seed=5)
    spec = f"city={first}{os.pathsep}rural={second}"
    defs = _defs(tmp_path, spec)
    look = _tick(defs, instance, None)
    assert look.run_requests == [] and "10 files, 10 rows recorded" in look.skip_message
    assert "city: class folders + rural: class folders" in look.skip_message
    assert _tick(defs, instance, look.cursor).run_requests == []

    _images(second / "roadwork", ["late.png"], seed=9)  # only the second source changes
    fired = _tick(defs, instance, look.cursor)
    (request,) = fired.run_requests
    assert request.tags["roadwork/change"].startswith("+1 files (10 -> 11)")

    gone = _defs(tmp_path, f"city={first}{os.pathsep}rural={tmp_path / 'missing'}")
    skipped = _tick(gone, instance, fired.cursor)
    assert skipped.run_requests == [] and skipped.cursor == fired.cursor
    assert "source 'rural'" in skipped.skip_message and "does not exist" in skipped.skip_message
