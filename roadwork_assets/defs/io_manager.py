"""The registry IO manager: loads artifacts by path and records every split read.

Assets write their artifacts themselves, atomically, at the path the asset→path table
(``defs.asset_paths``) gives and return it; this IO manager only checks the path exists
and, on load, reads the same table's path by suffix. Every load is recorded in the
read ledger that the ``split_reads_allowed`` check drains (``defs.split_reads``).

Sharded assets (``embeddings``, split x shard): every shard read is recorded as it is
(``embeddings[1|train]``), and a reader gets one cache per split, its shards merged in
shard order (``core.training.shards``: features stay memory-mapped), as if the split
were one partition; loading one shard by its key (``load_asset_value``) gives that shard.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd

from roadwork_assets.contracts.splits import ALL_SPLITS_ASSETS, SPLITS, parse_shard_key
from roadwork_assets.core.artifacts import (
    ArtifactRegistry,
    read_npz,
    read_parquet_provenance,
)
from roadwork_assets.core.training.checkpoint import load_checkpoint
from roadwork_assets.core.training.shards import merge_shards, open_embedding_shard
from roadwork_assets.defs.asset_paths import PER_SHARD, asset_path
from roadwork_assets.defs.resources import ArtifactRegistryResource
from roadwork_assets.defs.split_reads import record_read


def _step_key(context: dg.InputContext) -> str | None:
    try:
        return context.step_context.step.key
    except Exception:
        return None


def read_artifact(registry: ArtifactRegistry, asset_name: str, partition: str | None) -> Any:
    path = asset_path(registry, asset_name, partition)
    if asset_name == "bundle":
        return registry.latest_bundle()
    if asset_name == "checkpoint":
        return load_checkpoint(path)
    if asset_name == "embeddings":  # one shard; features memory-mapped: they grow with the split
        split, shard = parse_shard_key(partition)
        return open_embedding_shard(path, split, shard)
    if path.suffix == ".parquet":
        frame = pd.read_parquet(path)
        frame.attrs["provenance"] = read_parquet_provenance(path)
        return frame
    if path.suffix == ".npz":
        return read_npz(path)
    return path  # JSON artifacts: the asset validates them against their schema


class RegistryIOManager(dg.ConfigurableIOManager):
    """Stores nothing itself; resolves registry paths and records reads in the ledger.

    It shares the ``artifacts`` resource with the assets, so the root assets write to
    and the root inputs are loaded from cannot be configured apart.
    """

    artifacts: ArtifactRegistryResource

    @property
    def registry(self) -> ArtifactRegistry:
        return self.artifacts.registry

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        if obj is None:
            return
        if not isinstance(obj, Path) or not obj.exists():
            raise TypeError(
                f"asset {context.asset_key.to_user_string()} must write its artifact "
                f"through the registry and return its Path; got {type(obj).__name__}"
            )
        if self.registry.root not in obj.resolve().parents:
            raise ValueError(f"asset {context.asset_key.to_user_string()} returned {obj}, "
                             f"outside the artifact root {self.registry.root}")

    def load_input(self, context: dg.InputContext) -> Any:
        name = context.asset_key.path[-1]
        if not context.has_asset_partitions:
            if name in ALL_SPLITS_ASSETS:  # holds every split's rows
                for split in SPLITS:
                    record_read(name, split, _step_key(context))
            else:  # a derived asset: what it carries is looked up at check time
                record_read(name, None, _step_key(context))
            return read_artifact(self.registry, name, None)
        keys = list(context.asset_partition_keys)
        step = _step_key(context)
        for key in keys:
            record_read(name, key, step)
        consumer_partitioned = _consumer_is_partitioned(context)
        # a reader of a sharded asset gets whole splits; loading one shard by its own key
        # (load_asset_value(..., partition_key="1|train")) gets that shard
        if name in PER_SHARD and not (consumer_partitioned and keys == [context.partition_key]):
            by_split = read_sharded(self.registry, name, keys)
            return next(iter(by_split.values())) if consumer_partitioned and \
                len(by_split) == 1 else by_split
        if consumer_partitioned and len(keys) == 1:
            return read_artifact(self.registry, name, keys[0])
        return {key: read_artifact(self.registry, name, key) for key in keys}


def read_sharded(registry: ArtifactRegistry, asset_name: str, keys: list[str]) -> dict[str, Any]:
    """{split: that split's shards among ``keys``, merged (all of them, checked)}."""
    by_split: dict[str, dict[int, str]] = {}
    for key in keys:
        split, shard = parse_shard_key(key)
        by_split.setdefault(split, {})[shard] = key
    out = {}
    for split, shards in by_split.items():
        ordered = [shards[k] for k in sorted(shards)]
        out[split] = merge_shards([read_artifact(registry, asset_name, key) for key in ordered],
                                  [asset_path(registry, asset_name, key) for key in ordered],
                                  split)
    return out


def _consumer_is_partitioned(context: dg.InputContext) -> bool:
    # A partitioned run (embeddings[val_calib] reading split_manifest[val_calib]) gets the
    # value itself; an unpartitioned consumer gets {partition: value}. AssetValueLoader
    # (context.load_asset_value(..., partition_key=...)) sets the key: one value.
    return context.has_partition_key
