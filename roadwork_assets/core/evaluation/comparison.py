"""The ways of serving a bundle side by side on the val_test logits (clean images, every
image answered, binarised at 0.5 as the validator does): the same rows as the validator
simulator (``validator_rows.ROWS``), from the logits the graph already computed, so the
report has the comparison even when the simulator is off.

- ``cascade_served``: ``apply_cascade`` on logits[val_test] and multiview_logits[val_test]
  (stage 2 is read for the routed images only).
- ``stage1_served``: the stage-1 exit policy's remapped probability (a cascade bundle: the
  ``thresholds`` softmax policy; a stage-1 bundle: its own policy).
- ``single_view_0.5``: the calibrated main-view probability (the reference miner).
- ``stage2_0.5``: the calibrated stage-2 probability of every image.

The price of the guarantee is what the reference miner scores minus what the bundle as
served scores: the MCC and reward given up for an FNR held at alpha.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from roadwork_assets.contracts.errors import BadInputError
from roadwork_assets.contracts.policy_schemas import PolicyParams
from roadwork_assets.contracts.schemas import (
    PriceOfGuarantee,
    RateWithInterval,
    ServedRowMetrics,
)
from roadwork_assets.contracts.validator_schemas import ValidatorSimulation
from roadwork_assets.core.calibration.cascade import (
    apply_cascade,
    cascade_stage2_probability,
)
from roadwork_assets.core.calibration.metrics import (
    balanced_accuracy,
    confusion_counts,
    mcc,
    rate_with_ci,
)
from roadwork_assets.core.calibration.policies import apply_policy, policy_probability
from roadwork_assets.core.evaluation.validator import binarise, expected_reward
from roadwork_assets.core.evaluation.validator_rows import ROWS

REFERENCE_ROW = "single_view_0.5"


def _rate(entry: dict) -> RateWithInterval:
    return RateWithInterval(value=entry["value"], errors=entry["k"], n=entry["n"],
                            ci_low=entry["ci_low"], ci_high=entry["ci_high"])


def served_row(name: str, served_probability: np.ndarray, labels: np.ndarray, *,
               description: str | None = None,
               routing_rate: float | None = None) -> ServedRowMetrics:
    """Metrics of one row's served probabilities binarised as the validator does
    (np.round: 0.5 -> 0); every answer must be a probability."""
    y = np.asarray(labels).ravel().astype(np.int64)
    d = binarise(served_probability)
    if d.shape != y.shape:
        raise BadInputError(f"row {name!r}: {d.size} answers for {y.size} labels")
    if np.any(d < 0):
        raise BadInputError(f"row {name!r} emits answers outside [0, 1] (or NaN) at rows "
                            f"{np.flatnonzero(d < 0)[:10].tolist()}")
    cm = confusion_counts(y, d)
    n_pos, n_neg = cm["tp"] + cm["fn"], cm["tn"] + cm["fp"]
    reward = (expected_reward(cm["tp"] / n_pos, cm["tn"] / n_neg)
              if n_pos and n_neg else None)
    return ServedRowMetrics(
        name=name, description=description or ROWS[name].description, n=int(y.size),
        accuracy=float(np.mean(d == y)), balanced_accuracy=balanced_accuracy(y, d),
        mcc=mcc(y, d), fnr=_rate(rate_with_ci(cm["fn"], n_pos)),
        fpr=_rate(rate_with_ci(cm["fp"], n_neg)), reward=reward, routing_rate=routing_rate)


@dataclass
class Comparison:
    rows: list[ServedRowMetrics]
    skipped: dict[str, str]  # row -> why it does not apply
    served: dict[str, np.ndarray] = field(default_factory=dict)  # row -> served probability
    stage: np.ndarray | None = None  # cascade only: 1 / 2, the stage that decided


def _stage1_reason(policy: PolicyParams, stage1_policy: PolicyParams | None) -> str | None:
    if policy.kind != "cascade":
        return None
    if stage1_policy is None:
        return ("stage 1 alone needs the fitted `thresholds` softmax policy of the bundle's "
                "checkpoint; none was given")
    return None


def compare_served(policy: PolicyParams, view_logits: np.ndarray, labels: np.ndarray, *,
                   stage2_logits: np.ndarray | None = None,
                   stage1_policy: PolicyParams | None = None) -> Comparison:
    """Every row of ``ROWS`` that applies, in its order. ``stage2_logits``: [N, 2] (or
    [N, 1, 2]) pooled stage-2 logits, needed by the cascade rows; ``stage1_policy``: the
    stage1_served row's policy for a cascade bundle."""
    cascade = policy.kind == "cascade"
    skipped: dict[str, str] = {}
    if not cascade:
        why = f"the bundle serves a {policy.kind!r} policy: a stage-1 bundle has no stage 2"
        skipped |= {"cascade_served": why, "stage2_0.5": why}
    elif stage2_logits is None:
        why = "no stage-2 logits (multiview_logits[val_test]) were given"
        skipped |= {"cascade_served": why, "stage2_0.5": why}
    if (why := _stage1_reason(policy, stage1_policy)) is not None:
        skipped["stage1_served"] = why
    served: dict[str, np.ndarray] = {}
    stage = routing = None
    if "cascade_served" not in skipped:  # stage2_0.5 applies exactly when this does
        z2 = np.asarray(stage2_logits, dtype=np.float64)
        if z2.size != 2 * len(view_logits) or z2.shape[-1] != 2:
            raise BadInputError(f"stage-2 logits {z2.shape} do not match {len(view_logits)} "
                                "images: expected [N, 2] or [N, 1, 2]")
        z2 = z2.reshape(len(view_logits), 2)
        _, served["cascade_served"], stage = apply_cascade(policy, view_logits, z2)
        routing = float(np.mean(stage == 2))
    if "stage1_served" not in skipped:
        served["stage1_served"] = apply_policy(stage1_policy if cascade else policy,
                                               view_logits)[1]
    served["single_view_0.5"] = policy_probability(policy, view_logits)
    if "stage2_0.5" not in skipped:
        served["stage2_0.5"] = cascade_stage2_probability(policy, z2)
    rows = [served_row(name, served[name], labels,
                       routing_rate=routing if name == "cascade_served" else None)
            for name in ROWS if name in served]
    return Comparison(rows=rows, skipped=skipped, served=served, stage=stage)


def price_of_guarantee(rows: list[ServedRowMetrics], served: str,
                       validator: ValidatorSimulation | None = None) -> PriceOfGuarantee | None:
    """Reference miner (single_view_0.5) minus the bundle as served (``served``); None when
    either row is missing."""
    by_name = {r.name: r for r in rows}
    if REFERENCE_ROW not in by_name or served not in by_name:
        return None
    ref, srv = by_name[REFERENCE_ROW], by_name[served]
    reward_gap = (None if ref.reward is None or srv.reward is None
                  else ref.reward - srv.reward)
    sim_gap = None
    if validator is not None:
        sim = {r.name: r.reward.mean for r in validator.rows}
        if REFERENCE_ROW in sim and served in sim:
            sim_gap = sim[REFERENCE_ROW] - sim[served]
    return PriceOfGuarantee(reference=REFERENCE_ROW, served=served,
                            mcc_gap=ref.mcc - srv.mcc, reward_gap=reward_gap,
                            validator_reward_gap=sim_gap, fnr_reference=ref.fnr.value,
                            fnr_served=srv.fnr.value)


def _pct(rate: RateWithInterval) -> str:
    if rate.value is None:
        return "—"
    return f"{rate.value:.4f} [{rate.ci_low:.4f}, {rate.ci_high:.4f}]"


def comparison_table(rows: list[ServedRowMetrics], skipped: dict[str, str] | None = None) -> str:
    """Markdown: one line per row (val_test logits, binarised at 0.5), then the rows left out."""
    lines = ["| row | MCC | accuracy | balanced acc. | FNR [95% CP] | FPR | routing | "
             "reward (closed form) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        routing = "—" if r.routing_rate is None else f"{r.routing_rate:.1%}"
        reward = "—" if r.reward is None else f"{r.reward:.3f}"
        fpr = "—" if r.fpr.value is None else f"{r.fpr.value:.4f}"
        lines.append(f"| {r.name} | {r.mcc:.4f} | {r.accuracy:.4f} | "
                     f"{r.balanced_accuracy:.4f} | {_pct(r.fnr)} | {fpr} | {routing} | "
                     f"{reward} |")
    out = "\n".join(lines) + ("\n\nval_test logits (clean images), served probability "
                              "binarised at 0.5 as the validator does (np.round).")
    for name, why in (skipped or {}).items():
        out += f"\n\n{name}: left out — {why}"
    return out
