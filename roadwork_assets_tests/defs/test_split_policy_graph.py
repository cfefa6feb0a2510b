"""Graph level: the readable split partitions of every asset, derived from the resolved
asset graph, equal the policy table in contracts/splits.py."""

from __future__ import annotations

import dagster as dg
import pytest

from roadwork_assets.contracts.errors import LeakageError
from roadwork_assets.contracts.splits import SPLIT_READ_POLICY, SPLITS
from roadwork_assets.definitions import ALL_ASSETS, build_definitions
from roadwork_assets.defs.leakage_audit import (
    audit_shard_mappings,
    audit_split_reads,
    derived_split_reads,
)
from roadwork_assets.defs.partitions import split_partitions
from roadwork_assets_tests.conftest import tiny_resources


@pytest.fixture(scope="module", params=[1, 3], ids=["1 shard", "3 shards"])
def graph(request, tmp_path_factory):
    """The resolved graph with ``embeddings`` in 1 and in 3 shards per split."""
    return build_definitions(tiny_resources(tmp_path_factory.mktemp("g")),
                             n_shards=request.param).resolve_asset_graph()


def _shards(graph) -> int:
    return len({k.split("|")[0] for k in
                graph.get(dg.AssetKey("embeddings")).partitions_def.get_partition_keys()})


def test_derived_reads_match_policy_table_exactly(graph):
    assert audit_split_reads(graph) == []
    assert audit_shard_mappings(graph) == []
    derived = derived_split_reads(graph)
    n = _shards(graph)
    assert set(derived) == set(SPLIT_READ_POLICY), "every asset has a policy row and vice versa"
    # the table, spelled out: a change to either side must be deliberate
    assert derived["checkpoint"] == {None: {"train", "val_select"}}
    assert derived["adapted_backbone"] == {None: {"train"}}  # ExPLoRA: train images only
    assert derived["multiview_checkpoint"] == {None: {"train", "val_select"}}
    for fitted in ("thresholds", "gate_params", "conformal_sets", "cascade_policy"):
        assert derived[fitted] == {None: {"val_calib"}}
    assert derived["test_report"] == {None: {"val_test"}}
    assert derived["drift"] == {None: {"val_test"}}  # its reference: val_test, read only
    for per_split in ("logits", "multiview_views", "multiview_logits"):
        assert derived[per_split] == {s: {s} for s in SPLITS}
    # each shard of a split reads that split's manifest, nothing else
    assert derived["embeddings"] == {f"{k}|{s}": {s} for s in SPLITS for k in range(n)}
    for reads_none in ("source_images", "bundle", "label_queue"):
        assert derived[reads_none] == {None: set()}
    # the splitter reads the full table: every split, and it is the only one allowed to
    assert derived["split_assignment"] == {None: set(SPLITS)}
    assert derived["split_manifest"] == {s: set(SPLITS) for s in SPLITS}


def _sneaky_asset(mapping):
    @dg.asset(name="thresholds", ins={"logits": dg.AssetIn(partition_mapping=mapping)})
    def sneaky(logits):
        return None

    return sneaky


def _graph_with(replacement, root):
    assets = [a for a in ALL_ASSETS if "thresholds" not in
              {k.to_user_string() for k in a.keys}] + [replacement]
    return dg.Definitions(assets=assets, resources=tiny_resources(root)).resolve_asset_graph()


def test_policy_fitter_reading_all_splits_fails_naming_asset_and_split(tmp_path):
    problems = audit_split_reads(_graph_with(_sneaky_asset(dg.AllPartitionMapping()), tmp_path))
    text = "\n".join(problems)
    for split in ("train", "val_select", "val_test"):
        assert f"asset 'thresholds' can read split '{split}'" in text
    assert "can read split 'val_calib'" not in text


def test_policy_fitter_reading_test_split_instead_fails(tmp_path):
    problems = audit_split_reads(_graph_with(
        _sneaky_asset(dg.SpecificPartitionsPartitionMapping(["val_test"])), tmp_path))
    assert any("'thresholds' can read split 'val_test'" in p for p in problems)
    assert any("policy allows split 'val_calib' but the graph never reads it" in p
               for p in problems)


def test_policy_fitter_reading_the_full_split_table_fails(tmp_path):
    @dg.asset(name="thresholds", ins={"split_assignment": dg.AssetIn()})
    def peeks_at_labels(split_assignment):
        return None

    problems = audit_split_reads(_graph_with(peeks_at_labels, tmp_path))
    assert any("'thresholds' can read split 'val_test'" in p for p in problems)


def test_unlisted_asset_reading_splits_is_refused_at_definitions_time(tmp_path, monkeypatch):
    @dg.asset(name="peek_at_test", partitions_def=split_partitions,
              ins={"logits": dg.AssetIn()})
    def peek(logits):
        return None

    import roadwork_assets.definitions as d

    monkeypatch.setattr(d, "ALL_ASSETS", [*ALL_ASSETS, peek])
    with pytest.raises(LeakageError, match="'peek_at_test' is not in SPLIT_READ_POLICY"):
        d.build_definitions(tiny_resources(tmp_path))


def test_readers_load_every_shard_of_their_splits_only(graph):
    """The partitions each reader of the sharded embeddings loads, from the graph."""
    n = _shards(graph)
    emb = dg.AssetKey("embeddings")

    def reads(child: str, own: str | None) -> set[str]:
        result = graph.get_parent_partition_keys_for_child(own, emb, dg.AssetKey(child))
        return set(result.partitions_subset.get_partition_keys())

    assert reads("checkpoint", None) == {f"{k}|{s}" for s in ("train", "val_select")
                                         for k in range(n)}
    assert reads("adapted_backbone", None) == {f"{k}|train" for k in range(n)}
    for split in SPLITS:
        for child in ("logits", "multiview_views"):
            assert reads(child, split) == {f"{k}|{split}" for k in range(n)}


def _graph_replacing(name: str, reader, root, n_shards: int = 3):
    """The graph at ``n_shards`` with asset ``name`` replaced by ``reader`` (added after
    the shard count is set, so its mapping stays exactly as written)."""
    from roadwork_assets.defs.partitions import with_shards

    kept = [a for a in ALL_ASSETS if name not in {k.to_user_string() for k in a.keys}]
    return dg.Definitions(assets=[*with_shards(kept, n_shards), reader],
                          resources=tiny_resources(root)).resolve_asset_graph()


@pytest.mark.parametrize("mapping", [
    dg.AllPartitionMapping(),
    dg.SpecificPartitionsPartitionMapping(["0|val_calib", "1|val_calib", "2|val_calib"]),
], ids=["all partitions", "another split's shards"])
def test_split_partitioned_reader_of_shards_must_keep_its_split(tmp_path, mapping, monkeypatch):
    @dg.asset(name="logits", partitions_def=split_partitions,
              ins={"embeddings": dg.AssetIn(partition_mapping=mapping)})
    def leaky(embeddings):
        return None

    graph = _graph_replacing("logits", leaky, tmp_path)
    text = "\n".join(audit_shard_mappings(graph))
    assert f"asset 'logits' reads 'embeddings' through {type(mapping).__name__}" in text
    assert "does not pin the split dimension" in text
    assert "asset 'logits[train]' reads embeddings partitions of another split" in text
    # and the split audit, which counts a shard as its split, names the split it leaks
    assert any("asset 'logits' partition 'train' can read split 'val_calib'" in p
               for p in audit_split_reads(graph))
    import roadwork_assets.definitions as d

    kept = [a for a in ALL_ASSETS if "logits" not in {k.to_user_string() for k in a.keys}]
    monkeypatch.setattr(d, "ALL_ASSETS", [*kept, leaky])
    with pytest.raises(LeakageError, match="does not pin the split dimension"):
        d.build_definitions(tiny_resources(tmp_path), n_shards=3)


def test_reader_of_some_shards_of_a_split_is_refused(tmp_path):
    @dg.asset(name="thresholds", ins={"embeddings": dg.AssetIn(
        partition_mapping=dg.SpecificPartitionsPartitionMapping(["0|val_calib", "1|val_calib"]))})
    def partial(embeddings):  # shard 2 of val_calib is never read: rows silently missing
        return None

    problems = audit_shard_mappings(_graph_replacing("thresholds", partial, tmp_path))
    assert problems == ["asset 'thresholds' reads only some shards of embeddings[val_calib] "
                        "(not ['2|val_calib']): a reader must read every shard of a split"]


def test_shards_of_widens_a_split_mapping_to_every_shard():
    from roadwork_assets.defs.partitions import MODEL_FITTING_SPLITS, shards_of, with_shards

    assert shards_of(MODEL_FITTING_SPLITS, 2).partition_keys == [
        "0|train", "1|train", "0|val_select", "1|val_select"]
    # with_shards re-cuts a mapping over shard keys to the loaded count, never a partial one
    @dg.asset(name="thresholds", ins={"embeddings": dg.AssetIn(
        partition_mapping=dg.SpecificPartitionsPartitionMapping(["0|val_calib"]))})
    def reader(embeddings):
        return None

    (resharded,) = with_shards([reader], 3)
    (dep,) = resharded.specs_by_key[dg.AssetKey("thresholds")].deps
    assert dep.partition_mapping.partition_keys == ["0|val_calib", "1|val_calib", "2|val_calib"]
