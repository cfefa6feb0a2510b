"""Run level: an asset that loads a forbidden partition some other way than its declared
inputs (here ``context.load_asset_value(..., partition_key="val_test")``) is caught by the
blocking split_reads_allowed check, and nothing downstream runs."""


import dagster as dg
import numpy as np

from roadwork_assets.core.artifacts import ArtifactRegistry, atomic_write_npz
from roadwork_assets.defs.io_manager import RegistryIOManager
from roadwork_assets.defs.partitions import POLICY_FITTING_SPLITS, split_partitions
from roadwork_assets.defs.resources import ArtifactRegistryResource
from roadwork_assets.defs.split_reads import (
    SPLIT_READS_CHECK,
    drain_reads,
    split_reads_check_spec,
    split_reads_result,
)


def _write_logits(reg: ArtifactRegistry, split: str) -> None:
    atomic_write_npz(reg.logits(split), logits=np.zeros((4, 1, 2), np.float32),
                     labels=np.array([0, 1, 0, 1], np.int8),
                     item_ids=np.array([f"{split}-{i}" for i in range(4)]),
                     split=np.array(split))


@dg.asset(name="logits", partitions_def=split_partitions)
def _logits_stub():  # the real asset's identity is all this test needs: never executed
    raise AssertionError("not materialized in this test")


def _thresholds(peek: bool):
    @dg.asset(
        name="thresholds",
        ins={"logits": dg.AssetIn(partition_mapping=POLICY_FITTING_SPLITS)},
        check_specs=[split_reads_check_spec("thresholds")],
    )
    def thresholds(context: dg.AssetExecutionContext, logits):
        assert set(logits) == {"val_calib"}
        if peek:
            context.load_asset_value(dg.AssetKey("logits"), partition_key="val_test")
        meta, check = split_reads_result(context)
        yield dg.Output(None, metadata=meta)
        yield check

    return thresholds


@dg.asset(name="downstream", deps=["thresholds"])
def _downstream():
    return None


def _run(tmp_path, peek: bool):
    reg = ArtifactRegistry(tmp_path)
    for split in ("val_calib", "val_test"):
        _write_logits(reg, split)
    drain_reads()
    return dg.materialize(
        [_logits_stub, _thresholds(peek), _downstream],
        selection=["thresholds", "downstream"],
        resources={"io_manager": RegistryIOManager(
            artifacts=ArtifactRegistryResource(root=str(tmp_path)))},
        raise_on_error=False,
    )


def _check(result) -> dg.AssetCheckEvaluation:
    (ev,) = [e for e in result.get_asset_check_evaluations() if e.check_name == SPLIT_READS_CHECK]
    return ev


def test_declared_reads_only_pass(tmp_path):
    result = _run(tmp_path, peek=False)
    ev = _check(result)
    assert ev.passed
    assert ev.metadata["splits_read"].value == ["val_calib"]
    assert {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()} \
        == {"thresholds", "downstream"}


def test_peeking_at_val_test_fails_the_blocking_check_and_stops_downstream(tmp_path):
    result = _run(tmp_path, peek=True)
    ev = _check(result)
    assert not ev.passed
    assert ev.metadata["forbidden"].value == ["val_test"]
    assert "read forbidden split partition(s) ['val_test']" in ev.description
    materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert "downstream" not in materialized


def test_reads_left_by_a_failed_step_are_not_blamed_on_the_next_one():
    from roadwork_assets.defs.split_reads import record_read

    drain_reads()
    record_read("logits", "val_test", "test_report")  # that step failed before draining
    record_read("logits", "val_calib", "thresholds")
    record_read("logits", "train", None)  # an ad-hoc load: counts for the draining step
    assert drain_reads("thresholds") == [("logits", "val_calib"), ("logits", "train")]
    assert drain_reads("anything") == []
