"""Materialize the whole graph, stage by stage, through Dagster.

Split-partitioned and unpartitioned assets cannot share one run (a run targets one
partition), so the graph is run in stages derived from the asset graph itself
(``stages``): its topological levels, consecutive levels of the same kind merged into
one stage; a split-partitioned stage runs once per split, a split x shard stage
(``embeddings``, ROADWORK_EMBEDDING_SHARDS) once per shard of each split: independent
runs, which the UI's backfills and a multiprocess or k8s executor can spread. Every stage is a real Dagster run
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
from roadwork_assets.contracts.splits import SPLITS, shard_key
from roadwork_assets.core.artifacts import pid_alive
from roadwork_assets.defs.freshness import OPTIONAL_TAG, FreshnessJudge
from roadwork_assets.defs.partitions import shard_count

STAGE_TAG, PID_TAG, HOST_TAG = "roadwork/stage", "roadwork/pid", "roadwork/host"


class BlockingCheckFailed(RoadworkError):
    """A blocking asset check failed, so its asset's downstream did not run."""


KIND_UNPARTITIONED, KIND_SPLIT, KIND_SHARD = "unpartitioned", "split", "split x shard"
_KIND_ORDER = (KIND_UNPARTITIONED, KIND_SPLIT, KIND_SHARD)


@dataclass(frozen=True)
class Stage:
    assets: tuple[str, ...]
    kind: str = KIND_UNPARTITIONED  # how its assets are partitioned: one run per partition

    @property
    def partitioned(self) -> bool:
        return self.kind != KIND_UNPARTITIONED


def partition_kind(node) -> str:
    """KIND_UNPARTITIONED, KIND_SPLIT or KIND_SHARD (split x shard: ``embeddings``)."""
    if node.partitions_def is None:
        return KIND_UNPARTITIONED
    return KIND_SHARD if shard_count(node.partitions_def) is not None else KIND_SPLIT


def stages(defs: dg.Definitions) -> tuple[Stage, ...]:
    """The graph's topological levels, consecutive levels of one kind (unpartitioned,
    per split, per split x shard) merged: every asset runs after its parents, and each
    stage is one run (per partition). Within a level, assets keep their order in the
    Definitions."""
    graph = defs.resolve_asset_graph()
    order = {key: i for i, key in enumerate(
        key for assets_def in defs.assets or [] for key in assets_def.keys)}
    out: list[Stage] = []
    for level in graph.toposorted_asset_keys_by_level:
        # optional assets (tag roadwork/optional: bundle_int8) are materialized on request only
        keys = sorted((k for k in level if graph.get(k).is_materializable
                       and graph.get(k).tags.get(OPTIONAL_TAG) != "true"),
                      key=lambda k: (order.get(k, len(order)), k.to_user_string()))
        # the kind of the stage before first: it may extend it
        kinds = sorted(_KIND_ORDER, key=lambda kind: not out or out[-1].kind != kind)
        for kind in kinds:
            names = tuple(k.to_user_string() for k in keys if partition_kind(graph.get(k)) == kind)
            if not names:
                continue
            if out and out[-1].kind == kind:
                out[-1] = Stage(out[-1].assets + names, kind)
            else:
                out.append(Stage(names, kind))
    return tuple(out)


def stage_partitions(defs: dg.Definitions, stage: Stage,
                     splits: Sequence[str] = SPLITS) -> list[str | None]:
    """The partitions a stage runs once each, in order: [None] unpartitioned; the splits;
    or every shard key of each split ("0|train", "1|train", ..., then the next split)."""
    if stage.kind == KIND_UNPARTITIONED:
        return [None]
    if stage.kind == KIND_SPLIT:
        return list(splits)
    n = shard_count(defs.resolve_asset_graph().get(dg.AssetKey(stage.assets[0])).partitions_def)
    return [shard_key(split, k) for split in splits for k in range(n or 1)]


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
    an up-to-date asset that reads one rebuilt in its stage is judged again after that
    run (``next_batch``), so it runs only if its input's content changed."""
    job = defs.resolve_implicit_global_asset_job_def()
    graph = defs.resolve_asset_graph()
    plan = stages(defs)
    results = []
    for n, stage in enumerate(plan, start=1):
        for partition in stage_partitions(defs, stage, splits):
            label = f" [{partition}]" if partition else ""
            pending, ran = list(stage.assets), False
            while pending:
                names, pending = next_batch(pending, partition, graph, judge, say)
                if not names:
                    break
                say(f"[roadwork] stage {n}/{len(plan)}: {', '.join(names)}{label}")
                t0 = time.perf_counter()
                result = run_stage(job, instance, [dg.AssetKey(x) for x in names], partition,
                                   run_config, tags={STAGE_TAG: str(n),
                                                     PID_TAG: str(os.getpid()),
                                                     HOST_TAG: socket.gethostname()})
                say(f"[roadwork]   done in {time.perf_counter() - t0:.1f}s "
                    f"(run {result.run_id})")
                results.append(result)
                ran = True
                if judge is not None:
                    judge.refresh()
            if not ran:
                say(f"[roadwork] stage {n}/{len(plan)}: {', '.join(stage.assets)}{label}: "
                    "up to date, skipped")
    return results


def next_batch(pending: list[str], partition: str | None, graph, judge: FreshnessJudge | None,
               say: Callable[[str], None]) -> tuple[list[str], list[str]]:
    """(the assets of ``pending`` to run now, those to judge again after that run).

    Without a judge: all of them, in one run. With one: those it finds out of date run;
    one that is up to date but reads an asset of this batch (or a deferred one) waits
    for the run, since its input may change; the rest are skipped. ``pending`` is in
    stage order (topological), and each rebuild reason and each skip is said."""
    if judge is None:
        return list(pending), []
    batch: list[str] = []
    deferred: list[str] = []
    skipped: list[str] = []
    for name in pending:
        key = dg.AssetKey(name)
        reason = judge.why_rebuild(key, partition)
        parents = {p.to_user_string() for p in graph.get(key).parent_keys}
        if reason is not None:
            batch.append(name)
            say(f"[roadwork]   rebuild {name}{f'[{partition}]' if partition else ''}: {reason}")
        elif parents & set(batch + deferred):
            deferred.append(name)
        else:
            skipped.append(name)
    if skipped and batch:
        say(f"[roadwork]   up to date, skipped: {', '.join(skipped)}")
    return batch, deferred


def dagster_commands(defs: dg.Definitions, *, module: str = "roadwork_assets.definitions",
                     splits: Sequence[str] = SPLITS, extra: Sequence[str] = ()) -> list[list[str]]:
    """The `dagster asset materialize` commands that materialize the whole graph, in
    order: one per stage, once per partition of a partitioned stage (split, or split x
    shard: `--partition 0|train`) — the runs `roadwork run --force` makes. (`--select
    '*'` cannot work: one Dagster run holds one partition, and the graph mixes
    split-partitioned, sharded and unpartitioned assets.)"""
    out = []
    for stage in stages(defs):
        for partition in stage_partitions(defs, stage, splits):
            cmd = ["dagster", "asset", "materialize", "-m", module,
                   "--select", ",".join(stage.assets)]
            out.append(cmd + (["--partition", partition] if partition else []) + list(extra))
    return out


def unmaterialized(defs: dg.Definitions, instance: dg.DagsterInstance,
                   splits: Sequence[str] = SPLITS) -> list[str]:
    """Every asset (partition) of the stages (the graph less optional assets) that has no
    materialization on ``instance``, as ``asset``, ``asset[split]`` or
    ``asset[shard|split]``; [] when all have."""
    out = []
    for stage in stages(defs):
        for key in map(dg.AssetKey, stage.assets):
            if stage.partitioned:
                done = instance.get_materialized_partitions(key)
                out += [f"{key.to_user_string()}[{p}]"
                        for p in stage_partitions(defs, stage, splits) if p not in done]
            elif instance.get_latest_materialization_event(key) is None:
                out.append(key.to_user_string())
    return sorted(out)


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
