"""Graph-level leakage audit: derive what each asset can read from the asset graph.

For every asset and every split-partitioned parent, the partition mapping tells which
parent partitions each of the asset's own partitions (or the asset as a whole) reads.
Those derived reads must equal the policy table in ``contracts/splits.py`` — not just
fit inside it — so the table and the graph cannot drift apart silently.
"""

from __future__ import annotations

import dagster as dg

from roadwork_assets.contracts.splits import (
    ALL_SPLITS_ASSETS,
    SAME_PARTITION,
    SPLIT_READ_POLICY,
    SPLITS,
)


def derived_split_reads(asset_graph) -> dict[str, dict[str | None, set[str]]]:
    """{asset: {own partition or None: split partitions readable from parents}}.

    A parent in ALL_SPLITS_ASSETS (unpartitioned, but holding every split's images and
    labels) counts as all four partitions.
    """
    out: dict[str, dict[str | None, set[str]]] = {}
    for key in asset_graph.get_all_asset_keys():
        node = asset_graph.get(key)
        own_keys: list[str | None] = (
            list(node.partitions_def.get_partition_keys()) if node.partitions_def else [None]
        )
        reads: dict[str | None, set[str]] = {p: set() for p in own_keys}
        for parent in node.parent_keys:
            if parent.to_user_string() in ALL_SPLITS_ASSETS:
                for own in own_keys:
                    reads[own] |= set(SPLITS)
                continue
            parent_def = asset_graph.get(parent).partitions_def
            if parent_def is None or set(parent_def.get_partition_keys()) != set(SPLITS):
                continue
            for own in own_keys:
                result = asset_graph.get_parent_partition_keys_for_child(own, parent, key)
                reads[own] |= set(result.partitions_subset.get_partition_keys())
        out[key.to_user_string()] = reads
    return out


def audit_split_reads(asset_graph) -> list[str]:
    """Every mismatch between the graph and the policy, as a sentence naming asset and split."""
    problems: list[str] = []
    for asset, by_partition in sorted(derived_split_reads(asset_graph).items()):
        rule = SPLIT_READ_POLICY.get(asset)
        if rule is None:
            problems.append(
                f"asset {asset!r} is not in SPLIT_READ_POLICY (contracts/splits.py): "
                "declare which split partitions it may read"
            )
            continue
        for own, reads in sorted(by_partition.items(), key=lambda kv: str(kv[0])):
            allowed = {own if s == SAME_PARTITION else s for s in rule.may_read} - {None}
            where = f"asset {asset!r}" + (f" partition {own!r}" if own else "")
            for split in sorted(reads - allowed):
                problems.append(
                    f"{where} can read split {split!r}, which its policy forbids "
                    f"({rule.role}: {rule.reason}; allowed: {sorted(allowed) or 'none'})"
                )
            for split in sorted(allowed - reads):
                problems.append(
                    f"{where}: policy allows split {split!r} but the graph never reads it "
                    "(policy table and partition mappings disagree)"
                )
    return problems


def assert_graph_obeys_policy(defs: dg.Definitions) -> None:
    from roadwork_assets.contracts.errors import LeakageError

    problems = audit_split_reads(defs.resolve_asset_graph())
    if problems:
        raise LeakageError("split policy violated by the asset graph:\n  " + "\n  ".join(problems))
