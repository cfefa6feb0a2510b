"""Split partitions, embedding shards, and the partition mappings that encode the split
policy.

``embeddings`` is partitioned by split x shard (``embedding_partitions``), so one split's
features can be computed by several independent runs (executors and backfills spread
them over workers). Its readers never see shards: a split-partitioned reader reads every
shard of its own split (``BY_SPLIT``), an unpartitioned one every shard of the splits its
mapping names (``shards_of``). The shard count is fixed when the definitions load
(``ROADWORK_EMBEDDING_SHARDS``, default 1); ``with_shards`` sets it on a list of assets,
and folds it into their code version (``sharded_code_version``): a new count re-cuts every
shard, so every shard is stale (in the UI and to `roadwork run`), not only the new ones.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Mapping, Sequence

import dagster as dg

from roadwork_assets.contracts.errors import BadInputError
from roadwork_assets.contracts.splits import SHARD_SEP, SPLITS, parse_shard_key, shard_key

split_partitions = dg.StaticPartitionsDefinition(list(SPLITS))

# Unpartitioned readers of split-partitioned assets read exactly these partitions.
MODEL_FITTING_SPLITS = dg.SpecificPartitionsPartitionMapping(["train", "val_select"])
TRAIN_ONLY = dg.SpecificPartitionsPartitionMapping(["train"])  # adapted_backbone (ExPLoRA)
POLICY_FITTING_SPLITS = dg.SpecificPartitionsPartitionMapping(["val_calib"])
FINAL_EVALUATION_SPLITS = dg.SpecificPartitionsPartitionMapping(["val_test"])

SHARDS_ENV = "ROADWORK_EMBEDDING_SHARDS"
SPLIT_DIM, SHARD_DIM = "split", "shard"
# Dagster skips data-version (staleness) dependencies on an edge that reads 100 or more
# parent partitions (SKIP_PARTITION_DATA_VERSION_DEPENDENCY_THRESHOLD); checkpoint reads
# 2 x n shard keys, so from 50 shards on it would never look stale to the UI or to
# `roadwork run`'s freshness judge after new embeddings. 49 keeps every edge under it.
MAX_SHARDS = 49
# split x shard <-> split: every shard of one split, nothing else (both directions).
# Dagster marks the class beta; its warning at import is not the user's to act on.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", dg.BetaWarning)
    BY_SPLIT = dg.MultiToSingleDimensionPartitionMapping(partition_dimension_name=SPLIT_DIM)


def embedding_shards_from_env(environ: Mapping[str, str] | None = None) -> int:
    """``ROADWORK_EMBEDDING_SHARDS`` (default 1): shards per split of ``embeddings``."""
    raw = (os.environ if environ is None else environ).get(SHARDS_ENV, "").strip()
    if not raw:
        return 1
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_SHARDS:
        raise BadInputError(f"{SHARDS_ENV}={raw!r} is not a shard count: set it to a whole "
                            f"number from 1 to {MAX_SHARDS} (shards per split of embeddings), "
                            "or unset it for 1")
    return int(raw)


@functools.cache
def embedding_partitions(n_shards: int) -> dg.MultiPartitionsDefinition:
    """split x shard, keys ``"<shard>|<split>"`` (Dagster orders dimensions by name)."""
    shards = dg.StaticPartitionsDefinition([str(k) for k in range(n_shards)])
    return dg.MultiPartitionsDefinition({SPLIT_DIM: split_partitions, SHARD_DIM: shards})


def shard_count(partitions_def: dg.PartitionsDefinition | None) -> int | None:
    """Shards per split of a split x shard partitions definition; None for any other."""
    if not isinstance(partitions_def, dg.MultiPartitionsDefinition):
        return None
    dims = {d.name: d.partitions_def for d in partitions_def.partitions_defs}
    if set(dims) != {SPLIT_DIM, SHARD_DIM}:
        return None
    return len(dims[SHARD_DIM].get_partition_keys())


def shards_of(mapping: dg.SpecificPartitionsPartitionMapping,
              n_shards: int = 1) -> dg.SpecificPartitionsPartitionMapping:
    """An unpartitioned reader's mapping of split keys, over every shard of those splits:
    the allowed splits stay written once (``MODEL_FITTING_SPLITS``, ``TRAIN_ONLY``)."""
    splits = [parse_shard_key(k)[0] for k in mapping.partition_keys]
    return dg.SpecificPartitionsPartitionMapping(
        [shard_key(split, k) for split in dict.fromkeys(splits) for k in range(n_shards)])


def _resharded(mapping: dg.PartitionMapping | None, n_shards: int) -> dg.PartitionMapping | None:
    if isinstance(mapping, dg.SpecificPartitionsPartitionMapping) and any(
            SHARD_SEP in k for k in mapping.partition_keys):
        return shards_of(mapping, n_shards)
    return mapping


SHARDS_VERSION_SEP = "+shards"


def sharded_code_version(code_version: str | None, n_shards: int) -> str:
    """``"<code version>+shards<n>"``: a split x shard asset's code version at ``n_shards``
    shards (any count already folded in is replaced). Shard ``k`` of another count holds
    other rows, so Dagster must see it as other code: "0|train" made as one of 1 shards is
    stale once the definitions load with 2, and a shard stamped with another count never
    reaches ``shards.merge_shards``."""
    base = (code_version or "").split(SHARDS_VERSION_SEP)[0]
    return f"{base}{SHARDS_VERSION_SEP}{n_shards}"


def with_shards(assets: Sequence[dg.AssetsDefinition], n_shards: int) -> list[dg.AssetsDefinition]:
    """``assets`` with every split x shard partitioning at ``n_shards`` shards and code
    version ``sharded_code_version``, and every mapping over shard keys (``shards_of``)
    widened or narrowed to match. Assets declare one shard; the definitions set the count
    they load with."""

    def reshard(spec: dg.AssetSpec) -> dg.AssetSpec:
        changes: dict[str, object] = {}
        if shard_count(spec.partitions_def) is not None:
            changes["code_version"] = sharded_code_version(spec.code_version, n_shards)
            if shard_count(spec.partitions_def) != n_shards:
                changes["partitions_def"] = embedding_partitions(n_shards)
        deps = [dg.AssetDep(d.asset_key, partition_mapping=_resharded(d.partition_mapping,
                                                                      n_shards))
                for d in spec.deps]
        if any(new.partition_mapping is not old.partition_mapping
               for new, old in zip(deps, spec.deps, strict=True)):
            changes["deps"] = deps
        return spec.replace_attributes(**changes) if changes else spec

    return [a.map_asset_specs(reshard) if isinstance(a, dg.AssetsDefinition) else a
            for a in assets]
