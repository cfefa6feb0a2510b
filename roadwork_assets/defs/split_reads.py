"""Run-level leakage check shared by every asset: what did this step actually read?"""

from __future__ import annotations

import dagster as dg

from roadwork_assets.contracts.splits import forbidden_reads, rule_for
from roadwork_assets.defs.io_manager import drain_reads

SPLIT_READS_CHECK = "split_reads_allowed"


def split_reads_check_spec(asset_name: str) -> dg.AssetCheckSpec:
    rule = rule_for(asset_name)
    return dg.AssetCheckSpec(
        SPLIT_READS_CHECK,
        asset=asset_name,
        blocking=True,
        description=f"split partitions actually read obey the policy ({rule.role}: "
        f"may read {sorted(rule.may_read) or 'no split partition'})",
    )


def split_reads_result(
    context: dg.AssetExecutionContext,
) -> tuple[dict[str, object], dg.AssetCheckResult]:
    """Drain this step's reads; return metadata for the asset and the check result."""
    asset_name = context.asset_key.path[-1]
    own_partition = context.partition_key if context.has_partition_key else None
    step_key = context.op_execution_context.get_step_execution_context().step.key
    reads = drain_reads(step_key)
    split_reads = sorted({part for _, part in reads})
    bad = forbidden_reads(asset_name, split_reads, own_partition)
    detail = sorted({f"{asset}[{part}]" for asset, part in reads})
    metadata = {"splits_read": dg.MetadataValue.json(split_reads),
                "partitions_read": dg.MetadataValue.json(detail)}
    check = dg.AssetCheckResult(
        check_name=SPLIT_READS_CHECK,
        asset_key=asset_name,
        passed=not bad,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={
            "splits_read": dg.MetadataValue.json(split_reads),
            "forbidden": dg.MetadataValue.json(bad),
            "allowed": dg.MetadataValue.json(sorted(rule_for(asset_name).may_read)),
        },
        description=(f"{asset_name} read forbidden split partition(s) {bad}" if bad
                     else "only allowed split partitions were read"),
    )
    return metadata, check
