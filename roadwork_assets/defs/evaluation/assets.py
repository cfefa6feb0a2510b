"""test_report: the bundle's policy on val_test, and nothing else: its metrics from the
logits, and a simulated StreetVision validator on val_test's original images."""


import base64
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd

from roadwork_assets.contracts.errors import ArtifactIntegrityError
from roadwork_assets.core.artifacts import (
    atomic_write_json,
    code_version,
    combine_versions,
    frame_fingerprint,
    make_provenance,
    staged_path,
)
from roadwork_assets.core.evaluation.report import (
    check_same_model,
    evaluate_bundle_policy,
    plot_reliability,
)
from roadwork_assets.core.evaluation.validator_rows import (
    closing_line,
    rows_table,
    simulate_bundle,
)
from roadwork_assets.core.export.bundle import load_bundle
from roadwork_assets.defs.asset_paths import asset_path
from roadwork_assets.defs.partitions import FINAL_EVALUATION_SPLITS
from roadwork_assets.defs.promotion import StagedFiles, materialize_result
from roadwork_assets.defs.resources import ArtifactRegistryResource, ExitPolicyResource
from roadwork_assets.defs.split_reads import split_reads_check_spec


def _png_md(path: Path, title: str) -> dg.MetadataValue:
    data = base64.b64encode(path.read_bytes()).decode()
    return dg.MetadataValue.md(f"![{title}](data:image/png;base64,{data})")


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


def _validator(context, loaded, manifest: pd.DataFrame, test, exit_policy: ExitPolicyResource):
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
        loaded, manifest["uri"].astype(str).tolist(), manifest["item_id"].astype(str).tolist(),
        manifest["label"].to_numpy(np.int64), groups.astype(str).tolist(),
        max_images=exit_policy.validator_images, seed=exit_policy.validator_seed,
        flips=exit_policy.validator_flips)
    context.log.info(f"{closing_line(sim)}; {sim.seconds:.1f} s, "
                     f"{1000 * sim.seconds_per_answer:.1f} ms per image and level")
    return sim


def _validator_metadata(sim) -> dict[str, dg.MetadataValue]:
    if sim is None:
        return {"validator": dg.MetadataValue.text(
            "off: exit_policy.validator_images = 0")}
    return {
        "validator": dg.MetadataValue.md(rows_table(sim)),
        **{f"validator_reward[{r.name}]": dg.MetadataValue.float(r.reward.mean)
           for r in sim.rows},
        "validator_seconds_per_answer": dg.MetadataValue.float(sim.seconds_per_answer),
    }


@dg.asset(
    group_name="evaluation",
    ins={"logits": dg.AssetIn(partition_mapping=FINAL_EVALUATION_SPLITS),
         "split_manifest": dg.AssetIn(partition_mapping=FINAL_EVALUATION_SPLITS)},
    code_version=code_version(),
    check_specs=[split_reads_check_spec("test_report")],
    description="Held-out evaluation of the bundle on val_test only: accuracy, balanced "
    "accuracy, MCC, FNR/FPR with exact intervals, ECE, AUROC, the policy's defer rate, "
    "a KS shift warning against the val_calib scores stored in the policy, and a simulated "
    "StreetVision validator (L0-L3 augmentations of the original images, MCC/accuracy per "
    "level, reward) for each way of serving: the bundle as served and the single-view "
    "model at 0.5.",
)
def test_report(
    context: dg.AssetExecutionContext,
    bundle: Path,
    logits: dict[str, dict[str, np.ndarray]],
    split_manifest: dict[str, pd.DataFrame],
    artifacts: ArtifactRegistryResource,
    exit_policy: ExitPolicyResource,
):
    reg = artifacts.registry
    loaded = load_bundle(bundle)
    test = logits["val_test"]
    manifest = split_manifest["val_test"]
    check_same_model(loaded, str(test["checkpoint_sha256"]))
    sim = _validator(context, loaded, manifest, test, exit_policy)
    manifest_version = (manifest.attrs.get("provenance", {}).get("data_version")
                        or frame_fingerprint(manifest))
    report, arrays = evaluate_bundle_policy(
        loaded.policy, test["logits"], test["labels"].astype(np.int64),
        bundle_id=loaded.manifest.bundle_id,
        provenance=make_provenance(combine_versions({
            "bundle": loaded.manifest.provenance.data_version,
            "logits[val_test]": str(test["data_version"]),
            "split_manifest[val_test]": str(manifest_version),
            "validator": f"images={exit_policy.validator_images} "
                         f"flips={exit_policy.validator_flips} seed={exit_policy.validator_seed}"}),
            # the settings of what it evaluates: the bundle's, else its policy's
            settings=(loaded.manifest.provenance.settings
                      or getattr(loaded.policy.provenance, "settings", None))),
        validator=sim,
    )
    dest = asset_path(reg, "test_report")
    atomic_write_json(staged_path(dest), report)
    if report.shift_warning:
        context.log.warning(report.shift_warning)
    plot = plot_reliability(arrays["calibrated"], test["labels"], reg.test_report_plot("reliability"))
    fnr = report.fnr
    cm = report.confusion_matrix
    return materialize_result(
        context, StagedFiles.at(dest), data_version=report.provenance.data_version,
        metadata={
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
            "confusion_matrix": dg.MetadataValue.md(
                "| true \\ pred | none | roadwork |\n|---|---|---|\n"
                f"| none | {cm[0][0]} | {cm[0][1]} |\n| roadwork | {cm[1][0]} | {cm[1][1]} |"),
            "reliability_diagram": _png_md(plot, "reliability"),
            "shift_warning": dg.MetadataValue.text(_shift_text(report)),
            "score_shift": dg.MetadataValue.md(_shift_table(report)),
            "bundle_id": report.bundle_id,
            "n_images": report.n_images,
            **_validator_metadata(sim),
        },
    )
