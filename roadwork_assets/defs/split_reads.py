"""Run-level leakage check shared by every asset: what did this step actually read, and
what do the things it loaded carry (their taint, from the asset graph)?"""

from __future__ import annotations

import dagster as dg
from dagster_shared.check import CheckError

from roadwork_assets.contracts.splits import forbidden_reads, rule_for
from roadwork_assets.defs.io_manager import drain_reads
from roadwork_assets.defs.leakage_audit import tainted_loads

SPLIT_READS_CHECK = "split_reads_allowed"


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
    taint comes from ancestors that are not in it."""
    try:
        return context.repository_def.asset_graph
    except CheckError:  # execute_in_process / materialize set no repository
        graph = context.job_def.asset_layer.asset_graph
        return getattr(graph, "source_asset_graph", graph)


def split_reads_result(
    context: dg.AssetExecutionContext,
) -> tuple[dict[str, object], dg.AssetCheckResult]:
    """Drain this step's reads; return metadata for the asset and the check result."""
    asset_name = context.asset_key.path[-1]
    own_partition = context.partition_key if context.has_partition_key else None
    step_key = context.op_execution_context.get_step_execution_context().step.key
    reads = drain_reads(step_key)
    split_reads = sorted({part for _, part in reads if part is not None})
    bad = forbidden_reads(asset_name, split_reads, own_partition)
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
