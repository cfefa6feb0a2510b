"""adapted_backbone (ExPLoRA) reads the train split only: the policy row, the graph's
partition mapping and the taint audit all say so, and a version of it that reads
val_select or takes a val_calib-tainted input is refused at definition time."""

from __future__ import annotations

import dagster as dg
import pytest

from roadwork_assets.contracts.errors import LeakageError
from roadwork_assets.contracts.splits import ROLE_MODEL_FITTING, SPLIT_READ_POLICY
from roadwork_assets.definitions import ALL_ASSETS, build_definitions
from roadwork_assets.defs.leakage_audit import audit_split_reads, audit_taint, carried_splits
from roadwork_assets.defs.partitions import MODEL_FITTING_SPLITS, TRAIN_ONLY, shards_of
from roadwork_assets_tests.conftest import tiny_resources


def _replace_adapted(asset) -> list:
    return [a for a in ALL_ASSETS
            if "adapted_backbone" not in {k.to_user_string() for k in a.keys}] + [asset]


def test_policy_row_is_model_fitting_on_train_only():
    rule = SPLIT_READ_POLICY["adapted_backbone"]
    assert rule.role == ROLE_MODEL_FITTING
    assert rule.may_read == {"train"}
    assert rule.never_carry == {"val_calib", "val_test"}


def test_real_graph_reads_train_and_checkpoint_carries_only_model_fitting_splits(tmp_path):
    graph = build_definitions(tiny_resources(tmp_path)).resolve_asset_graph()
    assert audit_split_reads(graph) == [] and audit_taint(graph) == []
    carried = carried_splits(graph)
    assert set(carried["adapted_backbone"][None]) == {"train"}
    assert carried["adapted_backbone"][None]["train"] == "adapted_backbone <- embeddings[0|train]"
    assert set(carried["checkpoint"][None]) == {"train", "val_select"}


def test_adapted_backbone_reading_val_select_is_refused(tmp_path):
    @dg.asset(name="adapted_backbone",
              ins={"embeddings": dg.AssetIn(partition_mapping=shards_of(MODEL_FITTING_SPLITS))})
    def sneaky(embeddings):
        return None

    defs = dg.Definitions(assets=_replace_adapted(sneaky), resources=tiny_resources(tmp_path))
    problems = "\n".join(audit_split_reads(defs.resolve_asset_graph()))
    assert "asset 'adapted_backbone' can read split 'val_select'" in problems


def test_adapted_backbone_fed_from_val_calib_content_is_refused_by_the_taint_audit(
        tmp_path, monkeypatch):
    """Through an unpartitioned asset of val_calib images (a stand-in for an "unlabelled
    pool" built from the wrong split), not through a partition read."""
    import roadwork_assets.definitions as d
    from roadwork_assets.contracts.splits import ROLE_FEATURES, _rule
    from roadwork_assets.defs.partitions import POLICY_FITTING_SPLITS

    @dg.asset(name="calib_pool", ins={"embeddings": dg.AssetIn(
        partition_mapping=shards_of(POLICY_FITTING_SPLITS))})
    def calib_pool(embeddings):
        return None

    @dg.asset(name="adapted_backbone",
              ins={"embeddings": dg.AssetIn(partition_mapping=shards_of(TRAIN_ONLY))},
              deps=["calib_pool"])
    def tainted(embeddings):
        return None

    monkeypatch.setitem(SPLIT_READ_POLICY, "calib_pool",
                        _rule(ROLE_FEATURES, "val_calib images", "val_calib"))
    monkeypatch.setattr(d, "ALL_ASSETS", [*_replace_adapted(tainted), calib_pool])
    with pytest.raises(LeakageError, match="asset 'adapted_backbone' input 'calib_pool' "
                                           "carries split 'val_calib'"):
        build_definitions(tiny_resources(tmp_path))
