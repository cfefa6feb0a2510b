"""A new ROADWORK_EMBEDDING_SHARDS on a home that already holds embeddings: every shard
is stale (the UI's staleness and `roadwork run`'s judge), so a plain run re-cuts the
split and the checkpoint reads a consistent set of shards: 1 -> 2 -> 1 shards, no --force.

`roadwork run`'s own path (the runner's stages with a ``FreshnessJudge`` over a real
instance in a tmp DAGSTER_HOME, settings resolved as the CLI resolves them), over the
graph up to ``logits`` and the two model-fitting splits only, to stay fast.
"""

from __future__ import annotations

import re

import dagster as dg
import numpy as np
import pytest

from roadwork_assets.core.artifacts import ArtifactRegistry, read_npz
from roadwork_assets.core.training.shards import read_split_embeddings
from roadwork_assets_tests.integration.test_run_safety import TINY

SPLITS = ("train", "val_select")  # what checkpoint reads
REBUILD = re.compile(r"^\[roadwork\]   rebuild (\w+)(?:\[([\w|]+)\])?: (.+)$")
STAGE = re.compile(r"^\[roadwork\] stage \d+/\d+: (.+?)( \[([\w|]+)\])?$")


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("ROADWORK_HOME", str(tmp_path / "home"))
    (tmp_path / "dagster").mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    monkeypatch.delenv("ROADWORK_DATA", raising=False)  # the tiny synthetic default dataset
    monkeypatch.delenv("ROADWORK_WEIGHTS", raising=False)
    return tmp_path


def _up_to_logits(n_shards: int, monkeypatch) -> dg.Definitions:
    """The definitions as `roadwork run` loads them with ``n_shards`` in the environment,
    cut to ``logits`` and what it reads."""
    from roadwork_assets.definitions import build_definitions

    monkeypatch.setenv("ROADWORK_EMBEDDING_SHARDS", str(n_shards))
    full = build_definitions()
    graph = full.resolve_asset_graph()
    keep, todo = set(), [dg.AssetKey("logits")]
    while todo:
        key = todo.pop()
        if key not in keep:
            keep.add(key)
            todo.extend(graph.get(key).parent_keys)
    return dg.Definitions(assets=[a for a in full.assets if set(a.keys) <= keep],
                          resources=full.resources, executor=dg.in_process_executor)


def _judge(defs, instance, settings, root):
    from roadwork_assets.defs.freshness import Expected, FreshnessJudge

    return FreshnessJudge(defs, instance, Expected.of(settings.values, ArtifactRegistry(root)))


def _run(defs, instance, settings, root) -> tuple[list[tuple[str, str | None]], dict[str, str]]:
    """(stage runs as (assets, partition), {asset[partition]: rebuild reason})."""
    from roadwork_assets.defs.runner import materialize_all

    lines: list[str] = []
    job = defs.resolve_implicit_global_asset_job_def()
    results = materialize_all(defs, instance, run_config=settings.run_config(set(job.resource_defs)),
                              say=lines.append, splits=SPLITS,
                              judge=_judge(defs, instance, settings, root))
    assert all(r.success for r in results)
    ran = [(m.group(1), m.group(3)) for m in map(STAGE.match, lines)
           if m and not m.group(1).endswith("up to date, skipped")]
    reasons = {m.group(1) + (f"[{m.group(2)}]" if m.group(2) else ""): m.group(3)
               for m in map(REBUILD.match, lines) if m}
    return ran, reasons


def _embedded(ran) -> list[str | None]:
    return [p for names, p in ran if names == "embeddings"]


def test_new_shard_count_rebuilds_every_shard_without_force(home, monkeypatch):
    from dagster._core.definitions.data_version import StaleCauseCategory, StaleStatus

    from roadwork_assets.defs.settings import resolve_settings

    settings = resolve_settings(TINY)
    root = home / "home"
    reg = ArtifactRegistry(root)
    with dg.DagsterInstance.local_temp(str(home / "dagster")) as instance:
        ran, _ = _run(_up_to_logits(1, monkeypatch), instance, settings, root)
        assert _embedded(ran) == ["0|train", "0|val_select"]
        logits_one = read_npz(reg.logits("train"))["logits"]

        defs2 = _up_to_logits(2, monkeypatch)
        # the UI's staleness: shard 0 made as one of 1 is stale under 2 shards (code version)
        resolver = _judge(defs2, instance, settings, root).resolver
        assert resolver.get_status(dg.AssetKey("embeddings"), "0|train") == StaleStatus.STALE
        causes = resolver.get_stale_causes(dg.AssetKey("embeddings"), "0|train")
        assert [c.category for c in causes] == [StaleCauseCategory.CODE]

        ran, reasons = _run(defs2, instance, settings, root)
        assert _embedded(ran) == ["0|train", "1|train", "0|val_select", "1|val_select"]
        for split in SPLITS:
            assert reasons[f"embeddings[0|{split}]"] == (
                "shard count changed (ROADWORK_EMBEDDING_SHARDS): made as one of 1 shards per "
                "split, now 2")
            assert reasons[f"embeddings[1|{split}]"] == "never materialized"
        assert reasons["checkpoint"].startswith("stale: ")
        assert {"source_images", "split_assignment", "split_manifest"}.isdisjoint(
            name for names, _ in ran for name in names.split(", "))  # data untouched
        assert int(read_split_embeddings(reg, "train")["n_shards"]) == 2
        # the same rows in two shards train the same model: the logits do not move
        assert np.array_equal(read_npz(reg.logits("train"))["logits"], logits_one)

        ran, reasons = _run(_up_to_logits(1, monkeypatch), instance, settings, root)
        assert _embedded(ran) == ["0|train", "0|val_select"]
        assert reasons["embeddings[0|train]"] == (
            "shard count changed (ROADWORK_EMBEDDING_SHARDS): made as one of 2 shards per "
            "split, now 1")
        assert "checkpoint" in reasons and {p for n, p in ran if n == "logits"} == set(SPLITS)
        assert int(read_split_embeddings(reg, "train")["n_shards"]) == 1
        assert np.array_equal(read_npz(reg.logits("train"))["logits"], logits_one)

        ran, reasons = _run(_up_to_logits(1, monkeypatch), instance, settings, root)
        assert ran == [] and reasons == {}  # and then it is up to date
