"""The one table from asset (partition) to artifact path.

Each asset writes its artifact at ``asset_path(registry, name, partition)`` (staged
beside it, promoted after its checks), and the IO manager loads inputs from the same
place; nothing else maps asset names to registry paths.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from roadwork_assets.contracts.policy_schemas import POLICY_ASSET_NAMES
from roadwork_assets.contracts.splits import SPLITS, parse_shard_key
from roadwork_assets.core.artifacts import ArtifactRegistry

# split-partitioned assets: one file per split partition
PER_SPLIT: dict[str, Callable[[ArtifactRegistry, str], Path]] = {
    "split_manifest": ArtifactRegistry.split_manifest,
    "logits": ArtifactRegistry.logits,
    "multiview_views": ArtifactRegistry.multiview_views,
    "multiview_logits": ArtifactRegistry.multiview_logits,
}
# split x shard assets (defs.partitions.embedding_partitions): one file per shard
PER_SHARD: dict[str, Callable[[ArtifactRegistry, str, int], Path]] = {
    "embeddings": ArtifactRegistry.embedding_shard,
}
# unpartitioned assets: one file each
FIXED: dict[str, Callable[[ArtifactRegistry], Path]] = {
    "source_images": lambda reg: reg.source_table,
    "split_assignment": lambda reg: reg.split_assignment,
    "adapted_backbone": lambda reg: reg.adapted_backbone,
    "checkpoint": lambda reg: reg.checkpoint,
    "multiview_checkpoint": lambda reg: reg.multiview_checkpoint,
    **{name: (lambda reg, kind=kind: reg.policy(kind)) for kind, name in POLICY_ASSET_NAMES.items()},
    "bundle": lambda reg: reg.latest_bundle_pointer,
    "bundle_int8": lambda reg: reg.root / "bundles_int8" / "LATEST",  # optional INT8 copies
    "test_report": lambda reg: reg.test_report,
    "drift": lambda reg: reg.root / "drift" / "report.json",
    "label_queue": lambda reg: reg.root / "label_queue" / "tasks.json",
}


def asset_path(registry: ArtifactRegistry, asset_name: str, partition: str | None = None) -> Path:
    """Where an asset (partition) lives."""
    if asset_name in PER_SHARD:
        split, shard = parse_shard_key(partition) if partition else (None, None)
        if shard is None:
            raise ValueError(f"{asset_name} needs a '<shard>|<split>' partition, got "
                             f"{partition!r}")
        return PER_SHARD[asset_name](registry, split, shard)
    if asset_name in PER_SPLIT:
        if partition not in SPLITS:
            raise ValueError(f"{asset_name} needs a split partition, got {partition!r}")
        return PER_SPLIT[asset_name](registry, partition)
    if asset_name in FIXED:
        return FIXED[asset_name](registry)
    raise KeyError(f"no artifact path registered for asset {asset_name!r}")
