"""Asset level: the policy asset whose fit fails for a data reason still materializes an
`UnfittedPolicy` record, the bundle of another policy still builds, and the bundle
configured to ship the unfitted one fails with a one-line reason."""

from __future__ import annotations

import json

import dagster as dg
import numpy as np

from roadwork_assets.contracts.policy_schemas import (
    SoftmaxPolicyParams,
    UnfittedPolicy,
    parse_policy,
    parse_policy_artifact,
)
from roadwork_assets.core.artifacts import (
    ArtifactRegistry,
    atomic_write_npz,
    file_sha256,
)
from roadwork_assets.defs.export.assets import bundle
from roadwork_assets.defs.io_manager import RegistryIOManager
from roadwork_assets.defs.partitions import split_partitions
from roadwork_assets.defs.policy.assets import policy_assets
from roadwork_assets.defs.resources import ArtifactRegistryResource, ExitPolicyResource
from roadwork_assets.defs.split_reads import drain_reads
from roadwork_assets.defs.tracking import MlflowTracking
from roadwork_assets_tests.core.calibration.test_unfitted_policies import (
    _checkpoint,
    _few_negatives,
)


@dg.asset(name="logits", partitions_def=split_partitions)
def _logits_stub():
    raise AssertionError("not materialized in this test")


@dg.asset(name="checkpoint")
def _checkpoint_stub():
    raise AssertionError("not materialized in this test")


def _materialize(root, bundle_policy):
    drain_reads()
    artifacts = ArtifactRegistryResource(root=str(root))
    return dg.materialize(
        [_logits_stub, _checkpoint_stub, *policy_assets, bundle],
        selection=["thresholds", "gate_params", "conformal_sets", "bundle"],
        resources={"io_manager": RegistryIOManager(artifacts=artifacts), "artifacts": artifacts,
                   "exit_policy": ExitPolicyResource(alpha=0.05, bundle_policy=bundle_policy,
                                                     export_onnx=False),
                   "mlflow": MlflowTracking(
                       tracking_uri=ArtifactRegistry(root).mlflow_tracking_uri,
                       artifact_root=str(ArtifactRegistry(root).mlflow_artifact_root))},
        raise_on_error=False,
    )


def test_assets_record_the_unfitted_policy_and_bundle_the_configured_one(tmp_path):
    reg = ArtifactRegistry(tmp_path)
    _checkpoint(reg)
    logits, y, ids = _few_negatives()
    atomic_write_npz(reg.logits("val_calib"), logits=logits.astype(np.float32), labels=y.astype(np.int8),
                     item_ids=np.array(ids), group_keys=np.array(ids), split=np.array("val_calib"),
                     data_version=np.array("v" * 64),
                     checkpoint_sha256=np.array(file_sha256(reg.checkpoint)))
    result = _materialize(tmp_path, "softmax")
    done = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert {"thresholds", "gate_params", "conformal_sets", "bundle"} <= done
    scrc = parse_policy_artifact(json.loads(reg.policy("scrc").read_text()))
    assert isinstance(scrc, UnfittedPolicy) and "needs at least 19" in scrc.reason
    assert isinstance(parse_policy(json.loads(reg.policy("softmax").read_text())), SoftmaxPolicyParams)

    result = _materialize(tmp_path, "scrc")
    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert failure.step_key == "bundle"
    assert "cannot bundle policy 'scrc': `conformal_sets` could not be fitted" in str(
        failure.event_specific_data.error)
