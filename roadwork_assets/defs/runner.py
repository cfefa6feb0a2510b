"""Materialize the whole graph, stage by stage, through Dagster.

Split-partitioned and unpartitioned assets cannot share one run (a run targets one
partition), so the graph is run in stages derived from the asset graph itself
(``stages``): its topological levels, consecutive levels of the same kind merged into
one stage; a partitioned stage runs once per split. Every stage is a real Dagster run
on the given instance, visible in the UI with its logs, metadata and check results.

A failed blocking asset check stops the run; it is raised as ``BlockingCheckFailed``, a
one-line ``RoadworkError`` naming each failed check and its own description (the
measured gap and the tolerance), not as Dagster's traceback.

Given a ``FreshnessJudge`` (``defs.freshness``), asset partitions that are up to date are
skipped: `roadwork run` rebuilds only what changed, `roadwork run --force` everything.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import dagster as dg

from roadwork_assets.contracts.errors import RoadworkError
from roadwork_assets.contracts.splits import SPLITS
from roadwork_assets.core.artifacts import pid_alive
from roadwork_assets.defs.freshness import FreshnessJudge

STAGE_TAG, PID_TAG, HOST_TAG = "roadwork/stage", "roadwork/pid", "roadwork/host"


class BlockingCheckFailed(RoadworkError):
    """A blocking asset check failed, so its asset's downstream did not run."""


@dataclass(frozen=True)
class Stage:
    assets: tuple[str, ...]
    partitioned: bool


def stages(defs: dg.Definitions) -> tuple[Stage, ...]:
    """The graph's topological levels, consecutive levels of one kind (partitioned or
    not) merged: every asset runs after its parents, and each stage is one run (per
    partition). Within a level, assets keep their order in the Definitions."""
    graph = defs.resolve_asset_graph()
    order = {key: i for i, key in enumerate(
        key for assets_def in defs.assets or [] for key in assets_def.keys)}
    out: list[Stage] = []
    for level in graph.toposorted_asset_keys_by_level:
        # optional assets (tag roadwork/optional: bundle_int8) are materialized on request only
        keys = sorted((k for k in level if graph.get(k).is_materializable
                       and graph.get(k).tags.get("roadwork/optional") != "true"),
                      key=lambda k: (order.get(k, len(order)), k.to_user_string()))
        kinds = [False, True] if not out or not out[-1].partitioned else [True, False]
        for partitioned in kinds:  # the kind of the stage before first: it may extend it
            names = tuple(k.to_user_string() for k in keys
                          if graph.get(k).is_partitioned == partitioned)
            if not names:
                continue
            if out and out[-1].partitioned == partitioned:
                out[-1] = Stage(out[-1].assets + names, partitioned)
            else:
                out.append(Stage(names, partitioned))
    return tuple(out)


def materialize_all(
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    *,
    run_config: dict | None = None,
    say: Callable[[str], None] = print,
    splits: Sequence[str] = SPLITS,
    judge: FreshnessJudge | None = None,
) -> list[dg.ExecuteInProcessResult]:
    """Run every stage; raise on the first failed run (a failed blocking check included).

    With a ``judge``, asset partitions it finds up to date are skipped (and said so);
    within a stage, whatever is downstream of a rebuilt asset is rebuilt too."""
    job = defs.resolve_implicit_global_asset_job_def()
    graph = defs.resolve_asset_graph()
    plan = stages(defs)
    results = []
    for n, stage in enumerate(plan, start=1):
        for partition in (splits if stage.partitioned else [None]):
            label = f" [{partition}]" if partition else ""
            names = stage_selection(stage, partition, graph, judge, say)
            if not names:
                say(f"[roadwork] stage {n}/{len(plan)}: {', '.join(stage.assets)}{label}: "
                    "up to date, skipped")
                continue
            say(f"[roadwork] stage {n}/{len(plan)}: {', '.join(names)}{label}")
            t0 = time.perf_counter()
            result = run_stage(job, instance, [dg.AssetKey(x) for x in names], partition,
                               run_config, tags={STAGE_TAG: str(n), PID_TAG: str(os.getpid()),
                                                 HOST_TAG: socket.gethostname()})
            say(f"[roadwork]   done in {time.perf_counter() - t0:.1f}s (run {result.run_id})")
            results.append(result)
            if judge is not None:
                judge.refresh()
    return results


def stage_selection(stage: Stage, partition: str | None, graph, judge: FreshnessJudge | None,
                    say: Callable[[str], None]) -> list[str]:
    """The stage's assets to run for ``partition``: all without a judge; else those the
    judge finds out of date and whatever in the stage depends on them (in stage order,
    which is topological), saying why each runs and which are skipped."""
    if judge is None:
        return list(stage.assets)
    chosen: list[str] = []
    skipped: list[str] = []
    for name in stage.assets:
        key = dg.AssetKey(name)
        parents = {p.to_user_string() for p in graph.get(key).parent_keys}
        rebuilt_parent = sorted(parents & set(chosen))
        reason = (f"its input {rebuilt_parent[0]} is rebuilt in this stage" if rebuilt_parent
                  else judge.why_rebuild(key, partition))
        if reason is None:
            skipped.append(name)
        else:
            chosen.append(name)
            say(f"[roadwork]   rebuild {name}{f'[{partition}]' if partition else ''}: {reason}")
    if skipped and chosen:
        say(f"[roadwork]   up to date, skipped: {', '.join(skipped)}")
    return chosen


def run_stage(job: dg.JobDefinition, instance: dg.DagsterInstance, keys: list[dg.AssetKey],
              partition: str | None, run_config: dict | None,
              tags: dict[str, str] | None = None) -> dg.ExecuteInProcessResult:
    """One in-process run; a failed blocking check becomes ``BlockingCheckFailed``."""
    run_id = str(uuid.uuid4())  # known before the run, to read its check results after
    try:
        return job.execute_in_process(
            instance=instance, asset_selection=keys, partition_key=partition,
            run_config=run_config, raise_on_error=True, run_id=run_id, tags=tags,
        )
    except dg.DagsterError:
        failed = failed_blocking_checks(instance, run_id)
        if not failed:
            raise
        raise BlockingCheckFailed("; ".join(failed)) from None


def failed_blocking_checks(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    """'blocking check ASSET:CHECK failed: DESCRIPTION' for each failed blocking check."""
    out = []
    for record in instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION):
        evaluation = record.get_dagster_event().event_specific_data
        if evaluation.passed or not evaluation.blocking:
            continue
        description = " ".join((evaluation.description or "no description").split())
        out.append(f"blocking check {evaluation.asset_key.to_user_string()}:"
                   f"{evaluation.check_name} failed: {description}")
    return out


def fail_abandoned_runs(instance: dg.DagsterInstance) -> list[str]:
    """Mark failed the roadwork stage runs still STARTED whose process is gone (a killed
    `roadwork run`); returns their run ids.

    Only runs this host's roadwork started are judged (their pid tag names a dead
    process, or they predate the tag); a run of `dagster dev` or of another host is left.
    """
    out = []
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED])):
        tags = run.tags
        if STAGE_TAG not in tags:
            continue
        if tags.get(HOST_TAG, socket.gethostname()) != socket.gethostname():
            continue
        pid = tags.get(PID_TAG)
        if pid is not None and pid.isdigit() and int(pid) != os.getpid() and pid_alive(int(pid)):
            continue
        instance.report_run_failed(
            run, message=f"marked failed by the next `roadwork run`: the process that ran it "
            f"(pid {pid or 'unknown'}) is gone")
        out.append(run.run_id)
    return out
