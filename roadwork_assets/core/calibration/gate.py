"""Learned failure gate: predict "the stage-1 decision is wrong" and defer those images.

Stage 1 decides negative iff p <= t_lo (p = calibrated probability of the main
view), positive otherwise. The gate sees per-image uncertainty features from
the [N, V, 2] multi-view logits (view 0 = main) and outputs g = P(wrong); it
accepts iff g <= tau and defers otherwise. Because it only turns decisions into
deferrals, it never raises the cascade FNR (see risk_control).

With one view the features are all functions of a single probability and rank
like max-prob (docs/domain.md), so the gate should only beat the baseline when the
views disagree informatively; `beats_baseline` reports what happened on held-out
data rather than assuming it.

The baseline confidence is the calibrated probability that the stage-1 decision
is right (p if positive, 1 - p if negative) — max-prob generalised to a
threshold t_lo != 0.5.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.special import expit, logit
from sklearn.linear_model import LogisticRegression

from roadwork_assets.contracts.errors import (
    ArtifactIntegrityError,
    BadInputError,
    InsufficientDataError,
)
from roadwork_assets.core.calibration.metrics import (
    aurc,
    clopper_pearson,
    decision_confidence,
)

GATE_FEATURES: tuple[str, ...] = (
    "max_prob",            # max softmax prob of the main view (raw logits)
    "margin",              # |z1 - z0| of the main view
    "entropy",             # binary entropy of the main view (nats)
    "view_pos_std",        # std across views of the positive prob
    "view_pos_range",      # max - min across views of the positive prob
    "view_disagreement",   # fraction of other views whose argmax differs from the main view's
    "decision_confidence", # calibrated P(stage-1 decision right)
    "threshold_distance",  # |logit(p) - logit(t_lo)|
)
_P_CLIP = 1e-12


def check_view_logits(view_logits: Any) -> np.ndarray:
    v = np.asarray(view_logits, dtype=np.float64)
    if v.ndim != 3 or v.shape[2] != 2 or v.shape[1] < 1:
        raise BadInputError(f"view logits must have shape [N, V, 2] with V >= 1; got {v.shape}")
    if not np.all(np.isfinite(v)):
        rows = np.flatnonzero(~np.isfinite(v).all(axis=(1, 2)))
        raise BadInputError(
            f"view logits contain non-finite values (NaN/inf) in {rows.size} row(s), first "
            f"rows {rows[:10].tolist()}: the model diverged or the logits file is damaged; "
            "re-materialize checkpoint and logits"
        )
    return v


def gate_features(view_logits: Any, p_cal: Any, t_lo: float, main_view: int = 0) -> np.ndarray:
    """[N, len(GATE_FEATURES)] features; vectorised over images and views."""
    v = check_view_logits(view_logits)
    p_cal = np.asarray(p_cal, dtype=np.float64).ravel()
    z = v[:, :, 1] - v[:, :, 0]  # [N, V]
    pv = expit(z)
    z0, p0 = z[:, main_view], pv[:, main_view]
    pc = np.clip(p0, _P_CLIP, 1 - _P_CLIP)
    entropy = -(pc * np.log(pc) + (1 - pc) * np.log1p(-pc))
    n_views = z.shape[1]
    if n_views > 1:
        disagree = ((z > 0) != (z0[:, None] > 0)).sum(axis=1) / (n_views - 1)
    else:
        disagree = np.zeros(z.shape[0])
    decision = (p_cal > t_lo).astype(np.int8)
    t_clip = float(np.clip(t_lo, _P_CLIP, 1 - _P_CLIP))
    dist = np.abs(logit(np.clip(p_cal, _P_CLIP, 1 - _P_CLIP)) - logit(t_clip))
    return np.stack(
        [np.maximum(p0, 1 - p0), np.abs(z0), entropy, pv.std(axis=1), np.ptp(pv, axis=1),
         disagree, decision_confidence(p_cal, decision), dist],
        axis=1,
    )


class FailureGate:
    """Standardised L2 logistic regression of "stage-1 wrong" on gate features.

    Learned: `mean_`, `scale_`, `coef_`, `intercept_` (plain numbers, so the gate is
    saved as JSON and applied with numpy only), `constant_`.

    When no stage-1 decision of the fit part is wrong (a near-perfect model) there is
    nothing to regress on: the gate is constant, coef = 0 and P(wrong) = 1/(n+2)
    (the Laplace estimate from 0 wrong of n), and `constant_` is True.
    """

    def __init__(self, C: float = 1.0) -> None:
        self.C = C

    def fit(self, features: Any, wrong: Any) -> FailureGate:
        x = np.asarray(features, dtype=np.float64)
        w = np.asarray(wrong).ravel().astype(np.int64)
        n_wrong = int(w.sum())
        if w.size == 0 or n_wrong == w.size:
            raise InsufficientDataError(
                f"the failure gate needs some right stage-1 decisions on its fit part; "
                f"got {n_wrong} wrong of {w.size}. Add calibration images or use kind='softmax'."
            )
        self.mean_ = x.mean(axis=0)
        scale = x.std(axis=0)
        self.scale_ = np.where(scale > 0, scale, 1.0)  # constant features (V = 1) drop out
        self.constant_ = n_wrong == 0
        if self.constant_:  # nothing wrong to learn from: a success, not an error
            self.coef_ = np.zeros(x.shape[1])
            self.intercept_ = float(logit(1.0 / (w.size + 2)))
            return self
        lr = LogisticRegression(C=self.C, max_iter=1000).fit((x - self.mean_) / self.scale_, w)
        self.coef_ = lr.coef_.ravel().astype(np.float64)
        self.intercept_ = float(lr.intercept_[0])
        return self

    def predict_proba(self, features: Any) -> np.ndarray:
        """P(stage-1 decision wrong) [N]."""
        x = np.asarray(features, dtype=np.float64)
        return expit(((x - self.mean_) / self.scale_) @ self.coef_ + self.intercept_)

    def to_params(self) -> dict[str, Any]:
        return {
            "feature_names": list(GATE_FEATURES), "C": float(self.C),
            "mean": [float(v) for v in self.mean_], "scale": [float(v) for v in self.scale_],
            "coef": [float(v) for v in self.coef_], "intercept": float(self.intercept_),
        }

    @classmethod
    def from_params(cls, data: dict[str, Any]) -> FailureGate:
        if list(data.get("feature_names", [])) != list(GATE_FEATURES):
            raise ArtifactIntegrityError(
                f"gate was saved with features {data.get('feature_names')}; this code computes "
                f"{list(GATE_FEATURES)}. Re-fit the gate policy."
            )
        g = cls(C=float(data.get("C", 1.0)))
        g.mean_ = np.asarray(data["mean"], dtype=np.float64)
        g.scale_ = np.asarray(data["scale"], dtype=np.float64)
        g.coef_ = np.asarray(data["coef"], dtype=np.float64)
        g.intercept_ = float(data["intercept"])
        g.constant_ = not np.any(g.coef_)
        return g


@dataclass(frozen=True)
class GateFit:
    gate: FailureGate
    tau: float  # accept iff P(wrong) <= tau
    gate_risk: float
    risk_met: bool  # some tau reached selective risk <= gate_risk on the held-out part
    accept_rate: float  # held-out
    selective_risk: float | None  # held-out error rate among accepted (estimate)
    selective_risk_upper: float | None  # one-sided Clopper–Pearson (1 - delta) bound at tau
    aurc_gate: float
    aurc_baseline: float
    accepts_all: bool = False  # no wrong stage-1 decision on the fit part: tau = 1

    @property
    def beats_baseline(self) -> bool:
        return bool(self.aurc_gate < self.aurc_baseline)


def fit_failure_gate(
    features_fit: Any,
    wrong_fit: Any,
    features_eval: Any,
    wrong_eval: Any,
    baseline_confidence_eval: Any,
    *,
    gate_risk: float = 0.05,
    delta: float = 0.1,
    C: float = 1.0,
) -> GateFit:
    """Fit on one part, choose tau and compare with the baseline on a disjoint part.

    tau is the largest candidate (quantiles of the fit-part gate scores, so the
    candidates do not depend on the held-out part) whose held-out error rate
    among accepted images is <= gate_risk — a plug-in estimate, not a guarantee;
    the (1 - delta) Clopper–Pearson upper bound at that tau is reported next to
    it. If no candidate reaches the target, tau = -1 and the gate defers everything.
    If no stage-1 decision of the fit part is wrong, the gate is constant and accepts
    everything (tau = 1, `accepts_all`); the held-out error rate is still reported.
    """
    gate = FailureGate(C=C).fit(features_fit, wrong_fit)
    g_fit = gate.predict_proba(features_fit)
    g_eval = gate.predict_proba(features_eval)
    w_eval = np.asarray(wrong_eval).ravel().astype(np.float64)
    # accept-all gate: the only candidate is tau = 1 (every P(wrong) <= 1)
    cands = np.array([1.0]) if gate.constant_ else np.unique(np.quantile(g_fit, np.linspace(0.0, 1.0, 201)))
    order = np.argsort(g_eval)
    g_sorted, w_sorted = g_eval[order], w_eval[order]
    n_acc = np.searchsorted(g_sorted, cands, side="right")
    n_err = np.r_[0.0, np.cumsum(w_sorted)][n_acc]
    with np.errstate(invalid="ignore", divide="ignore"):
        risk = np.where(n_acc > 0, n_err / np.maximum(n_acc, 1), np.inf)
    ok = np.flatnonzero((n_acc > 0) & (risk <= gate_risk))
    n = max(g_eval.size, 1)
    sel_risk: float | None = None
    upper: float | None = None
    if gate.constant_ or ok.size:
        i = 0 if gate.constant_ else int(ok[-1])
        tau, na, ne = float(cands[i]), int(n_acc[i]), int(n_err[i])
        if na:
            sel_risk = ne / na
            # one-sided exact (Clopper–Pearson) upper bound at level 1 - delta
            upper = clopper_pearson(ne, na, 1.0 - delta, alternative="less")[1]
    else:
        tau, na = -1.0, 0
    return GateFit(
        gate=gate, tau=tau, gate_risk=gate_risk, risk_met=bool(ok.size), accept_rate=na / n,
        selective_risk=sel_risk, selective_risk_upper=upper,
        aurc_gate=aurc(-g_eval, w_eval), aurc_baseline=aurc(baseline_confidence_eval, w_eval),
        accepts_all=bool(gate.constant_),
    )
