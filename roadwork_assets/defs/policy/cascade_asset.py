"""The cascade policy asset: stage 1 exits the confident, stage 2 decides the rest, one
FNR guarantee over the composed decision; fitted on val_calib only."""

from pathlib import Path

import dagster as dg
import numpy as np

from roadwork_assets.contracts.errors import InsufficientDataError
from roadwork_assets.contracts.multiview_schemas import load_multiview_checkpoint
from roadwork_assets.contracts.policy_schemas import (
    POLICY_ASSET_NAMES,
    CascadePolicyParams,
    UnfittedPolicy,
)
from roadwork_assets.core.artifacts import (
    atomic_write_json,
    code_version,
    combine_versions,
    file_sha256,
    make_provenance,
    staged_path,
)
from roadwork_assets.core.calibration.cascade import fit_cascade_policy
from roadwork_assets.core.calibration.cascade_inputs import check_stage_logits, stage_latency
from roadwork_assets.defs.asset_paths import asset_path
from roadwork_assets.defs.metadata import png_markdown
from roadwork_assets.defs.partitions import POLICY_FITTING_SPLITS
from roadwork_assets.defs.policy.assets import SCHEMA_CHECK, policy_metadata, schema_check
from roadwork_assets.defs.promotion import StagedFiles, materialize_result
from roadwork_assets.defs.resources import ArtifactRegistryResource, ExitPolicyResource
from roadwork_assets.defs.settings import used_settings
from roadwork_assets.defs.split_reads import split_reads_check_spec
from roadwork_assets.defs.tracking import MlflowTracking, log_policy

NAME = POLICY_ASSET_NAMES["cascade"]
PLOT_FILES = ("cascade_frontier.png", "cascade_alpha_frontier.png")  # under policies/plots


@dg.asset(
    name=NAME,
    group_name="policy",
    ins={"logits": dg.AssetIn(partition_mapping=POLICY_FITTING_SPLITS),
         "multiview_logits": dg.AssetIn(partition_mapping=POLICY_FITTING_SPLITS)},
    code_version=code_version(),
    check_specs=[
        split_reads_check_spec(NAME),
        dg.AssetCheckSpec(SCHEMA_CHECK, asset=NAME, blocking=True,
                          description="the JSON on disk validates against its schema"),
    ],
    description="Policy `cascade` fitted on val_calib only: stage 1 exits confident "
    "negatives and positives, the rest go to stage 2 (multi-view), which decides; one "
    "lambda indexes nested thresholds of both stages and conformal risk control certifies "
    "FNR <= alpha over the composed decision; among certified lambdas the best estimated "
    "validator reward within the per-image latency budget is served.",
)
def cascade_policy(
    context: dg.AssetExecutionContext,
    checkpoint: dict,
    multiview_checkpoint: Path,
    logits: dict[str, dict[str, np.ndarray]],
    multiview_logits: dict[str, dict[str, np.ndarray]],
    artifacts: ArtifactRegistryResource,
    exit_policy: ExitPolicyResource,
    mlflow: MlflowTracking,
):
    calib, calib2 = logits["val_calib"], multiview_logits["val_calib"]
    stage2_sha = file_sha256(multiview_checkpoint)
    check_stage_logits(calib, calib2, stage2_sha)
    stage2 = load_multiview_checkpoint(multiview_checkpoint)
    lat1, lat2, source = stage_latency(
        checkpoint, stage2, (exit_policy.latency_stage1_s, exit_policy.latency_stage2_s))
    context.log.info(f"cascade latency per image ({source}): stage 1 {1000 * lat1:.2f} ms, "
                     f"stage 2 {1000 * lat2:.2f} ms")
    try:
        params = fit_cascade_policy(
            calib["logits"], calib2["logits"], calib["labels"], calib["item_ids"].tolist(),
            calib["group_keys"].tolist(), policy=exit_policy.to_config(),
            cascade=exit_policy.cascade_config(lat1, lat2))
        params = params.model_copy(update={"stage2_sha256": stage2_sha, "latency_source": source})
    except InsufficientDataError as exc:
        params = UnfittedPolicy(kind="cascade", reason=str(exc), error=type(exc).__name__)
        context.log.warning(f"policy 'cascade' ({NAME}) could not be fitted: {exc}")
    params = params.model_copy(update={"provenance": make_provenance(
        combine_versions({"logits[val_calib]": str(calib["data_version"]),
                          "multiview_logits[val_calib]": str(calib2["data_version"])}),
        checkpoint_sha256=str(calib["checkpoint_sha256"]),
        settings=used_settings(exit_policy=exit_policy))})
    reg = artifacts.registry
    dest = asset_path(reg, NAME)
    written = atomic_write_json(staged_path(dest), params)
    schema = schema_check(written)
    plots = _plots(params, dest)
    run_id = log_policy(mlflow, context, written, dest.name, plots=tuple(
        dest.parent / "plots" / f for f in PLOT_FILES) if plots else ())
    return materialize_result(context, StagedFiles.at(dest), checks=[schema],
                              data_version=params.provenance.data_version,
                              metadata={**policy_metadata(params), **plots,
                                        "mlflow_run_id": run_id})


def _plots(params, dest: Path) -> dict[str, dg.MetadataValue]:
    """The risk-reward-cost frontier over lambda and the frontier across alpha, as images."""
    if not isinstance(params, CascadePolicyParams):
        return {}
    from roadwork_assets.core.evaluation.cascade_plots import (
        plot_alpha_frontier,
        plot_cascade_frontier,
    )

    plots = dest.parent / "plots"
    return {
        "frontier_lambda": png_markdown(plot_cascade_frontier(
            params, plots / PLOT_FILES[0]), "cascade risk-reward-cost frontier"),
        "frontier_alpha": png_markdown(plot_alpha_frontier(
            params, plots / PLOT_FILES[1]), "reward and cost across alpha"),
    }
