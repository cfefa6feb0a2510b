"""The retrain job: the whole asset graph, stage by stage, as `roadwork run` builds it.

Why an op job and not an asset job. The graph is split-partitioned (train, val_select,
val_calib, val_test) with unpartitioned assets that fan in several partitions
(checkpoint reads train + val_select). In Dagster 1.13 one run targets at most one
partition, so no single asset-job run can rebuild the graph; a ``RunRequest`` with a
partition key rebuilds one split only. An asset backfill can span it, but only a sensor
can request one (``RunRequest.for_asset_graph_subset``, marked private), a schedule
cannot, and the backfill daemon's path measured about 2x slower than the staged runner
(issue 13: 504 s against 238 s). So the trigger (schedule, new-data sensor, drift sensor)
launches this one-op job, and its op runs ``defs.runner.materialize_all``: each stage is
its own run on the same instance, visible in the UI with its checks, exactly as
`roadwork run` makes them. The op holds the ROADWORK_HOME lock, so a retrain and a
terminal `roadwork run` never write the same artifacts at once (it waits for the other).
"""

from collections.abc import Callable
from pathlib import Path

import dagster as dg

from roadwork_assets.core.runlock import hold_lock
from roadwork_assets.defs.runner import materialize_all

RETRAIN_JOB = "retrain"
TRIGGER_TAG = "roadwork/trigger"
ACTIVE_STATUSES = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED,
                   dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED]


def build_retrain_job(graph: Callable[[], dg.Definitions]) -> dg.JobDefinition:
    """``graph`` returns the asset Definitions to materialize (called at run time, in
    the run's process)."""

    @dg.op(name="materialize_graph",
           description="every asset of the graph, stage by stage (defs.runner.materialize_all)")
    def materialize_graph(context: dg.OpExecutionContext) -> list[str]:
        defs = graph()
        root = Path(defs.resources["artifacts"].root)
        root.mkdir(parents=True, exist_ok=True)
        with hold_lock(root, wait=True, command=f"dagster job {RETRAIN_JOB}",
                       say=context.log.info):
            runs = materialize_all(defs, context.instance, say=context.log.info)
        context.log.info(f"retrained: {len(runs)} stage runs")
        return [r.run_id for r in runs]

    @dg.job(name=RETRAIN_JOB, tags={TRIGGER_TAG: "manual"},
            description="Rebuild the whole graph (every split partition, then the model, "
            "policies, bundle, test_report and drift), stage by stage as `roadwork run` "
            "does; launched by the weekly schedule, the new-data sensor and the drift sensor.")
    def retrain():
        materialize_graph()

    return retrain


def active_retrain(instance: dg.DagsterInstance) -> str | None:
    """The id of a retrain run queued or in progress, if any."""
    runs = instance.get_runs(filters=dg.RunsFilter(job_name=RETRAIN_JOB,
                                                   statuses=ACTIVE_STATUSES), limit=1)
    return runs[0].run_id if runs else None
