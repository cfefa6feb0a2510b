"""Sensors that request the retrain job: new data under ROADWORK_DATA, and drift.

new_data: each tick takes a snapshot of the dataset resource's source
(``core.data.watch``: layout, file and row counts, a sha256 over the listing) and keeps
it as the cursor (a hash plus counts, ~200 bytes). The first tick only records it. A
later tick whose snapshot differs (files or rows added, removed or rewritten) requests
one retrain and advances the cursor; an unchanged source skips. While a retrain is
queued or running the cursor is left where it is, so the change is still seen after it.
Existing images keep their split when data is added (``core.data.splits``: a split is a
function of the group key and seed only).

drift: an asset sensor on ``drift``: its cursor is the materialization it last looked
at (Dagster keeps it), each new one is read once. A verdict ``drift`` requests a
retrain keyed by the incoming images and the training data: Dagster runs a run key
once, so a retrain that leaves both unchanged (and so the same drift) is not requested
again, which would loop; new incoming images or new training data re-arm it.
"""

import os

import dagster as dg

from roadwork_assets.contracts.errors import BadInputError
from roadwork_assets.core.data.watch import SourceSnapshot, snapshot_sources
from roadwork_assets.defs.automation.jobs import RETRAIN_JOB, TRIGGER_TAG, active_retrain
from roadwork_assets.defs.evaluation.drift_asset import VERDICT_KEY
from roadwork_assets.defs.resources import DatasetSource

INTERVAL_ENV = "ROADWORK_NEW_DATA_INTERVAL"
NEW_DATA_SENSOR, DRIFT_SENSOR = "new_data", "drift_retrain"
DRIFTED = "drift"


def _interval() -> int:
    raw = os.environ.get(INTERVAL_ENV) or "60"
    if not raw.isdigit() or int(raw) < 1:
        raise BadInputError(f"{INTERVAL_ENV}={raw!r} must be a whole number of seconds >= 1")
    return int(raw)


def build_new_data_sensor(job: dg.JobDefinition) -> dg.SensorDefinition:
    @dg.sensor(name=NEW_DATA_SENSOR, job=job, minimum_interval_seconds=_interval(),
               default_status=dg.DefaultSensorStatus.STOPPED,
               description="Requests a retrain when the dataset source (ROADWORK_DATA) "
               "gains or changes files or rows; the cursor is a hash plus counts.")
    def new_data(context: dg.SensorEvaluationContext, dataset: DatasetSource):
        if not dataset.spec:
            return dg.SkipReason("ROADWORK_DATA is not set: the generated default dataset "
                                 "never changes, nothing to watch")
        try:
            now = snapshot_sources(dataset.spec)
        except BadInputError as exc:
            return dg.SkipReason(f"cannot read the source, cursor kept: {exc}")
        before = SourceSnapshot.from_cursor(context.cursor)
        if before is None:
            context.update_cursor(now.to_cursor())
            return dg.SkipReason(f"first look at {dataset.spec} ({now.layout}): "
                                 f"{now.n_files} files, {now.n_rows} rows recorded")
        change = now.change_from(before)
        if change is None:
            return dg.SkipReason(f"no new data in {dataset.spec} ({now.n_files} files, "
                                 f"{now.n_rows} rows)")
        busy = active_retrain(context.instance)
        if busy:
            return dg.SkipReason(f"{change}; waiting: retrain run {busy} is queued or running")
        context.update_cursor(now.to_cursor())
        return dg.RunRequest(run_key=f"new-data-{now.digest[:16]}", job_name=RETRAIN_JOB,
                             tags={TRIGGER_TAG: "new data", "roadwork/change": change[:200]})

    return new_data


def _data_digest(dataset: DatasetSource) -> str:
    if not dataset.spec:
        return "generated"
    try:
        return snapshot_sources(dataset.spec).digest[:16]
    except BadInputError:
        return "unreadable"


def build_drift_sensor(job: dg.JobDefinition) -> dg.SensorDefinition:
    @dg.asset_sensor(name=DRIFT_SENSOR, asset_key=dg.AssetKey("drift"), job=job,
                     default_status=dg.DefaultSensorStatus.STOPPED,
                     description="Requests a retrain when a drift materialization's verdict "
                     "is `drift` (once per incoming images and training data).")
    def drift_retrain(context: dg.SensorEvaluationContext, asset_event: dg.EventLogEntry,
                      dataset: DatasetSource):
        mat = asset_event.asset_materialization
        meta = mat.metadata if mat is not None else {}
        verdict = meta[VERDICT_KEY].value if VERDICT_KEY in meta else None
        if verdict != DRIFTED:
            return dg.SkipReason(f"drift materialized by run {asset_event.run_id}: verdict "
                                 f"{verdict!r}, no retrain")
        busy = active_retrain(context.instance)
        if busy:  # it ends by re-materializing drift with the new bundle
            return dg.SkipReason(f"drift seen, but retrain run {busy} is queued or running")
        reasons = meta["reasons"].value if "reasons" in meta else []
        incoming = meta["incoming_version"].value if "incoming_version" in meta else "?"
        return dg.RunRequest(
            run_key=f"drift-{incoming}-{_data_digest(dataset)}", job_name=RETRAIN_JOB,
            tags={TRIGGER_TAG: "drift", "roadwork/drift": "; ".join(reasons)[:200],
                  "roadwork/drift_run": str(asset_event.run_id)})

    return drift_retrain
