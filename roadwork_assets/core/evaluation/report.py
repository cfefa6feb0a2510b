"""Final evaluation of a bundle's policy on held-out logits (val_test only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from roadwork_assets.contracts.errors import ArtifactIntegrityError, BadInputError
from roadwork_assets.contracts.policy_schemas import PolicyParams
from roadwork_assets.contracts.schemas import Provenance, RateWithInterval, TestReport
from roadwork_assets.contracts.validator_schemas import ValidatorSimulation
from roadwork_assets.core.calibration.metrics import classification_report, reliability_bins
from roadwork_assets.core.calibration.policies import apply_policy, policy_probability
from roadwork_assets.core.evaluation.shift import compare_to_reference
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


def _rate(entry: dict[str, Any]) -> RateWithInterval:
    return RateWithInterval(value=entry["value"], errors=entry["k"], n=entry["n"],
                            ci_low=entry["ci_low"], ci_high=entry["ci_high"])


def evaluate_bundle_policy(
    policy: PolicyParams,
    view_logits: np.ndarray,
    labels: np.ndarray,
    *,
    bundle_id: str,
    provenance: Provenance,
    n_bootstrap: int = 1000,
    validator: ValidatorSimulation | None = None,
) -> tuple[TestReport, dict[str, np.ndarray]]:
    """Return the report and the arrays the plots need. ``validator``: the validator
    simulation of the same bundle (``core.evaluation.validator_rows``), carried as is."""
    if not np.isfinite(view_logits).all():
        bad = np.flatnonzero(~np.isfinite(view_logits).all(axis=tuple(range(1, view_logits.ndim))))
        raise BadInputError(f"val_test logits hold NaN/inf at rows {bad[:10].tolist()}: "
                            "re-materialize logits[val_test]")
    decision, emitted = apply_policy(policy, view_logits)
    calibrated = policy_probability(policy, view_logits)
    served = classification_report(emitted, labels, threshold=0.5, n_bins=ECE_BINS,
                                   n_bootstrap=n_bootstrap)
    # ECE / AUROC of the calibrated probability (the emitted one is remapped on purpose)
    calib = classification_report(calibrated, labels, threshold=0.5, n_bins=ECE_BINS,
                                  n_bootstrap=n_bootstrap)
    served["ece"] = calib["ece"]
    served["auroc"] = calib["auroc"]
    policy_rep = classification_report(calibrated, labels, decisions=decision,
                                       n_bins=ECE_BINS, n_bootstrap=n_bootstrap)
    # exchangeability check against the policy's own val_calib scores (stored in the policy:
    # this function never reads val_calib)
    ref = policy.score_reference
    shift = compare_to_reference(ref, calibrated, labels) if ref is not None else None
    cm = served["confusion_matrix"]
    report = TestReport(
        n_images=int(len(labels)),
        n_positive=int(labels.sum()),
        policy_kind=policy.kind,
        bundle_id=bundle_id,
        accuracy=served["accuracy"],
        balanced_accuracy=served["balanced_accuracy"]["value"],
        mcc=served["mcc"]["value"],
        auroc=served["auroc"]["value"],
        ece=served["ece"]["value"],
        ece_bins=ECE_BINS,
        fnr=_rate(served["fnr"]),
        fpr=_rate(served["fpr"]),
        confusion_matrix=[[cm["tn"], cm["fp"]], [cm["fn"], cm["tp"]]],
        policy_fnr=_rate(policy_rep["fnr"]),
        policy_defer_rate=float(policy_rep["defer_rate"]),
        model_balanced_accuracy=calib["balanced_accuracy"]["value"],
        served=served,
        policy=policy_rep,
        model=calib,
        score_shift=shift,
        shift_warning=shift.warning if shift else None,
        validator=validator,
        provenance=provenance,
    )
    return report, {"calibrated": calibrated, "emitted": emitted, "decision": decision}


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
