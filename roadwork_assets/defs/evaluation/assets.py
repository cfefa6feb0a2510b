"""test_report: the bundle's policy on val_test, and nothing else: its metrics from the
logits (a cascade: logits + multiview_logits), the ways of serving side by side (the
`thresholds` policy as stage 1 alone), and a simulated StreetVision validator on
val_test's original images."""


import json
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd

from roadwork_assets.contracts.errors import (
    ArtifactIntegrityError,
    BadInputError,
    InsufficientDataError,
)
from roadwork_assets.core.artifacts import (
    atomic_write_json,
    code_version,
    combine_versions,
    frame_fingerprint,
    make_provenance,
    staged_path,
)
from roadwork_assets.core.evaluation.comparison import comparison_table
from roadwork_assets.core.evaluation.report import (
    check_same_model,
    check_same_stage2,
    evaluate_bundle_policy,
    per_source_markdown,
    plot_reliability,
    sources_of,
    stage1_policy_for,
)
from roadwork_assets.core.evaluation.validator_rows import (
    ServedModels,
    closing_line,
    rows_table,
    simulate_bundle,
)
from roadwork_assets.core.export.bundle import load_bundle
from roadwork_assets.defs.asset_paths import asset_path
from roadwork_assets.defs.console import progress_reporter
from roadwork_assets.defs.evaluation.explain_metadata import failure_explanations
from roadwork_assets.defs.metadata import png_markdown
from roadwork_assets.defs.partitions import FINAL_EVALUATION_SPLITS
from roadwork_assets.defs.promotion import StagedFiles, materialize_result
from roadwork_assets.defs.resources import ArtifactRegistryResource, ExitPolicyResource
from roadwork_assets.defs.split_reads import split_reads_check_spec
from roadwork_assets.defs.tracking import MlflowTracking, log_report


def _shift_text(report) -> str:
    if report.score_shift is None:
        return ("not checked: the bundled policy stores no score_reference; re-fit the "
                "policy with this version to get the val_calib vs val_test shift test")
    shift = report.score_shift
    return shift.warning or shift.note or (
        f"none: no KS test rejects val_test ~ val_calib at level {shift.level:g}")


def _shift_table(report) -> str:
    if report.score_shift is None:
        return _shift_text(report)
    rows = ["| scores | KS D | p-value | n val_calib | n val_test | shifted |",
            "|---|---|---|---|---|---|"]
    for t in report.score_shift.tests:
        d = "—" if t.statistic is None else f"{t.statistic:.3f}"
        p = "—" if t.p_value is None else f"{t.p_value:.3g}"
        rows.append(f"| {t.group} | {d} | {p} | {t.n_reference} | {t.n_test} | {t.shifted} |")
    return "\n".join(rows) + f"\n\n{report.score_shift.method}, level {report.score_shift.level:g}"


def _stage1_policy(context, loaded, thresholds: Path):
    """The ``thresholds`` policy for a cascade bundle's stage1_served row; None (and the
    reason, logged) when it does not apply. A stage-1 bundle's row is its own policy."""
    if loaded.policy.kind != "cascade":
        return None, None
    try:
        return stage1_policy_for(loaded, json.loads(Path(thresholds).read_text())), None
    except (ArtifactIntegrityError, InsufficientDataError, BadInputError) as exc:
        reason = f"`thresholds` does not apply: {exc}"
        context.log.warning(f"stage1_served left out: {reason}")
        return None, reason


def _stage2_logits(context, loaded, multiview_logits, test):
    """multiview_logits[val_test] for a cascade bundle, checked to come from its two
    stages and the same images; None for a stage-1 bundle."""
    if loaded.policy.kind != "cascade":
        context.log.info("stage-1 bundle: cascade_served and stage2_0.5 left out (no stage 2)")
        return None
    mv = multiview_logits["val_test"]
    check_same_stage2(loaded, mv, test["item_ids"])
    return mv["logits"]


def _validator(context, loaded, manifest: pd.DataFrame, test, exit_policy: ExitPolicyResource,
               stage1_policy):
    """The validator simulator on val_test (decoded originals, at most validator_images)."""
    if exit_policy.validator_images == 0:
        context.log.info("validator simulator off (exit_policy.validator_images = 0)")
        return None
    if not np.array_equal(manifest["item_id"].astype(str).to_numpy(),
                          test["item_ids"].astype(str)):
        raise ArtifactIntegrityError(
            "split_manifest[val_test] and logits[val_test] hold other images (or another "
            "order): re-materialize embeddings[val_test] and logits[val_test]")
    groups = manifest["group_key"] if "group_key" in manifest else manifest["item_id"]
    sim = simulate_bundle(
        ServedModels.of(loaded, stage1_policy=stage1_policy),
        manifest["uri"].astype(str).tolist(), manifest["item_id"].astype(str).tolist(),
        manifest["label"].to_numpy(np.int64), groups.astype(str).tolist(),
        max_images=exit_policy.validator_images, seed=exit_policy.validator_seed,
        flips=exit_policy.validator_flips, progress=progress_reporter(context))
    for name, why in sim.skipped.items():
        context.log.info(f"validator row {name} left out: {why}")
    context.log.info(f"{closing_line(sim)}; {sim.seconds:.1f} s, "
                     f"{1000 * sim.seconds_per_answer:.1f} ms per image and level")
    return sim


def _validator_metadata(sim) -> dict[str, dg.MetadataValue]:
    if sim is None:
        return {"validator": dg.MetadataValue.text(
            "off: exit_policy.validator_images = 0")}
    skipped = "".join(f"\n\n{name}: left out — {why}" for name, why in sim.skipped.items())
    return {
        "validator": dg.MetadataValue.md(rows_table(sim) + skipped),
        **{f"validator_reward[{r.name}]": dg.MetadataValue.float(r.reward.mean)
           for r in sim.rows},
        "validator_seconds_per_answer": dg.MetadataValue.float(sim.seconds_per_answer),
    }


def _cascade_metadata(report) -> dict[str, dg.MetadataValue]:
    c = report.cascade
    out: dict[str, dg.MetadataValue] = {}
    if c is not None:
        out |= {
            "routing_rate": dg.MetadataValue.float(c.routing_rate),
            "expected_latency_s": dg.MetadataValue.float(c.expected_latency_s),
            "latency_per_stage": dg.MetadataValue.md(
                "| stage | latency (s) | share of images |\n|---|---|---|\n"
                f"| 1 | {c.latency_stage1_s:.4f} | 100% |\n"
                f"| 2 | {c.latency_stage2_s:.4f} | {c.routing_rate:.1%} |\n"
                f"| expected per image | {c.expected_latency_s:.4f} | budget "
                f"{c.latency_budget_s:g} s, {'met' if c.latency_budget_met else 'NOT met'} |"
                f"\n\nlatencies {c.latency_source} (the policy's); routing on val_test "
                f"(val_calib: {c.policy_routing_rate:.1%})"),
        }
    price = report.price_of_guarantee
    if price is not None:
        sim_gap = ("—" if price.validator_reward_gap is None
                   else f"{price.validator_reward_gap:+.3f}")
        reward_gap = "—" if price.reward_gap is None else f"{price.reward_gap:+.3f}"
        out["price_of_guarantee"] = dg.MetadataValue.md(
            f"{price.reference} minus {price.served} (positive: what the FNR guarantee "
            f"costs)\n\n| MCC | reward (closed form) | reward (validator) |\n|---|---|---|\n"
            f"| {price.mcc_gap:+.4f} | {reward_gap} | {sim_gap} |")
        out["price_of_guarantee_mcc"] = dg.MetadataValue.float(price.mcc_gap)
    out["comparison"] = dg.MetadataValue.md(comparison_table(report.comparison,
                                                             report.skipped_rows))
    return out


def _report_metadata(report, plot: Path, sim) -> dict[str, dg.MetadataValue]:
    fnr = report.fnr
    cm = report.confusion_matrix
    return {
        "balanced_accuracy": dg.MetadataValue.float(report.balanced_accuracy),
        "model_balanced_accuracy": dg.MetadataValue.float(report.model_balanced_accuracy),
        "accuracy": dg.MetadataValue.float(report.accuracy),
        "mcc": dg.MetadataValue.float(report.mcc),
        "auroc": dg.MetadataValue.float(report.auroc or float("nan")),
        "ece": dg.MetadataValue.float(report.ece or float("nan")),
        "fnr": dg.MetadataValue.float(fnr.value if fnr.value is not None else float("nan")),
        "fnr_ci95": dg.MetadataValue.text(
            f"{fnr.errors}/{fnr.n} = {fnr.value:.4f} [{fnr.ci_low:.4f}, {fnr.ci_high:.4f}] "
            "(Clopper-Pearson)" if fnr.n else "no positives"),
        "fpr": dg.MetadataValue.float(report.fpr.value or 0.0),
        "policy_fnr": dg.MetadataValue.float(report.policy_fnr.value or 0.0),
        "policy_defer_rate": dg.MetadataValue.float(report.policy_defer_rate),
        "per_source": dg.MetadataValue.md(per_source_markdown(report)),
        "confusion_matrix": dg.MetadataValue.md(
            "| true \\ pred | none | roadwork |\n|---|---|---|\n"
            f"| none | {cm[0][0]} | {cm[0][1]} |\n| roadwork | {cm[1][0]} | {cm[1][1]} |"),
        "reliability_diagram": png_markdown(plot, "reliability"),
        "shift_warning": dg.MetadataValue.text(_shift_text(report)),
        "score_shift": dg.MetadataValue.md(_shift_table(report)),
        "bundle_id": report.bundle_id,
        "policy_kind": report.policy_kind,
        "n_images": report.n_images,
        **_cascade_metadata(report),
        **_validator_metadata(sim),
    }


@dg.asset(
    group_name="evaluation",
    ins={"logits": dg.AssetIn(partition_mapping=FINAL_EVALUATION_SPLITS),
         "multiview_logits": dg.AssetIn(partition_mapping=FINAL_EVALUATION_SPLITS),
         "split_manifest": dg.AssetIn(partition_mapping=FINAL_EVALUATION_SPLITS),
         "thresholds": dg.AssetIn()},
    code_version=code_version(),
    check_specs=[split_reads_check_spec("test_report")],
    description="Held-out evaluation of the bundle on val_test only: accuracy, balanced "
    "accuracy, MCC, FNR/FPR with exact intervals, ECE, AUROC, the policy's defer rate, "
    "for a cascade its routing rate and expected latency per stage, a KS shift warning "
    "against the val_calib scores stored in the policy, the ways of serving side by side "
    "(cascade_served, stage1_served = the `thresholds` policy, single_view_0.5, stage2_0.5) "
    "with the price of the guarantee, and a simulated StreetVision validator (L0-L3 "
    "augmentations of the original images, MCC/accuracy per level, reward) for each row.",
)
def test_report(
    context: dg.AssetExecutionContext,
    bundle: Path,
    logits: dict[str, dict[str, np.ndarray]],
    multiview_logits: dict[str, dict[str, np.ndarray]],
    split_manifest: dict[str, pd.DataFrame],
    thresholds: Path,
    artifacts: ArtifactRegistryResource,
    exit_policy: ExitPolicyResource,
    mlflow: MlflowTracking,
):
    reg = artifacts.registry
    loaded = load_bundle(bundle)
    test = logits["val_test"]
    manifest = split_manifest["val_test"]
    check_same_model(loaded, str(test["checkpoint_sha256"]))
    stage2 = _stage2_logits(context, loaded, multiview_logits, test)
    stage1_policy, stage1_reason = _stage1_policy(context, loaded, thresholds)
    sim = _validator(context, loaded, manifest, test, exit_policy, stage1_policy)
    if sim is not None and stage1_reason and "stage1_served" in sim.skipped:
        sim = sim.model_copy(update={"skipped": {**sim.skipped, "stage1_served": stage1_reason}})
    manifest_version = (manifest.attrs.get("provenance", {}).get("data_version")
                        or frame_fingerprint(manifest))
    versions = {"bundle": loaded.manifest.provenance.data_version,
                "logits[val_test]": str(test["data_version"]),
                "split_manifest[val_test]": str(manifest_version),
                "validator": f"images={exit_policy.validator_images} "
                             f"flips={exit_policy.validator_flips} seed={exit_policy.validator_seed}"}
    if stage2 is not None:
        versions["multiview_logits[val_test]"] = str(multiview_logits["val_test"]["data_version"])
    if stage1_policy is not None:
        versions["thresholds"] = getattr(stage1_policy.provenance, "data_version", "") or ""
    report, arrays = evaluate_bundle_policy(
        loaded.policy, test["logits"], test["labels"].astype(np.int64),
        bundle_id=loaded.manifest.bundle_id,
        provenance=make_provenance(combine_versions(versions),
            # the settings of what it evaluates: the bundle's, else its policy's
            settings=(loaded.manifest.provenance.settings
                      or getattr(loaded.policy.provenance, "settings", None))),
        validator=sim, stage2_logits=stage2, stage1_policy=stage1_policy,
        sources=sources_of(manifest, test["item_ids"]),
    )
    if stage1_reason and "stage1_served" in report.skipped_rows:
        report.skipped_rows["stage1_served"] = stage1_reason
    dest = asset_path(reg, "test_report")
    written = atomic_write_json(staged_path(dest), report)
    if report.shift_warning:
        context.log.warning(report.shift_warning)
    plot = plot_reliability(arrays["calibrated"], test["labels"], reg.test_report_plot("reliability"))
    explanations = failure_explanations(context, loaded, manifest, test, arrays, reg,
                                        exit_policy.explain_failures)
    return materialize_result(
        context, StagedFiles.at(dest), data_version=report.provenance.data_version,
        metadata={**_report_metadata(report, plot, sim), **explanations,
                  "mlflow_run_id": log_report(mlflow, context, written, dest.name, plots=(plot,),
                                              params={"validator": versions["validator"]})})
