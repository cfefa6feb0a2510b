"""The registry IO manager: loads artifacts by path and records every split read.

Assets write their artifacts themselves, atomically, through the artifact registry
and return the path; this IO manager only checks the path exists and, on load, maps
(asset, partition) to the registry path and reads it by suffix.

Every load — of a split partition or of an unpartitioned derived asset, through a
declared input or any other way (``context.load_asset_value(...)`` goes through here
too) — is recorded in a process-wide read ledger (partition None when unpartitioned:
its taint, the splits it carries, is looked up in the asset graph). Each asset drains
the ledger at the end of its body, records the partitions it actually read in its
metadata, and a blocking check compares them — and what they carry — with the split
policy. Steps run one at a time per process
(in-process executor) or one per process (multiprocess / k8s executors), so what a
step drains is what that step read.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd

from roadwork_assets.contracts.splits import ALL_SPLITS_ASSETS, SPLITS
from roadwork_assets.core.artifacts import (
    ArtifactRegistry,
    read_npz,
    read_parquet_provenance,
)
from roadwork_assets.core.training.checkpoint import load_checkpoint
from roadwork_assets.defs.resources import ArtifactRegistryResource

_LEDGER_LOCK = threading.Lock()
# (consuming step key or None when unknown, upstream asset name, partition key or None)
_LEDGER: list[tuple[str | None, str, str | None]] = []


def record_read(asset_name: str, partition: str | None, step_key: str | None = None) -> None:
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


def _step_key(context: dg.InputContext) -> str | None:
    try:
        return context.step_context.step.key
    except Exception:  # noqa: BLE001 -- AssetValueLoader contexts have no step
        return None


def artifact_path(registry: ArtifactRegistry, asset_name: str, partition: str | None) -> Path:
    """Where an asset (partition) lives. The single mapping from asset to path."""
    per_split = {
        "split_manifest": registry.split_manifest,
        "embeddings": registry.embeddings,
        "logits": registry.logits,
    }
    fixed = {
        "source_images": registry.source_table,
        "split_assignment": registry.split_assignment,
        "checkpoint": registry.checkpoint,
        "thresholds": registry.policy("softmax"),
        "gate_params": registry.policy("gate"),
        "conformal_sets": registry.policy("scrc"),
        "bundle": registry.latest_bundle_pointer,
        "test_report": registry.test_report,
    }
    if asset_name in per_split:
        if partition not in SPLITS:
            raise ValueError(f"{asset_name} needs a split partition, got {partition!r}")
        return per_split[asset_name](partition)
    if asset_name in fixed:
        return fixed[asset_name]
    raise KeyError(f"no artifact path registered for asset {asset_name!r}")


def read_artifact(registry: ArtifactRegistry, asset_name: str, partition: str | None) -> Any:
    path = artifact_path(registry, asset_name, partition)
    if asset_name == "bundle":
        return registry.latest_bundle()
    if asset_name == "checkpoint":
        return load_checkpoint(path)
    if path.suffix == ".parquet":
        frame = pd.read_parquet(path)
        frame.attrs["provenance"] = read_parquet_provenance(path)
        return frame
    if path.suffix == ".npz":
        return read_npz(path)
    return path  # JSON artifacts: the asset validates them against their schema


class RegistryIOManager(dg.ConfigurableIOManager):
    """Stores nothing itself; resolves registry paths and keeps the read ledger.

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
        if consumer_partitioned and len(keys) == 1:
            return read_artifact(self.registry, name, keys[0])
        return {key: read_artifact(self.registry, name, key) for key in keys}


def _consumer_is_partitioned(context: dg.InputContext) -> bool:
    # A partitioned run (embeddings[val_calib] reading split_manifest[val_calib]) gets the
    # value itself; an unpartitioned consumer gets {partition: value}. AssetValueLoader
    # (context.load_asset_value(..., partition_key=...)) sets the key: one value.
    return context.has_partition_key
