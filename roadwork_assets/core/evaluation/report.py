"""Final evaluation of a bundle's policy on held-out logits (val_test only): a stage-1
policy from logits[val_test], a cascade from logits[val_test] and multiview_logits[val_test]
(``apply_cascade``), and the comparison rows (``comparison``) beside it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from roadwork_assets.contracts.errors import (
    ArtifactIntegrityError,
    BadInputError,
    InsufficientDataError,
)
from roadwork_assets.contracts.policy_schemas import (
    CascadePolicyParams,
    PolicyParams,
    UnfittedPolicy,
    parse_policy_artifact,
)
from roadwork_assets.contracts.schemas import (
    CascadeServing,
    Provenance,
    RateWithInterval,
    SourceMetrics,
    TestReport,
)
from roadwork_assets.contracts.validator_schemas import ValidatorSimulation
from roadwork_assets.core.calibration.metrics import (
    classification_report,
    mcc,
    rate_with_ci,
    reliability_bins,
)
from roadwork_assets.core.calibration.policies import apply_policy
from roadwork_assets.core.evaluation.comparison import (
    Comparison,
    compare_served,
    price_of_guarantee,
)
from roadwork_assets.core.evaluation.shift import compare_to_reference
from roadwork_assets.core.evaluation.validator import binarise
from roadwork_assets.core.export.bundle import Bundle

ECE_BINS = 15


def check_same_model(bundle: Bundle, logits_checkpoint_sha256: str) -> None:
    """Refuse to score a bundle on logits that another checkpoint produced."""
    expected = bundle.manifest.files["checkpoint"].sha256
    if logits_checkpoint_sha256 != expected:
        raise ArtifactIntegrityError(
            f"logits[val_test] were computed by checkpoint {logits_checkpoint_sha256[:12]}, "
            f"but bundle {bundle.manifest.bundle_id} ships checkpoint {expected[:12]}: "
            "re-materialize logits[val_test] (and the policy and bundle) for one checkpoint"
        )


def check_same_stage2(bundle: Bundle, stage2_logits: dict[str, Any],
                      stage1_item_ids: np.ndarray) -> None:
    """Refuse stage-2 logits that another stage-1 checkpoint or another stage 2 produced,
    or that hold other images (or another order) than the stage-1 logits."""
    check_same_model(bundle, str(stage2_logits["checkpoint_sha256"]))
    expected = getattr(bundle.policy, "stage2_sha256", None)
    if expected is None and "stage2" in bundle.manifest.files:
        expected = bundle.manifest.files["stage2"].sha256
    found = str(stage2_logits["multiview_checkpoint_sha256"])
    if expected is not None and found != expected:
        raise ArtifactIntegrityError(
            f"multiview_logits[val_test] were computed by stage 2 {found[:12]}, but bundle "
            f"{bundle.manifest.bundle_id} ships stage 2 {expected[:12]}: re-materialize "
            "multiview_logits[val_test] (and cascade_policy and bundle) for one stage 2")
    if not np.array_equal(np.asarray(stage2_logits["item_ids"]).astype(str),
                          np.asarray(stage1_item_ids).astype(str)):
        raise ArtifactIntegrityError(
            "multiview_logits[val_test] and logits[val_test] hold other images (or another "
            "order): re-materialize both from one embeddings[val_test]")


def stage1_policy_for(bundle: Bundle, raw_policy: Any) -> PolicyParams:
    """The stage-1 policy (the ``thresholds`` artifact's dict) that the stage1_served row
    applies to a cascade bundle's stage-1 model: fitted, a stage-1 kind, and fitted on the
    bundle's checkpoint. Raises with the reason otherwise (the row is then left out)."""
    policy = parse_policy_artifact(raw_policy)
    if isinstance(policy, UnfittedPolicy):
        raise InsufficientDataError(f"the {policy.kind!r} policy could not be fitted: "
                                    f"{' '.join(policy.reason.split())}")
    if policy.kind == "cascade":
        raise BadInputError("the stage-1 row needs a stage-1 policy, got a cascade")
    expected = bundle.manifest.files["checkpoint"].sha256
    fitted_on = getattr(policy.provenance, "checkpoint_sha256", None)
    if fitted_on != expected:
        raise ArtifactIntegrityError(
            f"the {policy.kind!r} policy was fitted on checkpoint "
            f"{(fitted_on or 'unrecorded')[:12]}, the bundle ships {expected[:12]}: "
            "re-materialize it for the bundle's checkpoint")
    return policy


def _rate(entry: dict[str, Any]) -> RateWithInterval:
    return RateWithInterval(value=entry["value"], errors=entry["k"], n=entry["n"],
                            ci_low=entry["ci_low"], ci_high=entry["ci_high"])


def _check_finite(name: str, logits: np.ndarray) -> None:
    if not np.isfinite(logits).all():
        bad = np.flatnonzero(~np.isfinite(logits).all(axis=tuple(range(1, logits.ndim))))
        raise BadInputError(f"{name} hold NaN/inf at rows {bad[:10].tolist()}: "
                            f"re-materialize {name}")


def _served_arrays(policy: PolicyParams, view_logits: np.ndarray, comp: Comparison,
                   ) -> dict[str, np.ndarray]:
    """decision (-1 defer / 0 / 1), emitted (served) probability, calibrated probability
    of the deciding stage, and the single-view model's calibrated probability."""
    single = comp.served["single_view_0.5"]
    if policy.kind != "cascade":
        decision, emitted = apply_policy(policy, view_logits)
        return {"decision": decision, "emitted": emitted, "calibrated": single,
                "model": single}
    if "cascade_served" not in comp.served:
        raise BadInputError("a cascade bundle is scored with its stage-2 logits: "
                            f"{comp.skipped.get('cascade_served')}")
    emitted = comp.served["cascade_served"]
    calibrated = np.where(comp.stage == 2, comp.served["stage2_0.5"], single)
    return {"decision": binarise(emitted).astype(np.int8), "emitted": emitted,
            "calibrated": calibrated, "model": single, "stage": comp.stage}


def cascade_serving(policy: CascadePolicyParams, stage: np.ndarray) -> CascadeServing:
    """Routing on val_test and the expected per-image latency at the policy's latencies."""
    routing = float(np.mean(np.asarray(stage) == 2)) if np.size(stage) else 0.0
    latency = policy.latency_stage1_s + routing * policy.latency_stage2_s
    return CascadeServing(
        n_routed=int(np.sum(np.asarray(stage) == 2)), routing_rate=routing,
        expected_latency_s=latency, latency_stage1_s=policy.latency_stage1_s,
        latency_stage2_s=policy.latency_stage2_s, latency_budget_s=policy.latency_budget_s,
        latency_budget_met=latency <= policy.latency_budget_s,
        latency_source=policy.latency_source, policy_routing_rate=policy.routing_rate,
        alpha=policy.alpha, lam=policy.lam, crc_bound=policy.crc_bound,
        stage2_sha256=policy.stage2_sha256)


def evaluate_bundle_policy(
    policy: PolicyParams,
    view_logits: np.ndarray,
    labels: np.ndarray,
    *,
    bundle_id: str,
    provenance: Provenance,
    n_bootstrap: int = 1000,
    validator: ValidatorSimulation | None = None,
    stage2_logits: np.ndarray | None = None,
    stage1_policy: PolicyParams | None = None,
    sources: np.ndarray | None = None,
) -> tuple[TestReport, dict[str, np.ndarray]]:
    """Return the report and the arrays the plots need. ``validator``: the validator
    simulation of the same bundle (``core.evaluation.validator_rows``), carried as is.
    A cascade ``policy`` needs ``stage2_logits`` (pooled, [N, 2] or [N, 1, 2]);
    ``stage1_policy`` (the ``thresholds`` softmax policy) adds its stage1_served row.
    ``sources`` (one name per image, aligned with ``labels``) adds ``per_source``."""
    _check_finite("val_test logits", view_logits)
    if stage2_logits is not None:
        _check_finite("multiview_logits[val_test]", np.asarray(stage2_logits))
    comp = compare_served(policy, view_logits, labels, stage2_logits=stage2_logits,
                          stage1_policy=stage1_policy)
    arrays = _served_arrays(policy, view_logits, comp)
    rep = {k: classification_report(arrays[k], labels, threshold=0.5, n_bins=ECE_BINS,
                                    n_bootstrap=n_bootstrap)
           for k in ("emitted", "calibrated", "model")
           if k != "model" or arrays["model"] is not arrays["calibrated"]}
    rep.setdefault("model", rep["calibrated"])  # a stage-1 policy: the same probability
    served = rep["emitted"]
    # ECE / AUROC of the calibrated probability (the emitted one is remapped on purpose)
    served["ece"], served["auroc"] = rep["calibrated"]["ece"], rep["calibrated"]["auroc"]
    policy_rep = classification_report(arrays["calibrated"], labels,
                                       decisions=arrays["decision"], n_bins=ECE_BINS,
                                       n_bootstrap=n_bootstrap)
    # exchangeability check against the policy's own val_calib scores (stored in the policy:
    # this function never reads val_calib)
    ref = getattr(policy, "score_reference", None)
    shift = compare_to_reference(ref, arrays["model"], labels) if ref is not None else None
    cm = served["confusion_matrix"]
    cascade = policy.kind == "cascade"
    report = TestReport(
        n_images=int(len(labels)), n_positive=int(labels.sum()), policy_kind=policy.kind,
        bundle_id=bundle_id, accuracy=served["accuracy"],
        balanced_accuracy=served["balanced_accuracy"]["value"], mcc=served["mcc"]["value"],
        auroc=served["auroc"]["value"], ece=served["ece"]["value"], ece_bins=ECE_BINS,
        fnr=_rate(served["fnr"]), fpr=_rate(served["fpr"]),
        confusion_matrix=[[cm["tn"], cm["fp"]], [cm["fn"], cm["tp"]]],
        policy_fnr=_rate(policy_rep["fnr"]),
        policy_defer_rate=float(policy_rep["defer_rate"]),
        model_balanced_accuracy=rep["model"]["balanced_accuracy"]["value"],
        served=served, policy=policy_rep, model=rep["model"],
        score_shift=shift, shift_warning=shift.warning if shift else None,
        validator=validator, comparison=comp.rows, skipped_rows=comp.skipped,
        cascade=cascade_serving(policy, comp.stage) if cascade else None,
        price_of_guarantee=price_of_guarantee(
            comp.rows, "cascade_served" if cascade else "stage1_served", validator),
        per_source=(per_source_metrics(sources, labels, arrays["emitted"], arrays["decision"])
                    if sources is not None else []),
        provenance=provenance,
    )
    return report, arrays


def per_source_metrics(sources: np.ndarray, labels: np.ndarray, emitted: np.ndarray,
                       decisions: np.ndarray) -> list[SourceMetrics]:
    """The served and policy numbers of each source's images.

    Served: pred = emitted > 0.5 (as ``classification_report`` at 0.5 for the overall
    row, so the confusion matrices sum to the overall one); FNR = FN / positives and
    FPR = FP / negatives with exact Clopper-Pearson 95 % intervals; MCC and accuracy
    of the same decisions. Policy: FNR counts a positive as missed only when the policy
    says negative (a deferral is not a miss), defer rate = share of deferrals.
    """
    src = np.asarray(sources).astype(str)
    y = np.asarray(labels).astype(np.int64).ravel()
    if src.shape != y.shape:
        raise BadInputError(f"per-source metrics: {src.size} source names for {y.size} "
                            "images: re-materialize split_manifest[val_test] and logits[val_test]")
    pred = (np.asarray(emitted, dtype=np.float64).ravel() > 0.5).astype(np.int64)
    dec = np.asarray(decisions).astype(np.int64).ravel()
    rows = []
    for name in sorted(set(src.tolist())):
        m = src == name
        ys, ps, ds = y[m], pred[m], dec[m]
        pos, neg = ys == 1, ys == 0
        tn, fp = int(np.sum(neg & (ps == 0))), int(np.sum(neg & (ps == 1)))
        fn, tp = int(np.sum(pos & (ps == 0))), int(np.sum(pos & (ps == 1)))
        rows.append(SourceMetrics(
            source=name, n_images=int(m.sum()), n_positive=int(pos.sum()),
            accuracy=float(np.mean(ys == ps)), mcc=mcc(ys, ps),
            fnr=_rate(rate_with_ci(fn, int(pos.sum()))),
            fpr=_rate(rate_with_ci(fp, int(neg.sum()))),
            confusion_matrix=[[tn, fp], [fn, tp]],
            policy_fnr=_rate(rate_with_ci(int(np.sum(pos & (ds == 0))), int(pos.sum()))),
            policy_defer_rate=float(np.mean(ds == -1))))
    return rows


def plot_reliability(calibrated: np.ndarray, labels: np.ndarray, dest: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from roadwork_assets.core.artifacts import atomic_path

    bins = reliability_bins(calibrated, labels, n_bins=ECE_BINS)
    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    conf, acc, count = (np.asarray(bins[k]) for k in ("confidence", "frequency", "count"))
    keep = count > 0
    ax.plot(conf[keep], acc[keep], "o-", color="tab:orange")
    ax.set_xlabel("predicted P(roadwork)")
    ax.set_ylabel("observed frequency")
    ax.set_title(f"Reliability (val_test, {ECE_BINS} bins)")
    fig.tight_layout()
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return dest


def sources_of(manifest: Any, item_ids: np.ndarray) -> np.ndarray | None:
    """Each logits row's source, looked up by item id in split_manifest[val_test]; None
    when the manifest predates the source column. A logits item absent from the
    manifest is refused (the two come from different assignments)."""
    if "source" not in getattr(manifest, "columns", ()):
        return None
    ids = np.asarray(item_ids).astype(str)
    by_id = manifest.set_index(manifest["item_id"].astype(str))["source"]
    found = by_id.reindex(ids)
    if found.isna().any():
        missing = ids[found.isna().to_numpy()][:5].tolist()
        raise ArtifactIntegrityError(
            f"logits[val_test] hold item(s) {missing} that split_manifest[val_test] does not: "
            "re-materialize embeddings[val_test] and logits[val_test]")
    return found.astype(str).to_numpy()


def per_source_markdown(report: TestReport) -> str:
    """The per-source table for the Dagster UI (served row; policy FNR beside it)."""
    if not report.per_source:
        return "_one source (no source column in split_manifest[val_test])_"

    def rate(r: RateWithInterval) -> str:
        if not r.n:
            return "n/a"
        return f"{r.errors}/{r.n} = {r.value:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}]"

    lines = ["| source | n | positives | MCC | accuracy | FNR (95% CP) | FPR (95% CP) | "
             "policy FNR | defer rate |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {s.source} | {s.n_images} | {s.n_positive} | {s.mcc:.3f} | {s.accuracy:.3f} | "
              f"{rate(s.fnr)} | {rate(s.fpr)} | {rate(s.policy_fnr)} | "
              f"{s.policy_defer_rate:.3f} |" for s in report.per_source]
    return "\n".join(lines)
