"""Embedding shards: which rows a shard holds, that the shards of a split read back as
the one cache a single writer makes (same bytes, same order, same training), and that
shards of different cuts are refused naming the shard and what to do."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from roadwork_assets.contracts.errors import ArtifactIntegrityError, BadInputError
from roadwork_assets.core.artifacts import ArtifactRegistry
from roadwork_assets.core.data.array_cache import ConcatRows
from roadwork_assets.core.training.checkpoint import load_checkpoint
from roadwork_assets.core.training.config import TrainerConfig
from roadwork_assets.core.training.pipeline import (
    compute_embeddings,
    read_embeddings,
    train_checkpoint,
)
from roadwork_assets.core.training.shards import (
    ShardSpec,
    compute_embedding_shard,
    read_split_embeddings,
)
from roadwork_assets_tests.awkward_data import encode_item, generate_awkward


def _manifest(folder: Path, n: int, seed: int = 5) -> pd.DataFrame:
    """Awkward scenes (night, grayscale PNG/JPEG, bursts...) written as a split manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for item in generate_awkward(n, seed=seed, image_size=48):
        data, ext = encode_item(item)
        path = folder / f"{item.item_id}.{ext}"
        path.write_bytes(data)
        rows.append({"item_id": item.item_id, "uri": str(path), "label": item.label,
                     "group_key": item.burst_id or item.item_id})
    return pd.DataFrame(rows)


def _cfg(**kw) -> TrainerConfig:
    return TrainerConfig(**{"img_size": 32, "batch_size": 4, "epochs": 2, "threads": 1,
                            "seed": 3, **kw})


def _write_shards(reg: ArtifactRegistry, manifest: pd.DataFrame, split: str, n: int,
                  data_version: str = "dv") -> list[dict]:
    return [compute_embedding_shard(manifest, _cfg(), reg.embedding_shard(split, k), split,
                                    ShardSpec(n, k), data_version, "a1") for k in range(n)]


@pytest.mark.parametrize("n_rows", [0, 1, 2, 7, 10, 31])
@pytest.mark.parametrize("n_shards", [1, 2, 3, 7])
def test_shard_rows_are_the_contiguous_blocks_of_the_formula(n_rows, n_shards):
    blocks = [ShardSpec(n_shards, k).bounds(n_rows) for k in range(n_shards)]
    for k, (start, stop) in enumerate(blocks):
        assert list(range(start, stop)) == [i for i in range(n_rows)
                                            if i * n_shards // n_rows == k]
    assert blocks[0][0] == 0 and blocks[-1][1] == n_rows
    assert all(a[1] == b[0] for a, b in itertools.pairwise(blocks))
    sizes = [stop - start for start, stop in blocks]
    assert max(sizes) - min(sizes) <= 1  # balanced


def test_bad_shard_spec_is_refused():
    with pytest.raises(BadInputError, match="shard must be in 0..2"):
        ShardSpec(3, 3)
    with pytest.raises(BadInputError, match="n_shards must be an int >= 1"):
        ShardSpec(0, 0)


def test_three_shards_read_back_as_the_single_writer_cache(tmp_path):
    manifest = _manifest(tmp_path / "img", 11)
    whole = tmp_path / "whole.npz"
    compute_embeddings(manifest, _cfg(), whole, "train", "dv", "a1")
    reg = ArtifactRegistry(tmp_path / "root")
    summaries = _write_shards(reg, manifest, "train", 3)
    assert [s["rows"] for s in summaries] == [[0, 4], [4, 8], [8, 11]]
    one = read_embeddings(whole, "train")
    merged = read_split_embeddings(reg, "train")  # n_shards from shard 0's stamp
    assert isinstance(merged["features"], ConcatRows) and merged["features"].shape == (
        11, 3, 32, 32)
    assert int(merged["n_shards"]) == 3 and int(merged["n_rows"]) == 11
    for name in ("labels", "item_ids", "group_keys", "data_version", "assignment_version",
                 "kind", "backbone", "img_size", "n_views", "weights_sha256"):
        assert np.array_equal(merged[name], one[name]), name
    assert list(merged["item_ids"]) == list(manifest["item_id"])  # the manifest's order
    x, y = merged["features"], np.asarray(one["features"])
    assert np.array_equal(np.asarray(x), y)
    order = torch.randperm(11, generator=torch.Generator().manual_seed(0))
    assert np.array_equal(x[order], y[order.numpy()])  # a shuffled batch spans shards
    assert np.array_equal(x[3:9], y[3:9]) and np.array_equal(x[:, 0], y[:, 0])
    assert np.array_equal(x[5], y[5])


def test_more_shards_than_rows_leaves_empty_shards_that_merge_away(tmp_path):
    manifest = _manifest(tmp_path / "img", 2)
    reg = ArtifactRegistry(tmp_path / "root")
    summaries = _write_shards(reg, manifest, "val_test", 5)
    assert [s["rows"] for s in summaries] == [[0, 1], [1, 1], [1, 2], [2, 2], [2, 2]]
    assert [s["shape"][0] for s in summaries] == [1, 0, 1, 0, 0]
    merged = read_split_embeddings(reg, "val_test")
    assert len(merged["features"]) == 2 and list(merged["item_ids"]) == list(manifest["item_id"])
    empty = manifest.iloc[:0]
    _write_shards(reg, empty, "val_calib", 3)  # an empty split in three empty shards
    assert len(read_split_embeddings(reg, "val_calib")["features"]) == 0


def test_training_on_three_shards_equals_training_on_one(tmp_path):
    manifest = _manifest(tmp_path / "img", 24, seed=9)
    parts = {"train": manifest.iloc[:16].reset_index(drop=True),
             "val_select": manifest.iloc[16:].reset_index(drop=True)}
    weights = []
    for n in (1, 3):
        reg = ArtifactRegistry(tmp_path / f"root{n}")
        caches = {}
        for split, part in parts.items():
            _write_shards(reg, part, split, n)
            caches[split] = read_split_embeddings(reg, split)
        train_checkpoint(caches, _cfg(), reg.checkpoint)
        weights.append(load_checkpoint(reg.checkpoint)["model_state_dict"])
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_shard_remade_with_another_shard_count_is_refused(tmp_path):
    manifest = _manifest(tmp_path / "img", 9)
    reg = ArtifactRegistry(tmp_path / "root")
    _write_shards(reg, manifest, "val_calib", 3)
    before = {k: reg.embedding_shard("val_calib", k).read_bytes() for k in range(3)}
    compute_embedding_shard(manifest, _cfg(), reg.embedding_shard("val_calib", 1), "val_calib",
                            ShardSpec(2, 1), "dv", "a1")  # shard 1 of 2, over shard 1 of 3
    with pytest.raises(ArtifactIntegrityError) as err:
        read_split_embeddings(reg, "val_calib")
    text = str(err.value)
    assert "embeddings[1|val_calib]" in text and "has n_shards '2' but shard 0 has '3'" in text
    assert "re-materialize every shard of embeddings for split val_calib" in text
    # the definitions' count differs from the one the shards were made with
    with pytest.raises(ArtifactIntegrityError, match=r"embeddings\[0\|val_calib\] .* one of 3 "
                       r"shards, but 2 are read"):
        read_split_embeddings(reg, "val_calib", n_shards=2)
    # refusing damages nothing: shards 0 and 2 are as written
    assert all(reg.embedding_shard("val_calib", k).read_bytes() == before[k] for k in (0, 2))


def test_shard_of_another_manifest_version_is_refused(tmp_path):
    manifest = _manifest(tmp_path / "img", 9)
    reg = ArtifactRegistry(tmp_path / "root")
    _write_shards(reg, manifest, "train", 3)
    compute_embedding_shard(manifest, _cfg(), reg.embedding_shard("train", 2), "train",
                            ShardSpec(3, 2), "dv-new", "a1")
    with pytest.raises(ArtifactIntegrityError, match=r"embeddings\[2\|train\] at .*shard_2.npz "
                       r"has data_version 'dv-new' but shard 0 has 'dv'.*re-materialize every "
                       r"shard of embeddings for split train"):
        read_split_embeddings(reg, "train")


def test_cache_without_shard_stamps_or_missing_shard_is_refused(tmp_path):
    manifest = _manifest(tmp_path / "img", 4)
    reg = ArtifactRegistry(tmp_path / "root")
    compute_embeddings(manifest, _cfg(), reg.embedding_shard("train", 0), "train", "dv", "a1")
    with pytest.raises(ArtifactIntegrityError, match=r"embeddings\[0\|train\] .*carries no shard "
                       r"stamps .*written before embeddings were sharded"):
        read_split_embeddings(reg, "train")
    _write_shards(reg, manifest, "val_select", 2)
    reg.embedding_shard("val_select", 1).unlink()
    with pytest.raises(ArtifactIntegrityError, match=r"embeddings\[1\|val_select\] is missing"):
        read_split_embeddings(reg, "val_select")


def test_shard_written_by_other_code_is_refused(tmp_path, monkeypatch):
    """One shard re-made (from the UI) after a code edit: the stamps agree on everything
    but the code that wrote them, and the split is refused, not merged."""
    import roadwork_assets.core.training.pipeline as pipeline

    manifest = _manifest(tmp_path / "img", 6)
    reg = ArtifactRegistry(tmp_path / "root")
    _write_shards(reg, manifest, "train", 2)
    current = pipeline.code_version()
    monkeypatch.setattr(pipeline, "code_version", lambda: "edited0123456789")
    compute_embedding_shard(manifest, _cfg(), reg.embedding_shard("train", 1), "train",
                            ShardSpec(2, 1), "dv", "a1")
    with pytest.raises(ArtifactIntegrityError) as err:
        read_split_embeddings(reg, "train")
    text = str(err.value)
    assert (f"embeddings[1|train] at {reg.embedding_shard('train', 1)} has code_version "
            f"'edited0123456789' but shard 0 has '{current}'") in text
    assert ("re-materialize every shard of embeddings for split train with the current "
            "ROADWORK_EMBEDDING_SHARDS (`roadwork run` does it)") in text


def test_shard_stamped_with_another_split_is_refused(tmp_path):
    """A val_test shard found where train's shard 0 belongs (copied by hand, a bad path
    mapping) never reaches a train reader, even though its rows and shard stamps fit."""
    manifest = _manifest(tmp_path / "img", 5)
    reg = ArtifactRegistry(tmp_path / "root")
    compute_embedding_shard(manifest, _cfg(), reg.embedding_shard("train", 0), "val_test",
                            ShardSpec(1, 0), "dv", "a1")
    before = reg.embedding_shard("train", 0).read_bytes()
    with pytest.raises(ArtifactIntegrityError, match=r"embeddings\[0\|train\] at .*shard_0.npz "
                       r"is stamped split 'val_test', not 'train': re-materialize every shard "
                       r"of embeddings for split train"):
        read_split_embeddings(reg, "train", n_shards=1)
    assert reg.embedding_shard("train", 0).read_bytes() == before  # nothing damaged
