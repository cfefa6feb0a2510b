"""The whole graph with ``ROADWORK_EMBEDDING_SHARDS=3``: embeddings fan out into one run
per shard of each split, and nothing downstream can tell: the logits equal those of a
one-shard run bit for bit, the bundle verifies, the ledger records every shard read and
every split-read check passes; a shard that reads another split's shard, or a shard
re-made with another cut, is refused."""

from __future__ import annotations

import itertools

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from roadwork_assets.contracts.errors import ArtifactIntegrityError
from roadwork_assets.contracts.splits import SPLITS
from roadwork_assets.core.artifacts import ArtifactRegistry, read_npz
from roadwork_assets.core.training.checkpoint import load_checkpoint
from roadwork_assets.defs.split_reads import SPLIT_READS_CHECK
from roadwork_assets_tests.conftest import tiny_resources

N_SHARDS = 3


def _resources(root) -> dict:
    from roadwork_assets.defs.resources import DatasetSource, TrainerResource

    # the CI config: 160 images at 32 px, one epoch, alpha 0.2 (enough val_calib scenes)
    resources = tiny_resources(root, n_images=160, epochs=1, alpha=0.2)
    resources["dataset"] = DatasetSource(default_n_images=160, default_image_size=32)
    resources["trainer"] = TrainerResource(img_size=32, epochs=1, batch_size=64, threads=1)
    return resources


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """The whole graph in 3 shards (count from the environment, as `roadwork run` takes
    it), and the same config in 1 shard up to the logits."""
    from roadwork_assets.definitions import build_definitions
    from roadwork_assets.defs.runner import materialize_all, run_stage, stage_partitions, stages

    root3, root1 = tmp_path_factory.mktemp("shards3"), tmp_path_factory.mktemp("shards1")
    mp = pytest.MonkeyPatch()
    mp.setenv("ROADWORK_EMBEDDING_SHARDS", str(N_SHARDS))
    try:
        defs3 = build_definitions(_resources(root3))
    finally:
        mp.undo()
    with dg.DagsterInstance.ephemeral() as instance:
        results = materialize_all(defs3, instance, say=lambda _m: None)
    defs1 = build_definitions(_resources(root1), n_shards=1)
    job = defs1.resolve_implicit_global_asset_job_def()
    with dg.DagsterInstance.ephemeral() as instance:
        for stage in stages(defs1):
            for partition in stage_partitions(defs1, stage):
                run_stage(job, instance, [dg.AssetKey(a) for a in stage.assets], partition, None)
            if "logits" in stage.assets:
                break
    return ArtifactRegistry(root3), ArtifactRegistry(root1), defs3, results


def _materializations(results) -> dict[tuple[str, str | None], dict]:
    out = {}
    for result in results:
        for event in result.get_asset_materialization_events():
            mat = event.materialization
            out[(event.asset_key.to_user_string(), mat.partition)] = {
                k: v.value for k, v in mat.metadata.items()}
    return out


def test_three_shards_give_the_logits_of_one(sharded):
    reg3, reg1, _, _ = sharded
    for split in SPLITS:
        assert [p.name for p in sorted(reg3.embeddings_dir(split).iterdir())] == [
            f"shard_{k}.npz" for k in range(N_SHARDS)]
        a, b = read_npz(reg3.logits(split)), read_npz(reg1.logits(split))
        assert np.array_equal(a["logits"], b["logits"]), split  # bit for bit
        assert np.array_equal(a["item_ids"], b["item_ids"]) and np.array_equal(
            a["labels"], b["labels"])
    w3 = load_checkpoint(reg3.checkpoint)["model_state_dict"]
    w1 = load_checkpoint(reg1.checkpoint)["model_state_dict"]
    assert all(np.array_equal(w3[k].numpy(), w1[k].numpy()) for k in w1)


def test_sharded_graph_bundle_verifies(sharded):
    from roadwork_assets.core.export.bundle import load_bundle

    reg3, _, _, results = sharded
    assert all(r.success for r in results)
    bundle = load_bundle(reg3.latest_bundle())  # hashes, lineage, torch and ONNX probe
    assert bundle.onnx_checked


def test_every_shard_is_a_run_and_every_read_is_in_the_ledger(sharded):
    reg3, _, _, results = sharded
    mats = _materializations(results)
    for split in SPLITS:
        n_rows = len(pd.read_parquet(reg3.split_manifest(split)))
        rows = [mats[("embeddings", f"{k}|{split}")]["rows"] for k in range(N_SHARDS)]
        assert rows[0][0] == 0 and rows[-1][1] == n_rows  # contiguous blocks, in order
        assert all(a[1] == b[0] for a, b in itertools.pairwise(rows))
        for k in range(N_SHARDS):
            meta = mats[("embeddings", f"{k}|{split}")]
            assert (meta["shard"], meta["n_shards"], meta["split"]) == (k, N_SHARDS, split)
            assert meta["partitions_read"] == [f"split_manifest[{split}]"]
        logits = mats[("logits", split)]
        assert logits["splits_read"] == [split]
        assert logits["partitions_read"] == sorted(
            ["checkpoint", f"split_manifest[{split}]",
             *(f"embeddings[{k}|{split}]" for k in range(N_SHARDS))])
    ckpt = mats[("checkpoint", None)]
    assert ckpt["splits_read"] == ["train", "val_select"]
    assert ckpt["partitions_read"] == sorted(
        ["adapted_backbone", *(f"embeddings[{k}|{s}]" for s in ("train", "val_select")
                               for k in range(N_SHARDS))])
    assert ckpt["splits_carried"] == {"train": "checkpoint <- embeddings[0|train]",
                                      "val_select": "checkpoint <- embeddings[0|val_select]"}
    checks = [e for r in results for e in r.get_asset_check_evaluations()]
    assert all(e.passed for e in checks), [(e.asset_key, e.description) for e in checks
                                           if not e.passed]
    reads_checked = {e.asset_key.to_user_string() for e in checks
                     if e.check_name == SPLIT_READS_CHECK}
    assert {"embeddings", "checkpoint", "adapted_backbone", "logits"} <= reads_checked


def test_reader_loading_a_forbidden_shard_fails_its_split_reads_check(sharded):
    """A checkpoint that also peeks at shard 2 of val_calib (``load_asset_value``, not an
    input: the graph audit cannot see it) is caught by its blocking check at run time."""
    from roadwork_assets.defs.io_manager import RegistryIOManager
    from roadwork_assets.defs.partitions import (
        MODEL_FITTING_SPLITS,
        embedding_partitions,
        shards_of,
    )
    from roadwork_assets.defs.resources import ArtifactRegistryResource
    from roadwork_assets.defs.split_reads import (
        drain_reads,
        split_reads_check_spec,
        split_reads_result,
    )

    reg3 = sharded[0]

    @dg.asset(name="embeddings", partitions_def=embedding_partitions(N_SHARDS))
    def stub():  # the real asset's identity: its shards are on disk already
        raise AssertionError("not materialized in this test")

    @dg.asset(name="checkpoint", check_specs=[split_reads_check_spec("checkpoint")],
              ins={"embeddings": dg.AssetIn(
                  partition_mapping=shards_of(MODEL_FITTING_SPLITS, N_SHARDS))})
    def peeking(context, embeddings):
        assert set(embeddings) == {"train", "val_select"}  # whole splits, shards merged
        one = context.load_asset_value(dg.AssetKey("embeddings"), partition_key="2|val_calib")
        assert int(one["shard"]) == 2  # one shard, by its key
        meta, check = split_reads_result(context)
        yield dg.Output(None, metadata=meta)
        yield check

    drain_reads()
    result = dg.materialize(
        [stub, peeking], selection=["checkpoint"], raise_on_error=False,
        resources={"io_manager": RegistryIOManager(
            artifacts=ArtifactRegistryResource(root=str(reg3.root)))})
    (check,) = result.get_asset_check_evaluations()
    assert not check.passed
    assert "checkpoint read forbidden split partition(s) ['2|val_calib']" in check.description
    assert check.metadata["splits_read"].value == ["train", "val_calib", "val_select"]


def test_shard_remade_with_another_cut_is_refused_and_damages_nothing(sharded):
    from roadwork_assets.core.training.config import TrainerConfig
    from roadwork_assets.core.training.shards import ShardSpec, compute_embedding_shard
    from roadwork_assets.defs.runner import run_stage

    reg3, _, defs3, _ = sharded
    shard = reg3.embedding_shard("val_calib", 1)
    kept, logits_before = shard.read_bytes(), reg3.logits("val_calib").read_bytes()
    manifest = pd.read_parquet(reg3.split_manifest("val_calib"))
    cfg = TrainerConfig(img_size=32, epochs=1, batch_size=64, threads=1)
    try:  # shard 1 of a 2-shard cut, written where shard 1 of 3 was
        compute_embedding_shard(manifest, cfg, shard, "val_calib", ShardSpec(2, 1), "dv", "a")
        job = defs3.resolve_implicit_global_asset_job_def()
        with dg.DagsterInstance.ephemeral() as instance, \
                pytest.raises(ArtifactIntegrityError) as err:
            run_stage(job, instance, [dg.AssetKey("logits")], "val_calib", None)
        text = str(err.value)
        assert "embeddings[1|val_calib]" in text and "n_shards '2' but shard 0 has '3'" in text
        assert "re-materialize every shard of embeddings for split val_calib" in text
        assert reg3.logits("val_calib").read_bytes() == logits_before
    finally:
        shard.write_bytes(kept)
