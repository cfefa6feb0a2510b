"""Run-level leakage check shared by every asset: what did this step actually read, and
what do the things it loaded carry (their taint, from the asset graph)?

The read ledger lives here, beside the check that consumes it. The IO manager records
every load into it (``record_read``) — of a split partition or of an unpartitioned
derived asset, through a declared input or any other way (``context.load_asset_value``
goes through the IO manager too); partition None when unpartitioned: its taint, the
splits it carries, is looked up in the asset graph. Each asset drains the ledger at the
end of its body (``split_reads_result``), records the partitions it actually read in
its metadata, and a blocking check compares them — and what they carry — with the split
policy. Steps run one at a time per process (in-process executor) or one per process
(multiprocess / k8s executors), so what a step drains is what that step read.
"""

from __future__ import annotations

import contextlib
import threading

import dagster as dg
from dagster_shared.check import CheckError

from roadwork_assets.contracts.splits import forbidden_reads, rule_for, split_of
from roadwork_assets.defs.leakage_audit import tainted_loads

SPLIT_READS_CHECK = "split_reads_allowed"

_LEDGER_LOCK = threading.Lock()
# (consuming step key or None when unknown, upstream asset name, partition key or None)
_LEDGER: list[tuple[str | None, str, str | None]] = []


def record_read(asset_name: str, partition: str | None, step_key: str | None = None) -> None:
    """Note that ``step_key`` (None: not known) loaded ``asset_name[partition]``."""
    with _LEDGER_LOCK:
        _LEDGER.append((step_key, asset_name, partition))


def drain_reads(step_key: str | None = None) -> list[tuple[str, str | None]]:
    """Return and clear what was read since the last drain in this process.

    Loads made for another step (a step that failed before draining) are dropped, not
    attributed to this one. Loads with no known step (``load_asset_value``) count for
    the draining step: steps run one at a time per process.
    """
    with _LEDGER_LOCK:
        out = [(a, p) for s, a, p in _LEDGER if s is None or step_key is None or s == step_key]
        _LEDGER.clear()
    return out


def split_reads_check_spec(asset_name: str) -> dg.AssetCheckSpec:
    rule = rule_for(asset_name)
    return dg.AssetCheckSpec(
        SPLIT_READS_CHECK,
        asset=asset_name,
        blocking=True,
        description=f"split partitions actually read obey the policy ({rule.role}: "
        f"may read {sorted(rule.may_read) or 'no split partition'}; may never carry "
        f"{sorted(rule.never_carry) or 'no restriction'}, not even through a derived asset)",
    )


def _definitions_graph(context: dg.AssetExecutionContext):
    """The whole code location's asset graph: a run's job sees only its selection, and
    taint comes from ancestors that are not in it.

    Two places hold it: the graph the job was resolved from (``source_asset_graph`` of
    its selection-scoped graph) and the repository's. Neither is always whole:
    execute_in_process / materialize set no repository, and a job reconstructed on its
    own in a step process (multiprocess executor over ``dg.reconstructable(job_fn)``)
    sits in a synthetic repository whose asset graph is empty, which made every load
    "lineage unknown". The larger of the two is the location's graph."""
    graph = context.job_def.asset_layer.asset_graph
    candidates = [getattr(graph, "source_asset_graph", graph)]
    with contextlib.suppress(CheckError):  # execute_in_process sets no repository
        candidates.append(context.repository_def.asset_graph)
    return max(candidates, key=lambda g: len(g.get_all_asset_keys()))


def split_reads_result(
    context: dg.AssetExecutionContext,
) -> tuple[dict[str, object], dg.AssetCheckResult]:
    """Drain this step's reads; return metadata for the asset and the check result."""
    asset_name = context.asset_key.path[-1]
    own_partition = context.partition_key if context.has_partition_key else None
    step_key = context.op_execution_context.get_step_execution_context().step.key
    reads = drain_reads(step_key)
    partitions = {part for _, part in reads if part is not None}
    # rules compare splits: a shard key ("1|train") is judged, and shown, as its split
    split_reads = sorted({split_of(part) for part in partitions})
    bad = forbidden_reads(asset_name, partitions, own_partition)
    carried, tainted = tainted_loads(_definitions_graph(context), asset_name,
                                     own_partition, reads)
    detail = sorted({f"{asset}[{part}]" if part is not None else asset for asset, part in reads})
    metadata = {"splits_read": dg.MetadataValue.json(split_reads),
                "partitions_read": dg.MetadataValue.json(detail),
                "splits_carried": dg.MetadataValue.json(dict(sorted(carried.items())))}
    problems = ([f"{asset_name} read forbidden split partition(s) {bad}"] if bad else []) + tainted
    check = dg.AssetCheckResult(
        check_name=SPLIT_READS_CHECK,
        asset_key=asset_name,
        passed=not problems,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={
            "splits_read": dg.MetadataValue.json(split_reads),
            "forbidden": dg.MetadataValue.json(bad),
            "allowed": dg.MetadataValue.json(sorted(rule_for(asset_name).may_read)),
            "splits_carried": dg.MetadataValue.json(sorted(carried)),
            "never_carry": dg.MetadataValue.json(sorted(rule_for(asset_name).never_carry)),
            "tainted_loads": dg.MetadataValue.json(tainted),
        },
        description=("; ".join(problems) if problems
                     else "only allowed split partitions were read; nothing loaded carries "
                     "a split this asset may never see"),
    )
    return metadata, check
