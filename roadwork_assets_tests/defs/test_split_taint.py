"""Taint: a derived asset carries the splits whose content made it, and an asset whose role
may never see a split is refused when something it reads or loads carries that split —
at definition time (graph audit in build_definitions) and at run time (the blocking
split_reads_allowed check)."""

import dagster as dg
import numpy as np
import pytest

from roadwork_assets.contracts.errors import LeakageError
from roadwork_assets.contracts.splits import (
    CARRIES_OWN_SPLIT,
    NEVER_CARRY_BY_ROLE,
    ROLE_MODEL_FITTING,
    ROLE_POLICY_FITTING,
    SPLIT_READ_POLICY,
    SPLITS,
    ReadRule,
    _rule,
)
from roadwork_assets.core.artifacts import ArtifactRegistry, atomic_write_npz
from roadwork_assets.definitions import ALL_ASSETS, build_definitions
from roadwork_assets.defs.io_manager import RegistryIOManager
from roadwork_assets.defs.leakage_audit import audit_taint, carried_splits
from roadwork_assets.defs.partitions import (
    FINAL_EVALUATION_SPLITS,
    MODEL_FITTING_SPLITS,
    POLICY_FITTING_SPLITS,
    shards_of,
    split_partitions,
)
from roadwork_assets.defs.resources import ArtifactRegistryResource
from roadwork_assets.defs.split_reads import (
    SPLIT_READS_CHECK,
    drain_reads,
    split_reads_check_spec,
    split_reads_result,
)
from roadwork_assets_tests.conftest import tiny_resources


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    return build_definitions(tiny_resources(tmp_path_factory.mktemp("t"))).resolve_asset_graph()


def _splits(carried, asset, partition=None) -> set[str]:
    return set(carried[asset][partition])


def test_real_graph_taint_is_transitive_and_accepted(graph):
    carried = carried_splits(graph)
    assert audit_taint(graph, carried) == []
    assert _splits(carried, "source_images") == set(SPLITS)  # every split's rows
    for s in SPLITS:  # the splitter narrows the full table to one split's rows
        assert _splits(carried, "split_manifest", s) == {s}
        assert _splits(carried, "embeddings", f"0|{s}") == {s}  # shard 0 of 1 (the default)
        assert _splits(carried, "logits", s) == {"train", "val_select", s}
        assert _splits(carried, "multiview_views", s) == {"train", "val_select", s}
        assert _splits(carried, "multiview_logits", s) == {"train", "val_select", s}
    assert _splits(carried, "adapted_backbone") == {"train"}
    assert _splits(carried, "checkpoint") == {"train", "val_select"}
    assert _splits(carried, "multiview_checkpoint") == {"train", "val_select"}
    for policy in ("thresholds", "gate_params", "conformal_sets", "cascade_policy"):
        assert _splits(carried, policy) == {"train", "val_select", "val_calib"}
    assert _splits(carried, "bundle") == {"train", "val_select", "val_calib"}
    assert _splits(carried, "test_report") == set(SPLITS)
    # where the taint came from, as a chain a person can follow
    assert carried["test_report"][None]["val_test"] == "test_report <- logits[val_test]"
    assert carried["thresholds"][None]["train"] == (
        "thresholds <- logits[val_calib] <- checkpoint <- embeddings[0|train]")


def test_sharded_graph_taint_counts_each_shard_as_its_split(tmp_path):
    graph = build_definitions(tiny_resources(tmp_path), n_shards=3).resolve_asset_graph()
    carried = carried_splits(graph)
    assert audit_taint(graph, carried) == []
    for s in SPLITS:
        for k in range(3):
            assert carried["embeddings"][f"{k}|{s}"] == {
                s: f"embeddings[{k}|{s}] <- split_manifest[{s}]"}
        assert _splits(carried, "logits", s) == {"train", "val_select", s}
    assert _splits(carried, "checkpoint") == {"train", "val_select"}
    assert carried["checkpoint"][None]["val_select"] == "checkpoint <- embeddings[0|val_select]"


def test_never_carry_is_derived_from_the_role():
    for model in ("adapted_backbone", "checkpoint", "multiview_checkpoint"):
        assert SPLIT_READ_POLICY[model].never_carry == {"val_calib", "val_test"}
    for policy in ("thresholds", "gate_params", "conformal_sets", "cascade_policy"):
        assert SPLIT_READ_POLICY[policy].never_carry == {"val_test"}
    assert SPLIT_READ_POLICY["bundle"].never_carry == {"val_test"}
    # a future asset only names its role
    assert _rule(ROLE_MODEL_FITTING, "multi-view", "train", "val_select").never_carry \
        == NEVER_CARRY_BY_ROLE[ROLE_MODEL_FITTING]


def test_only_the_splitter_may_narrow_its_taint():
    with pytest.raises(LeakageError, match="only the splitter selects one split's rows"):
        ReadRule(role=ROLE_POLICY_FITTING, may_read=frozenset({"val_calib"}), reason="x",
                 carries=CARRIES_OWN_SPLIT)


def _with(monkeypatch, name: str, rule: ReadRule, asset, replace: bool = False) -> None:
    """Add ``asset`` to the graph, or with ``replace`` put it in place of the real one."""
    import roadwork_assets.definitions as d

    monkeypatch.setitem(SPLIT_READ_POLICY, name, rule)
    kept = [a for a in ALL_ASSETS
            if not (replace and name in {k.to_user_string() for k in a.keys})]
    monkeypatch.setattr(d, "ALL_ASSETS", [*kept, asset])


def test_policy_fitter_taking_test_report_as_input_is_refused_at_definition_time(
        tmp_path, monkeypatch):
    # reads only val_calib partitions, so the direct-read audit alone would pass it
    @dg.asset(name="cascade", ins={"logits": dg.AssetIn(partition_mapping=POLICY_FITTING_SPLITS),
                                   "test_report": dg.AssetIn()})
    def cascade(logits, test_report):
        return None

    _with(monkeypatch, "cascade", _rule(ROLE_POLICY_FITTING, "stage-2 exit", "val_calib"),
          cascade)
    import roadwork_assets.definitions as d

    with pytest.raises(LeakageError) as err:
        d.build_definitions(tiny_resources(tmp_path))
    text = str(err.value)
    assert ("asset 'cascade' input 'test_report' carries split 'val_test' "
            "(taint: test_report <- logits[val_test])") in text
    assert "policy fitting may never see ['val_test']" in text
    assert "input 'logits[val_calib]'" not in text  # its legitimate input is not blamed


def test_checkpoint_like_asset_reading_thresholds_is_refused(tmp_path, monkeypatch):
    @dg.asset(name="multiview_checkpoint",
              ins={"embeddings": dg.AssetIn(partition_mapping=shards_of(MODEL_FITTING_SPLITS)),
                   "thresholds": dg.AssetIn()})
    def multiview_checkpoint(embeddings, thresholds):
        return None

    _with(monkeypatch, "multiview_checkpoint",
          _rule(ROLE_MODEL_FITTING, "views + aggregator", "train", "val_select"),
          multiview_checkpoint, replace=True)
    import roadwork_assets.definitions as d

    with pytest.raises(LeakageError) as err:
        d.build_definitions(tiny_resources(tmp_path))
    text = str(err.value)
    assert ("asset 'multiview_checkpoint' input 'thresholds' carries split 'val_calib' "
            "(taint: thresholds <- logits[val_calib])") in text
    # thresholds carries train / val_select too (via checkpoint): allowed for model fitting
    assert "carries split 'train'" not in text and "carries split 'val_select'" not in text


def test_bundle_depending_on_anything_tainted_by_val_test_is_refused(tmp_path):
    @dg.asset(name="bundle", deps=["checkpoint", "thresholds", "test_peek"])
    def bundle():
        return None

    # not named "drift": the real drift asset (final evaluation, reads val_test) exists
    @dg.asset(name="test_peek",
              deps=[dg.AssetDep("logits", partition_mapping=FINAL_EVALUATION_SPLITS)])
    def test_peek():
        return None

    assets = [a for a in ALL_ASSETS if "bundle" not in {k.to_user_string() for k in a.keys}]
    g = dg.Definitions(assets=[*assets, bundle, test_peek],
                       resources=tiny_resources(tmp_path)).resolve_asset_graph()
    problems = audit_taint(g)
    assert problems[0] == (
        "asset 'bundle' input 'test_peek' carries split 'val_test' (taint: test_peek <- "
        "logits[val_test]); export may never see ['val_test'], not even through a derived "
        "asset: remove that input, or re-derive it without 'val_test'")
    # and every reader of the bundle that may never see val_test is refused with it
    readers = {p.split("'")[1] for p in problems[1:]}
    assert "label_queue" in readers  # (and bundle_int8, whose policy row forbids it too)
    assert all("input 'bundle' carries split 'val_test'" in p for p in problems[1:])


# ----------------------------------------------------------------------------- run time
@dg.asset(name="logits", partitions_def=split_partitions)
def _logits_stub():  # identity and lineage only: never executed
    raise AssertionError("not materialized in this test")


def _test_report_stub(path):
    @dg.asset(name="test_report",
              deps=[dg.AssetDep("logits", partition_mapping=FINAL_EVALUATION_SPLITS)])
    def test_report():
        return path  # a previous evaluation's artifact, already on disk

    return test_report


def _thresholds(peek: bool):
    @dg.asset(name="thresholds",
              ins={"logits": dg.AssetIn(partition_mapping=POLICY_FITTING_SPLITS)},
              check_specs=[split_reads_check_spec("thresholds")])
    def thresholds(context: dg.AssetExecutionContext, logits):
        if peek:  # no graph edge to test_report: only the run-time ledger sees this
            context.load_asset_value(dg.AssetKey("test_report"))
        meta, check = split_reads_result(context)
        yield dg.Output(None, metadata=meta)
        yield check

    return thresholds


@dg.asset(name="downstream", deps=["thresholds"])
def _downstream():
    return None


def _run(tmp_path, peek: bool):
    reg = ArtifactRegistry(tmp_path)
    atomic_write_npz(reg.logits("val_calib"), logits=np.zeros((4, 1, 2), np.float32),
                     labels=np.array([0, 1, 0, 1], np.int8))
    reg.test_report.parent.mkdir(parents=True, exist_ok=True)
    reg.test_report.write_text("{}")
    drain_reads()
    # one run holds thresholds and test_report, as the runner's policy/report stage does
    return dg.materialize(
        [_logits_stub, _test_report_stub(reg.test_report), _thresholds(peek), _downstream],
        selection=["thresholds", "test_report", "downstream"],
        resources={"io_manager": RegistryIOManager(
            artifacts=ArtifactRegistryResource(root=str(tmp_path)))},
        raise_on_error=False,
    )


def _check(result) -> dg.AssetCheckEvaluation:
    (ev,) = [e for e in result.get_asset_check_evaluations() if e.check_name == SPLIT_READS_CHECK]
    return ev


def _materialized(result) -> set[str]:
    return {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}


def test_policy_loading_test_report_at_run_time_fails_its_check_and_stops_downstream(tmp_path):
    result = _run(tmp_path, peek=True)
    ev = _check(result)
    assert not ev.passed
    assert ev.metadata["forbidden"].value == []  # no val_test *partition* was read ...
    assert ev.metadata["tainted_loads"].value == [  # ... but test_report carries it
        ("thresholds loaded 'test_report', which carries split 'val_test' (taint: "
         "test_report <- logits[val_test]); policy fitting may never see ['val_test']: "
         "stop loading it")]
    assert "val_test" in ev.metadata["splits_carried"].value
    assert "downstream" not in _materialized(result)


def test_policy_without_the_peek_passes_and_records_its_taint(tmp_path):
    result = _run(tmp_path, peek=False)
    ev = _check(result)
    assert ev.passed, ev.description
    assert ev.metadata["splits_carried"].value == ["val_calib"]
    assert "downstream" in _materialized(result)
    (mat,) = [e for e in result.get_asset_materialization_events()
              if e.asset_key.to_user_string() == "thresholds"]
    carried = mat.materialization.metadata["splits_carried"].value
    assert carried == {"val_calib": "thresholds <- logits[val_calib]"}


def test_policy_fitted_on_val_select_scores_through_a_derived_asset_is_refused(
        tmp_path, monkeypatch):
    """Content vs lineage: every policy carries train + val_select through `checkpoint` (the
    model was fitted on them), which is fine; a policy that reads an asset derived from
    val_select's *scores* would be fitted on model-selection data and is refused."""
    import roadwork_assets.definitions as d
    from roadwork_assets.contracts.splits import ROLE_INFERENCE

    @dg.asset(name="val_select_scores",
              ins={"logits": dg.AssetIn(
                  partition_mapping=dg.SpecificPartitionsPartitionMapping(["val_select"]))})
    def val_select_scores(logits):
        return None

    @dg.asset(name="cascade", ins={"logits": dg.AssetIn(partition_mapping=POLICY_FITTING_SPLITS),
                                   "val_select_scores": dg.AssetIn()})
    def cascade(logits, val_select_scores):
        return None

    monkeypatch.setitem(SPLIT_READ_POLICY, "val_select_scores",
                        _rule(ROLE_INFERENCE, "scores of val_select", "val_select"))
    monkeypatch.setitem(SPLIT_READ_POLICY, "cascade",
                        _rule(ROLE_POLICY_FITTING, "stage-2 exit", "val_calib"))
    monkeypatch.setattr(d, "ALL_ASSETS", [*ALL_ASSETS, val_select_scores, cascade])
    with pytest.raises(LeakageError) as err:
        d.build_definitions(tiny_resources(tmp_path))
    text = str(err.value)
    assert ("asset 'cascade' input 'val_select_scores' carries the content of split "
            "'val_select' (taint: val_select_scores <- logits[val_select])") in text
    assert "input 'logits[val_calib]'" not in text  # lineage through the checkpoint is fine


def test_real_policies_carry_train_and_val_select_only_as_model_lineage(graph):
    content = carried_splits(graph, content=True)
    assert set(content["thresholds"][None]) == {"val_calib"}
    assert set(content["test_report"][None]) == {"val_calib", "val_test"}


def test_run_time_check_names_val_select_content_loaded_by_a_policy(graph):
    from roadwork_assets.defs.leakage_audit import tainted_loads

    _, problems = tainted_loads(graph, "thresholds", None, [("logits", "val_calib")])
    assert problems == []
    _, problems = tainted_loads(graph, "thresholds", None, [("logits", "val_select")])
    assert any("carries the content of split 'val_select'" in p for p in problems)
