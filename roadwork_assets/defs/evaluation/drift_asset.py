"""drift: are the images arriving now still like val_test? The served bundle scores the
incoming folder and val_test alike; PSI and KS on the score and on the embedding's
principal components (``core.evaluation.drift``) give the verdict the drift sensor reads.

val_test is the reference because it is the data the shipped numbers (test_report) were
measured on: drift from it is exactly what makes those numbers stale. The asset only
reads it (role "final evaluation"), like test_report.

The ``no_drift`` check is a WARN, not blocking: drift is a property of the world, not a
defect of an artifact; the asset has no downstream to protect, and a blocking failure
would make every `roadwork run` fail while the world stays drifted, the very run (a
retrain) that answers drift. The drift sensor turns the verdict into a retrain request.
"""

import os
from pathlib import Path

import dagster as dg
import pandas as pd
from pydantic import Field

from roadwork_assets.contracts.errors import InsufficientDataError
from roadwork_assets.core.artifacts import (
    atomic_write_json,
    atomic_write_npz,
    code_version,
    combine_versions,
    frame_fingerprint,
    read_npz,
    staged_path,
)
from roadwork_assets.core.evaluation.drift import DriftConfig, DriftDetector, DriftReport
from roadwork_assets.core.evaluation.drift_inputs import (
    ScoredImages,
    list_images,
    score_images,
    subsample,
)
from roadwork_assets.core.export.bundle import load_bundle
from roadwork_assets.core.export.predictor import BundlePredictor
from roadwork_assets.defs.asset_paths import asset_path
from roadwork_assets.defs.partitions import FINAL_EVALUATION_SPLITS
from roadwork_assets.defs.promotion import StagedFiles, materialize_result
from roadwork_assets.defs.resources import ArtifactRegistryResource
from roadwork_assets.defs.split_reads import split_reads_check_spec

DRIFT_CHECK = "no_drift"
INCOMING_ENV = "ROADWORK_INCOMING"
VERDICT_KEY = "verdict"
NOT_CHECKED = "not checked"
_DEFAULTS = DriftConfig()


class DriftSettings(dg.Config):
    """The drift asset's settings (launchpad / run config); thresholds as
    ``core.evaluation.drift.DriftConfig`` reads them."""

    incoming: str | None = Field(
        None, description=f"folder of incoming unlabelled images; None = ${INCOMING_ENV}; "
        "neither set = not checked")
    max_images: int = Field(2000, ge=5, description="at most this many images of each side "
                            "are scored (a seeded subsample)")
    psi_threshold: float = Field(_DEFAULTS.psi_threshold, gt=0)
    alpha: float = Field(_DEFAULTS.alpha, gt=0, lt=1, description="false-alarm rate of the "
                         "verdict on a batch without drift")
    n_bins: int = Field(_DEFAULTS.n_bins, ge=2, le=100)
    n_components: int = Field(_DEFAULTS.n_components, ge=1, le=64)
    min_images: int = Field(_DEFAULTS.min_images, ge=5)

    def to_config(self) -> DriftConfig:
        return DriftConfig(psi_threshold=self.psi_threshold, alpha=self.alpha,
                           n_bins=self.n_bins, n_components=self.n_components,
                           min_images=self.min_images)

    def incoming_folder(self) -> str | None:
        return self.incoming or os.environ.get(INCOMING_ENV) or None


def _report_metadata(report: DriftReport) -> dict[str, dg.MetadataValue]:
    out: dict[str, dg.MetadataValue] = {}
    for key, c in (("score", report.score), ("embedding", report.embedding)):
        out |= {f"{key}_psi": dg.MetadataValue.float(c.psi),
                f"{key}_psi_limit": dg.MetadataValue.float(c.psi_limit),
                f"{key}_ks_statistic": dg.MetadataValue.float(c.ks_statistic),
                f"{key}_ks_p_value": dg.MetadataValue.float(c.ks_p_value)}
    rows = ["| compared | PSI | PSI limit | KS D | KS p | p limit | drift |",
            "|---|---|---|---|---|---|---|"]
    rows += [f"| {c.name} | {c.psi:.3f} | {c.psi_limit:.3f} | {c.ks_statistic:.3f} | "
             f"{c.ks_p_value:.3g} | {c.ks_alpha:.3g} | {c.drifted} |"
             for c in (report.score, report.embedding)]
    out["drift_table"] = dg.MetadataValue.md("\n".join(rows) + (
        "\n\nPSI limit = max(psi_threshold, chi2 noise floor of this sample size); KS p "
        "limit = alpha / 4 (score), Bonferroni over the components (embedding)."))
    out["n_reference"] = dg.MetadataValue.int(report.score.n_reference)
    out["n_incoming"] = dg.MetadataValue.int(report.score.n_incoming)
    return out


def _reference(context, predictor, paths: list[str], folder: Path,
               key: dict[str, str]) -> ScoredImages:
    """val_test scored by this bundle: computed once per (bundle, val_test, code) and
    kept beside the report, since every drift check of one bundle compares with it."""
    name = f"reference-{combine_versions({**key, 'code': code_version()})[:16]}.npz"
    cache = folder / name
    if cache.exists():
        data = read_npz(cache)
        return ScoredImages(data["scores"], data["embeddings"])
    reference = score_images(predictor, paths)
    if reference.failed:
        context.log.warning(f"{len(reference.failed)} val_test image(s) unreadable, left "
                            f"out of the reference, e.g. {next(iter(reference.failed.items()))}")
    atomic_write_npz(cache, scores=reference.scores, embeddings=reference.embeddings)
    for old in folder.glob("reference-*.npz"):  # another bundle's: never read again
        if old.name != name:
            old.unlink(missing_ok=True)
    return reference


def _not_checked(context, dest: Path, why: str, thresholds: dict) -> dg.MaterializeResult:
    context.log.info(f"drift not checked: {why}")
    atomic_write_json(staged_path(dest), {VERDICT_KEY: NOT_CHECKED, "why": why})
    check = dg.AssetCheckResult(check_name=DRIFT_CHECK, passed=True,
                                severity=dg.AssetCheckSeverity.WARN,
                                description=f"not checked: {why}")
    return _with_warning(materialize_result(
        context, StagedFiles.at(dest), data_version=None,
        metadata={VERDICT_KEY: NOT_CHECKED, "why": why,
                  "thresholds": dg.MetadataValue.json(thresholds)}), check)


@dg.asset(
    group_name="evaluation",
    ins={"split_manifest": dg.AssetIn(partition_mapping=FINAL_EVALUATION_SPLITS),
         "bundle": dg.AssetIn()},
    code_version=code_version(),
    check_specs=[
        split_reads_check_spec("drift"),
        dg.AssetCheckSpec(DRIFT_CHECK, asset="drift", blocking=False,
                          description="incoming images are not drifted from val_test "
                          "(score and embedding PSI and KS within their limits); WARN only"),
    ],
    description="Drift of incoming unlabelled images (ROADWORK_INCOMING or config "
    "`incoming`) from val_test: PSI (reference-quantile bins) and two-sample KS of the "
    "served score and of the embedding's principal components; verdict drift / no drift / "
    "not checked. The drift sensor requests a retrain on `drift`.",
)
def drift(
    context: dg.AssetExecutionContext,
    config: DriftSettings,
    bundle: Path,
    split_manifest: dict[str, pd.DataFrame],
    artifacts: ArtifactRegistryResource,
):
    dest = asset_path(artifacts.registry, "drift")
    cfg = config.to_config()
    thresholds = cfg.model_dump()
    folder = config.incoming_folder()
    if folder is None:
        return _not_checked(context, dest, f"no incoming folder (set {INCOMING_ENV} or the "
                            "asset's `incoming` config)", thresholds)
    incoming_paths = list_images(folder, config.max_images)
    manifest = split_manifest["val_test"]
    reference_paths = subsample(manifest["uri"].astype(str).tolist(), config.max_images)
    loaded = load_bundle(Path(bundle), check_onnx=False)
    predictor = BundlePredictor(loaded)
    incoming = score_images(predictor, incoming_paths)
    for path, why in list(incoming.failed.items())[:10]:
        context.log.warning(f"incoming image skipped: {path}: {why}")
    reference = _reference(context, predictor, reference_paths,
                           dest.parent, key={"bundle": loaded.manifest.bundle_id,
                                             "val_test": frame_fingerprint(manifest),
                                             "max_images": str(config.max_images)})
    try:
        report = DriftDetector(cfg).fit(reference.scores, reference.embeddings).compare(
            incoming.scores, incoming.embeddings)
    except InsufficientDataError as exc:
        return _not_checked(context, dest, str(exc), thresholds)
    atomic_write_json(staged_path(dest), {VERDICT_KEY: report.verdict, "incoming": folder,
                                          "reasons": report.reasons(),
                                          **report.model_dump()})
    if report.drifted:
        context.log.warning(f"drift: {'; '.join(report.reasons())}")
    check = dg.AssetCheckResult(
        check_name=DRIFT_CHECK, passed=not report.drifted,
        severity=dg.AssetCheckSeverity.WARN,
        description="; ".join(report.reasons()) or "no drift: every statistic within its limit")
    # what the drift sensor keys a retrain on: these incoming files, as listed now
    incoming_version = combine_versions(
        {str(p): f"{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in incoming_paths})
    version = combine_versions({"bundle": loaded.manifest.bundle_id,
                                "split_manifest[val_test]": frame_fingerprint(manifest),
                                "incoming": incoming_version})
    result = materialize_result(
        context, StagedFiles.at(dest), data_version=version,
        metadata={VERDICT_KEY: report.verdict,
                  "reasons": dg.MetadataValue.json(report.reasons()),
                  **_report_metadata(report),
                  "n_incoming_unreadable": dg.MetadataValue.int(len(incoming.failed)),
                  "incoming": dg.MetadataValue.path(str(folder)),
                  "incoming_version": incoming_version,
                  "bundle_id": loaded.manifest.bundle_id,
                  "thresholds": dg.MetadataValue.json(thresholds)})
    return _with_warning(result, check)


def _with_warning(result: dg.MaterializeResult, check: dg.AssetCheckResult
                  ) -> dg.MaterializeResult:
    """Add the WARN check after promotion: ``materialize_result`` sets aside an artifact
    whose checks fail, and a drift verdict is a finding to report, not a bad artifact."""
    return dg.MaterializeResult(value=result.value, metadata=result.metadata,
                                check_results=[*result.check_results, check],
                                data_version=result.data_version)
