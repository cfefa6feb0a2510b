"""The bundle: checkpoint + exactly one policy (chosen by config) + ONNX, hashed."""


import dagster as dg

from roadwork_assets.contracts.errors import ArtifactIntegrityError
from roadwork_assets.contracts.policy_schemas import POLICY_ASSET_NAMES
from roadwork_assets.core.artifacts import code_version
from roadwork_assets.core.export.bundle import build_bundle, verify_bundle
from roadwork_assets.defs.asset_paths import asset_path
from roadwork_assets.defs.promotion import LatestBundle, materialize_result
from roadwork_assets.defs.resources import ArtifactRegistryResource, ExitPolicyResource
from roadwork_assets.defs.split_reads import split_reads_check_spec, split_reads_result
from roadwork_assets.defs.tracking import MlflowTracking, log_bundle

BUNDLE_CHECK = "one_policy_and_hashes_match"
ONNX_CHECK = "onnx_matches_torch"
POLICY_ASSET = POLICY_ASSET_NAMES


@dg.asset(
    group_name="export",
    deps=["checkpoint", "multiview_checkpoint", *POLICY_ASSET_NAMES.values()],
    code_version=code_version(),
    check_specs=[
        split_reads_check_spec("bundle"),
        dg.AssetCheckSpec(BUNDLE_CHECK, asset="bundle", blocking=True,
                          description="closed bundle (plain names, nothing unlisted, no "
                          "symlinks); exactly one policy; every sha256 matches; policy and "
                          "provenance name this checkpoint; torch and ONNX reproduce the "
                          "stored probe outputs (the checks `roadwork verify` runs)"),
        dg.AssetCheckSpec(ONNX_CHECK, asset="bundle", blocking=True,
                          description="ONNX Runtime serves the same probability and decision "
                          "as torch under the bundle's policy, within the model's fp32 tolerance"),
    ],
    description="Deployable bundle: checkpoint + the ONE configured exit policy (the "
    "cascade by default, with stage 2's artifact and ONNX) + ONNX export + sha256 "
    "manifest; `roadwork predict` and `roadwork verify` read it.",
)
def bundle(
    context: dg.AssetExecutionContext,
    artifacts: ArtifactRegistryResource,
    exit_policy: ExitPolicyResource,
    mlflow: MlflowTracking,
):
    reg = artifacts.registry
    policy_asset = POLICY_ASSET[exit_policy.bundle_policy]
    directory, manifest, extra = build_bundle(
        reg.bundles_dir,
        checkpoint_path=asset_path(reg, "checkpoint"),
        policy_path=asset_path(reg, policy_asset),
        policy_asset=policy_asset,
        export_onnx_model=exit_policy.export_onnx,
        # a cascade ships stage 2 as well: its artifact, and its network as ONNX
        stage2_path=(asset_path(reg, "multiview_checkpoint")
                     if exit_policy.bundle_policy == "cascade" else None),
    )
    report = extra.pop("onnx_parity", None)  # core.export.onnx_export.ParityReport
    try:
        verify_bundle(directory)
        verified = dg.AssetCheckResult(check_name=BUNDLE_CHECK, passed=True,
                                       metadata={"n_files": len(manifest.files)})
    except ArtifactIntegrityError as exc:
        verified = dg.AssetCheckResult(check_name=BUNDLE_CHECK, passed=False, description=str(exc))
    parity = dg.AssetCheckResult(
        check_name=ONNX_CHECK,
        passed=report is None or report.passed,
        description="ONNX export disabled" if report is None else report.summary(),
        metadata={} if report is None else {
            k: dg.MetadataValue.float(v) for k, v in report.metadata().items()},
    )
    # registered in MLflow, like `LATEST`, only when it passed its checks, the
    # split-read check included (taken here, before registering)
    reads = split_reads_result(context)
    run_id, version = log_bundle(mlflow, context, directory,
                                 register=verified.passed and parity.passed
                                 and reads[1].passed,
                                 metrics={f"probe.{k}": v for k, v in extra.items()})
    # serving (`LATEST`) switches only to a bundle that passed its checks
    latest = LatestBundle(asset_path(reg, "bundle"), manifest.bundle_id, directory)
    return materialize_result(
        context, latest, data_version=manifest.provenance.data_version,
        checks=[verified, parity], reads=reads,
        metadata={
            "bundle_id": manifest.bundle_id,
            "bundle_dir": dg.MetadataValue.path(str(directory)),
            "policy_kind": manifest.policy_kind,
            "files": dg.MetadataValue.json(
                {role: {"path": f.path, "sha256": f.sha256, "size_bytes": f.size_bytes}
                 for role, f in manifest.files.items()}),
            "data_version": manifest.provenance.data_version,
            "code_version": manifest.provenance.code_version,
            **{k: dg.MetadataValue.float(v) for k, v in extra.items()},
            "checkpoint_sha256": manifest.provenance.checkpoint_sha256,
            "mlflow_run_id": run_id,
            "mlflow_model_version": dg.MetadataValue.text(
                f"{mlflow.registered_model} v{version}" if version else "not registered"),
        },
    )
