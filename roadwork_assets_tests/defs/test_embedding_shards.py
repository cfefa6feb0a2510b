"""ROADWORK_EMBEDDING_SHARDS: read when the definitions load, refused clearly when it is
not a shard count, and followed by the definitions, the artifact paths and the keys."""

from __future__ import annotations

import dagster as dg
import pytest

from roadwork_assets.contracts.errors import BadInputError, LeakageError
from roadwork_assets.contracts.splits import parse_shard_key, split_of
from roadwork_assets.core.artifacts import ArtifactRegistry
from roadwork_assets.defs.asset_paths import asset_path
from roadwork_assets.defs.partitions import SHARDS_ENV, embedding_shards_from_env
from roadwork_assets_tests.conftest import tiny_resources


@pytest.mark.parametrize(("raw", "n"), [(None, 1), ("", 1), ("1", 1), (" 3 ", 3), ("49", 49)])
def test_shard_count_from_the_environment(raw, n):
    assert embedding_shards_from_env({} if raw is None else {SHARDS_ENV: raw}) == n


@pytest.mark.parametrize("raw", ["0", "-2", "two", "1.5", "50", "3 shards"])
def test_bad_shard_count_is_refused_naming_the_variable(raw):
    with pytest.raises(BadInputError, match=rf"ROADWORK_EMBEDDING_SHARDS='{raw}' is not a shard "
                       r"count: set it to a whole number from 1 to 49"):
        embedding_shards_from_env({SHARDS_ENV: raw})


def test_definitions_load_with_the_environments_shard_count(tmp_path, monkeypatch):
    from roadwork_assets import definitions

    monkeypatch.setenv(SHARDS_ENV, "3")
    keys = definitions.build_definitions(tiny_resources(tmp_path)).resolve_asset_graph().get(
        dg.AssetKey("embeddings")).partitions_def.get_partition_keys()
    assert sorted(keys) == sorted(f"{k}|{s}" for k in range(3)
                                  for s in ("train", "val_select", "val_calib", "val_test"))
    # a long-lived process (`roadwork run` in a notebook) follows a changed count
    monkeypatch.setenv("ROADWORK_HOME", str(tmp_path))
    assert definitions.definitions_shards(definitions.current_definitions()) == 3
    monkeypatch.setenv(SHARDS_ENV, "nine")
    with pytest.raises(BadInputError, match="ROADWORK_EMBEDDING_SHARDS='nine'"):
        definitions.build_definitions(tiny_resources(tmp_path))


def test_shard_keys_and_paths():
    assert parse_shard_key("2|val_calib") == ("val_calib", 2)
    assert parse_shard_key("val_calib") == ("val_calib", None)
    assert split_of("11|train") == "train" and split_of("train") == "train"
    for bad in ("test", "x|train", "1|test", "1|2|train"):
        with pytest.raises(LeakageError, match=f"partition key {bad!r} is neither a split"):
            parse_shard_key(bad)
    reg = ArtifactRegistry("/tmp/roadwork-root")
    assert asset_path(reg, "embeddings", "2|val_test") == reg.embedding_shard("val_test", 2)
    with pytest.raises(ValueError, match=r"embeddings needs a '<shard>\|<split>' partition, got "
                       "'val_test'"):
        asset_path(reg, "embeddings", "val_test")


def test_most_shards_keep_every_edge_under_dagsters_staleness_threshold(tmp_path):
    """Dagster ignores data versions across an edge of 100+ parent partitions; with the
    most shards allowed, checkpoint (two splits' shards) still reads fewer."""
    from dagster._core.definitions.data_version import (
        SKIP_PARTITION_DATA_VERSION_DEPENDENCY_THRESHOLD,
    )

    from roadwork_assets.definitions import build_definitions
    from roadwork_assets.defs.partitions import MAX_SHARDS

    graph = build_definitions(tiny_resources(tmp_path), n_shards=MAX_SHARDS).resolve_asset_graph()
    reads = graph.get_parent_partition_keys_for_child(
        None, dg.AssetKey("embeddings"), dg.AssetKey("checkpoint")).partitions_subset
    assert len(reads) == 2 * MAX_SHARDS < SKIP_PARTITION_DATA_VERSION_DEPENDENCY_THRESHOLD


def test_shard_count_is_part_of_the_sharded_assets_code_version(tmp_path):
    """Shard k of 2 holds other rows than shard k of 1: Dagster sees another code version
    for embeddings (so the UI and `roadwork run` call every shard stale), and only there."""
    from roadwork_assets.core.artifacts import code_version
    from roadwork_assets.definitions import build_definitions
    from roadwork_assets.defs.partitions import with_shards

    versions = {}
    for n in (1, 2):
        defs = build_definitions(tiny_resources(tmp_path), n_shards=n)
        graph = defs.resolve_asset_graph()
        versions[n] = {k.to_user_string(): graph.get(k).code_version
                       for k in graph.get_all_asset_keys() if graph.get(k).is_materializable}
    assert versions[1]["embeddings"] == f"{code_version()}+shards1"
    assert versions[2]["embeddings"] == f"{code_version()}+shards2"
    assert {k: v for k, v in versions[1].items() if k != "embeddings"} == {
        k: v for k, v in versions[2].items() if k != "embeddings"}
    # re-sharding assets already sharded replaces the count, it does not stack
    (again,) = [a for a in with_shards(with_shards(defs.assets, 2), 5)
                if dg.AssetKey("embeddings") in a.keys]
    assert again.code_versions_by_key[dg.AssetKey("embeddings")] == f"{code_version()}+shards5"
