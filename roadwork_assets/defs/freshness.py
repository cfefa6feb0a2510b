"""Which asset partitions are up to date, so `roadwork run` can skip them.

An asset partition is up to date when all of these hold for its latest materialization:

* it was made with the shard count the definitions load with (a split x shard asset:
  ``embeddings``; ROADWORK_EMBEDDING_SHARDS) — said first, as the reason to rebuild,
  since Dagster would only report the code version it is folded into
  (``partitions.sharded_code_version``);
* Dagster calls it FRESH: same code version, and every input's data version (the
  content hash of the artifact it read, ``promotion.content_version``) unchanged — the
  staleness the UI shows;
* it was promoted (no blocking check rejected it);
* it ran with the same settings groups it uses (``promotion.settings_fingerprint``),
  which Dagster's staleness cannot see;
* its artifact is still on disk with the sha256 it was materialized with (a bundle: LATEST
  names it and every file hashes as listed) — an edited or deleted artifact is rebuilt;
* ``source_images`` only: the data source's listing (``core.data.source_stamp``) is
  unchanged, since it has no upstream asset to carry a new file's arrival.

Anything else is rebuilt, with the first reason found.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
from dagster._core.definitions.data_version import StaleStatus

from roadwork_assets.core.artifacts import ArtifactRegistry, file_sha256, settings_sha256
from roadwork_assets.core.data.multi_source import parse_source_specs
from roadwork_assets.core.data.source_stamp import source_stamp
from roadwork_assets.defs.data.assets import SOURCE_STAMP_KEY
from roadwork_assets.defs.partitions import SHARDS_ENV, shard_count
from roadwork_assets.defs.promotion import SETTINGS_KEY


@dataclass(frozen=True)
class Expected:
    """What the next run would use: each settings group's sha256, the source's stamp."""

    settings: Mapping[str, str]
    source_stamp: str

    @classmethod
    def of(cls, values: Mapping[str, Mapping[str, Any]], registry: ArtifactRegistry) -> Expected:
        """From every group's resolved values (``ResolvedSettings.values``)."""
        spec = values["dataset"].get("spec")
        sources = ([s.path for s in parse_source_specs(spec)] if spec
                   else [registry.default_dataset_dir / "manifest.csv"])
        return cls({g: settings_sha256(dict(v)) for g, v in values.items()},
                   source_stamp(*sources))


class FreshnessJudge:
    """Answers ``why_rebuild(key, partition)``: None when up to date, else one reason."""

    def __init__(self, defs: dg.Definitions, instance: dg.DagsterInstance, expected: Expected):
        self.graph = defs.resolve_asset_graph()
        self.instance = instance
        self.expected = expected
        self._resolver = None

    def refresh(self) -> None:
        """Forget cached statuses: call after a run materialized something."""
        self._resolver = None

    @property
    def resolver(self):
        from dagster._core.asset_graph_view.asset_graph_view import AssetGraphView
        from dagster._core.definitions.data_version import CachingStaleStatusResolver
        from dagster._core.definitions.temporal_context import TemporalContext
        from dagster._time import get_current_datetime

        if self._resolver is None:
            view = AssetGraphView(
                temporal_context=TemporalContext(effective_dt=get_current_datetime(),
                                                 last_event_id=None),
                instance=self.instance, asset_graph=self.graph)
            self._resolver = CachingStaleStatusResolver(self.instance, self.graph, view)
        return self._resolver

    def why_rebuild(self, key: dg.AssetKey, partition: str | None) -> str | None:
        records = self.instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=key,
                                  asset_partitions=[partition] if partition else None),
            limit=1).records
        if not records:
            return "never materialized"
        meta = records[0].asset_materialization.metadata
        resharded = self._shards_changed(key, meta)
        if resharded:
            return resharded
        status = self.resolver.get_status(key, partition)
        if status != StaleStatus.FRESH:
            causes = self.resolver.get_stale_causes(key, partition)
            return "stale: " + ("; ".join(_cause_text(c) for c in causes[:2]) or status.value)
        return (_rejected(meta) or self._settings_changed(meta) or _artifact_changed(meta)
                or self._source_changed(key, meta))

    def _shards_changed(self, key: dg.AssetKey, meta) -> str | None:
        """A shard made as one of another count of shards holds other rows."""
        n_shards = shard_count(self.graph.get(key).partitions_def)
        if n_shards is None:
            return None
        recorded = meta.get("n_shards")
        if recorded is None or recorded.value != n_shards:
            made = "an unrecorded number of" if recorded is None else recorded.value
            return (f"shard count changed ({SHARDS_ENV}): made as one of {made} shards per "
                    f"split, now {n_shards}")
        return None

    def _settings_changed(self, meta) -> str | None:
        recorded = meta.get(SETTINGS_KEY)
        if recorded is None:
            return "its settings were not recorded"
        changed = sorted(g for g, sha in recorded.value.items()
                         if self.expected.settings.get(g) != sha)
        return f"settings changed: {', '.join(changed)}" if changed else None

    def _source_changed(self, key: dg.AssetKey, meta) -> str | None:
        if key != dg.AssetKey("source_images"):
            return None
        recorded = meta.get(SOURCE_STAMP_KEY)
        if recorded is None or recorded.value != self.expected.source_stamp:
            return "the data source changed (files added, removed or edited)"
        return None


def _cause_text(cause) -> str:
    where = cause.asset_key.to_user_string() + (f"[{cause.partition_key}]"
                                                if cause.partition_key else "")
    return f"{where} {cause.reason}"


def _rejected(meta) -> str | None:
    promoted = meta.get("promoted")
    if promoted is not None and promoted.value is False:
        return "its last materialization was rejected by a blocking check"
    return None


def _artifact_changed(meta) -> str | None:
    """None if the artifact on disk is the one materialized; else what is wrong."""
    if "bundle_id" in meta and "files" in meta:
        directory = Path(meta["bundle_dir"].value)
        pointer = directory.parent / "LATEST"
        if not pointer.is_file() or pointer.read_text().strip() != meta["bundle_id"].value:
            return f"{pointer} no longer names bundle {meta['bundle_id'].value}"
        for entry in meta["files"].value.values():
            path = directory / entry["path"]
            if not path.is_file() or file_sha256(path) != entry["sha256"]:
                return f"bundle file {path} is missing or was edited"
        return None
    if "path" not in meta or "sha256" not in meta:
        return "its artifact's hash was not recorded"
    path = Path(meta["path"].value)
    if not path.is_file():
        return f"artifact {path} is missing"
    if file_sha256(path) != meta["sha256"].value:
        return f"artifact {path} was edited since it was materialized"
    return None


OPTIONAL_TAG = "roadwork/optional"  # materialized on request only (runner.stages skips them)


def with_automation(assets: list[dg.AssetsDefinition]) -> list[dg.AssetsDefinition]:
    """Every asset with an upstream gets ``AutomationCondition.eager()``: once the daemon
    runs (``dagster dev``; Dagster adds its default automation-condition sensor for
    these), an asset is re-materialized when an input it reads was materialized anew,
    and not while one is missing or in progress — so a new ``source_images`` flows down
    the graph and nothing else reruns. Roots (``source_images``) are left to runs, the
    retrain schedule and sensors, so opening the UI on a fresh instance starts nothing;
    optional assets and any asset that sets its own condition are left as they are."""

    def attach(spec: dg.AssetSpec) -> dg.AssetSpec:
        if (not spec.deps or spec.tags.get(OPTIONAL_TAG) == "true"
                or spec.automation_condition is not None):
            return spec
        return spec.replace_attributes(automation_condition=dg.AutomationCondition.eager())

    return [a.map_asset_specs(attach) for a in assets]
