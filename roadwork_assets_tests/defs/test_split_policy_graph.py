"""Graph level: the readable split partitions of every asset, derived from the resolved
asset graph, equal the policy table in contracts/splits.py."""

from __future__ import annotations

import dagster as dg
import pytest

from roadwork_assets.contracts.errors import LeakageError
from roadwork_assets.contracts.splits import SPLIT_READ_POLICY, SPLITS
from roadwork_assets.definitions import ALL_ASSETS, build_definitions
from roadwork_assets.defs.leakage_audit import audit_split_reads, derived_split_reads
from roadwork_assets.defs.partitions import split_partitions
from roadwork_assets_tests.conftest import tiny_resources


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    return build_definitions(tiny_resources(tmp_path_factory.mktemp("g"))).resolve_asset_graph()


def test_derived_reads_match_policy_table_exactly(graph):
    assert audit_split_reads(graph) == []
    derived = derived_split_reads(graph)
    assert set(derived) == set(SPLIT_READ_POLICY), "every asset has a policy row and vice versa"
    # the table, spelled out: a change to either side must be deliberate
    assert derived["checkpoint"] == {None: {"train", "val_select"}}
    assert derived["adapted_backbone"] == {None: {"train"}}  # ExPLoRA: train images only
    assert derived["multiview_checkpoint"] == {None: {"train", "val_select"}}
    for fitted in ("thresholds", "gate_params", "conformal_sets", "cascade_policy"):
        assert derived[fitted] == {None: {"val_calib"}}
    assert derived["test_report"] == {None: {"val_test"}}
    assert derived["drift"] == {None: {"val_test"}}  # its reference: val_test, read only
    for per_split in ("embeddings", "logits", "multiview_views", "multiview_logits"):
        assert derived[per_split] == {s: {s} for s in SPLITS}
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
