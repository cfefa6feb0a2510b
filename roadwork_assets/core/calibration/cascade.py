"""A two-stage cascade as ONE exit policy, with one FNR guarantee over the composed decision.

Inputs per image: p1 = calibrated stage-1 P(roadwork), p2 = stage-2 P(roadwork) (only
needed where the image is routed), the label and the scene / group key.

Decision rule. A shape (ρ, b₀), ρ in (0, 1], and one index λ in [0, 1] with t₂ = 1 - λ:

    a(λ) = ρ·t₂                       stage 1 exits NEGATIVE  iff p1 <= a(λ)
    b(λ) = max(a(λ), b₀)              stage 1 exits POSITIVE  iff p1 >  b(λ)
    c(λ) = t₂                         otherwise routed; stage 2 says positive iff p2 > c(λ)

Why it is nested. a, b and c are all non-increasing in λ, and a roadwork image is missed
iff the composed decision is negative:

    miss(λ) = 1{p1 <= a(λ)}  ∨  1{p1 <= b(λ) ∧ p2 <= c(λ)}

(an image with p1 <= a is negative whatever p2 says, so the second term may include it).
Each indicator is a threshold that moves down as λ grows, so miss(λ') <= miss(λ) for
λ' >= λ, image by image: a larger λ never adds a miss. Equivalently, with
u = p1/ρ, a roadwork image is missed iff e <= t₂ for the *effective score*

    e = min(u, p2)  if p1 <= b₀,      e = u  otherwise,

so certifying λ on the composed decision is `risk_control.crc_fnr_threshold` on e —
the existing group-CRC helper, not a copy of it.

Certification (conformal risk control, Angelopoulos et al. 2022, by group). On the
threshold part of `policies.split_calibration_set` (same salt and fit_fraction as the
stage-1 policies, so stage 1's calibrator was fitted on the other part), a scene g with
roadwork carries L_g(λ) = share of its roadwork images missed by the cascade, and

    λ̂ = min{λ : (Σ_g L_g(λ) + 1)/(n_g + 1) <= α}   ⇒   E[L_new(λ̂)] <= α.

Any λ >= λ̂ keeps the guarantee, even one chosen from the same data: L_new(λ) <= L_new(λ̂)
pointwise. So the served λ is the certified one with the best estimated validator reward
within the latency budget. The shape (ρ, b₀) is chosen on the fit part only (disjoint).

Cost and reward. Routing rate r(λ) = P(a(λ) < p1 <= b(λ)); per-image latency
lat₁ + r·lat₂. Estimated reward = (0.5·max(MCC, 0) + 0.5·accuracy)³ of the binarised
decisions on the threshold part (validator's rule, docs/domain.md), with the class mix
reweighted to `positive_prior` (the validator draws labels 50/50) unless it is None.
Both are in-sample estimates, not guarantees.

Served probability. One number per image, binarised at 0.5 by the validator (np.round:
0.5 -> 0): the deciding stage's probability, monotonically remapped (`remap_probability`)
so that its threshold lands on 0.5 — p1 around a for stage-1 negatives, p1 around b for
stage-1 positives, p2 around c for routed images. Exactly 0.5 is never emitted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from roadwork_assets.contracts.errors import BadInputError, InsufficientDataError
from roadwork_assets.contracts.policy_schemas import (
    CalibratorSpec,
    CascadeAlphaPoint,
    CascadeFrontierPoint,
    CascadePolicyParams,
    CascadeShapeCandidate,
)
from roadwork_assets.core.calibration.calibrators import as_binary_labels, calibrator_from_params
from roadwork_assets.core.calibration.metrics import _mcc_from_counts
from roadwork_assets.core.calibration.policies import (
    policy_probability,
    remap_probability,
    select_calibrator,
    split_calibration_set,
)
from roadwork_assets.core.calibration.policy_config import PolicyFitConfig
from roadwork_assets.core.calibration.risk_control import crc_fnr_threshold, unit_weights
from roadwork_assets.core.evaluation.shift import score_reference

NEGATIVE, POSITIVE = 0, 1
STAGE1, STAGE2 = 1, 2
DEFAULT_ALPHAS: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2)


class CascadeConfig(BaseModel):
    """Settings of a cascade fit. Latencies are measured per image, in seconds.

    `rho_grid` x `exit_pos_grid` are the shapes tried on the fit part (ρ: stage 1's
    negative threshold as a fraction of stage 2's; b₀: the floor of stage 1's positive
    exit, 1.0 = never exit positive at stage 1; b₀ = 0 is stage 1 alone, no routing).
    `n_lambda` grid points of λ make the plotted frontier and the candidates above λ̂.
    `alphas`: the α frontier (the cascade refitted at each; () skips it).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    alpha: float = Field(0.02, gt=0, lt=1)
    latency_stage1_s: float = Field(ge=0)
    latency_stage2_s: float = Field(ge=0)
    latency_budget_s: float = Field(1.0, gt=0)  # well under the validator's 9 s timeout
    rho_grid: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 1.0)
    exit_pos_grid: tuple[float, ...] = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
    n_lambda: int = Field(101, ge=2)
    positive_prior: float | None = Field(0.5, gt=0, lt=1)
    alphas: tuple[float, ...] = DEFAULT_ALPHAS
    fit_fraction: float = Field(0.5, gt=0, lt=1)
    context: str = "val_calib"

    @field_validator("rho_grid")
    @classmethod
    def _rho_in_range(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v or any(not 0.0 < r <= 1.0 for r in v):
            raise ValueError("rho_grid needs at least one value, each in (0, 1]")
        return v

    @field_validator("exit_pos_grid")
    @classmethod
    def _floor_in_range(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v or any(not 0.0 <= b <= 1.0 for b in v):
            raise ValueError("exit_pos_grid needs at least one value, each in [0, 1]")
        return v

    @field_validator("alphas")
    @classmethod
    def _alphas_in_range(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if any(not 0.0 < a < 1.0 for a in v):
            raise ValueError("every alpha of the frontier must be in (0, 1)")
        return v

    @model_validator(mode="after")
    def _stage1_fits_budget(self):
        if self.latency_stage1_s > self.latency_budget_s:
            raise ValueError(
                f"latency_stage1_s={self.latency_stage1_s:g} s exceeds latency_budget_s="
                f"{self.latency_budget_s:g} s: no configuration can meet it; raise the budget"
            )
        return self

    def shapes(self) -> list[tuple[float, float]]:
        """(ρ, b₀) pairs; with b₀ = 0 every ρ gives the same no-routing family: ρ = 1 only."""
        out = [(1.0, 0.0)] if 0.0 in self.exit_pos_grid else []
        out += [(r, b) for b in self.exit_pos_grid if b > 0.0 for r in self.rho_grid]
        return out


# ------------------------------------------------------------------- the rule
def cascade_thresholds(t2: Any, rho: float, exit_pos_floor: float) -> tuple[Any, Any, Any]:
    """(a, b, c) = (ρ·t₂, max(ρ·t₂, b₀), t₂); vectorised over t₂."""
    a = rho * np.asarray(t2, dtype=np.float64)
    return a, np.maximum(a, exit_pos_floor), np.asarray(t2, dtype=np.float64)


def effective_score(p1: Any, p2: Any, rho: float, exit_pos_floor: float) -> np.ndarray:
    """e with miss(t₂) = 1{e <= t₂} for a roadwork image (module docstring)."""
    p1 = np.asarray(p1, dtype=np.float64)
    u = p1 / rho
    return np.where(p1 <= exit_pos_floor, np.minimum(u, np.asarray(p2, dtype=np.float64)), u)


def _decide(p1: np.ndarray, p2: np.ndarray, t2: np.ndarray, rho: float, b0: float):
    """Negative / routed masks for every t₂ (rows) and image (columns)."""
    a, b, c = cascade_thresholds(np.asarray(t2)[:, None], rho, b0)
    neg1 = p1[None, :] <= a
    routed = ~neg1 & (p1[None, :] <= b)
    return neg1 | (routed & (p2[None, :] <= c)), routed


def validator_reward(y: np.ndarray, negative: np.ndarray, positive_prior: float | None):
    """(reward, mcc, accuracy) for rows of negative-decision masks [G, N] against labels y.

    reward = (0.5·max(MCC, 0) + 0.5·accuracy)³; with `positive_prior` π the confusion
    table is reweighted to a π : 1-π label mix (the validator's is 50/50)."""
    pos, neg = y == 1, y == 0
    tp = np.sum(~negative & pos, axis=-1).astype(np.float64)
    tn = np.sum(negative & neg, axis=-1).astype(np.float64)
    n_pos, n_neg = float(pos.sum()), float(neg.sum())
    fn, fp = n_pos - tp, n_neg - tn
    if positive_prior is not None:
        w1, w0 = positive_prior / n_pos, (1.0 - positive_prior) / n_neg
        tp, fn, tn, fp = tp * w1, fn * w1, tn * w0, fp * w0
    total = tp + tn + fp + fn
    acc = (tp + tn) / total
    m = np.maximum(_mcc_from_counts(tp, tn, fp, fn), 0.0)
    return (0.5 * m + 0.5 * acc) ** 3, m, acc


# ------------------------------------------------------------------ checks
def _probabilities(x: Any, what: str, n: int | None = None) -> np.ndarray:
    p = np.asarray(x, dtype=np.float64).ravel()
    if n is not None and p.size != n:
        raise BadInputError(f"{what} has {p.size} values for {n} images (p1); give one per image")
    bad = ~np.isfinite(p) | (p < 0.0) | (p > 1.0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise BadInputError(
            f"{what} has {int(bad.sum())} value(s) outside [0, 1] or not finite (first at index {i}: "
            f"{p[i]:g}); pass calibrated probabilities (apply the calibrator or sigmoid to logits first)"
        )
    return p


@dataclass(frozen=True)
class _Part:
    p1: np.ndarray
    p2: np.ndarray
    y: np.ndarray
    groups: np.ndarray | None  # str keys, or None (every image its own unit)

    def take(self, idx: np.ndarray) -> _Part:
        return _Part(self.p1[idx], self.p2[idx], self.y[idx], None if self.groups is None else self.groups[idx])

    def pos_groups(self) -> np.ndarray | None:
        return None if self.groups is None else self.groups[self.y == 1]


def _loss_sums(e_pos: np.ndarray, w: np.ndarray, t2: np.ndarray) -> np.ndarray:
    """S(t₂) = Σ_g L_g(t₂) = Σ_i w_i 1{e_i <= t₂} at every t₂."""
    order = np.argsort(e_pos, kind="stable")
    return np.r_[0.0, np.cumsum(w[order])][np.searchsorted(e_pos[order], t2, side="right")]


@dataclass(frozen=True)
class _Scored:
    """Rule and estimates of one (shape, t₂) set on a part of the data."""

    t2: np.ndarray
    fnr: np.ndarray
    reward: np.ndarray
    mcc: np.ndarray
    acc: np.ndarray
    routing: np.ndarray
    latency: np.ndarray


def _score(part: _Part, t2: np.ndarray, rho: float, b0: float, cfg: CascadeConfig) -> _Scored:
    negative, routed = _decide(part.p1, part.p2, t2, rho, b0)
    reward, m, acc = validator_reward(part.y, negative, cfg.positive_prior)
    routing = routed.mean(axis=1)
    fnr = np.sum(negative & (part.y == 1), axis=1) / max(int(part.y.sum()), 1)
    return _Scored(t2, fnr, reward, m, acc, routing,
                   cfg.latency_stage1_s + routing * cfg.latency_stage2_s)


def _proxy_t2(part: _Part, rho: float, b0: float, alpha: float) -> float:
    """t₂ on the fit part, for choosing the shape only: the CRC rule, or the plug-in
    rule S(t₂)/n_g <= α when the fit part has too few units for CRC."""
    e = effective_score(part.p1, part.p2, rho, b0)[part.y == 1]
    try:
        return min(crc_fnr_threshold(e, alpha, groups=part.pos_groups()).t_lo, 1.0)
    except InsufficientDataError:
        w, n = unit_weights(part.pos_groups(), e.size)
        cand = np.r_[np.nextafter(np.min(e), -np.inf), np.sort(e)]
        ok = _loss_sums(e, w, cand) <= alpha * n + 1e-12
        return float(min(cand[np.flatnonzero(ok)[-1]], 1.0))


@dataclass(frozen=True)
class _Fit:
    rho: float
    b0: float
    t2_hat: float
    t2: float
    crc_bound: float
    n_units: int
    scored: _Scored  # the chosen point on the threshold part (length-1 arrays)
    budget_met: bool
    shapes: list[CascadeShapeCandidate]
    frontier: list[CascadeFrontierPoint]


def _lam(t2: float) -> float:
    return float(np.clip(1.0 - t2, 0.0, 1.0))


def _best_certified(part: _Part, rho: float, b0: float, t2_hat: float, cfg: CascadeConfig):
    """(scores of every certified candidate t₂ <= t̂₂, index of the served one, within budget?).

    Candidates: t̂₂ and the λ-grid points below it. Served: the best estimated reward
    within the latency budget (ties: lower latency, then the smaller λ); if none is
    within it, the least latency (routing only grows as t₂ falls: that is t̂₂)."""
    grid = 1.0 - np.linspace(0.0, 1.0, cfg.n_lambda)
    cand = np.r_[t2_hat, grid[grid < t2_hat]]
    s = _score(part, cand, rho, b0, cfg)
    feasible = s.latency <= cfg.latency_budget_s + 1e-12
    if not feasible.any():
        return s, int(np.argmin(s.latency)), False
    key = np.lexsort((np.arange(cand.size), s.latency, -s.reward))
    return s, int(next(j for j in key if feasible[j])), True


def _choose_shape(fit: _Part | None, cfg: CascadeConfig, alpha: float) -> tuple[tuple[float, float], list]:
    """The shape with the best estimated reward on the fit part, scored as it will be on
    the threshold part (certify there, then the best certified λ within the budget)."""
    shapes = cfg.shapes()
    if len(shapes) == 1 or fit is None:
        return shapes[0], []
    rows = []
    for rho, b0 in shapes:
        s, i, ok = _best_certified(fit, rho, b0, _proxy_t2(fit, rho, b0, alpha), cfg)
        rows.append(CascadeShapeCandidate(
            rho=rho, exit_pos_floor=b0, lam=_lam(float(s.t2[i])), reward=float(s.reward[i]),
            routing_rate=float(s.routing[i]), latency_s=float(s.latency[i]), within_budget=ok))
    ok_rows = [r for r in rows if r.within_budget] or rows
    best = max(ok_rows, key=lambda r: (r.reward, -r.latency_s))
    return (best.rho, best.exit_pos_floor), rows


def _fit_at(fit: _Part | None, thr: _Part, cfg: CascadeConfig, alpha: float, ctx: str) -> _Fit:
    (rho, b0), shape_rows = _choose_shape(fit, cfg, alpha)
    pos = thr.y == 1
    e = effective_score(thr.p1, thr.p2, rho, b0)[pos]
    crc = crc_fnr_threshold(e, alpha, groups=thr.pos_groups(), context=ctx)
    t2_hat = min(crc.t_lo, 1.0)
    w, n_units = unit_weights(thr.pos_groups(), e.size)
    s, i, budget_met = _best_certified(thr, rho, b0, t2_hat, cfg)
    cand = s.t2
    bound = (_loss_sums(e, w, np.array([cand[i]]))[0] + 1.0) / (n_units + 1)
    chosen = _Scored(*(np.atleast_1d(getattr(s, f)[i]) for f in _Scored.__dataclass_fields__))
    grid = 1.0 - np.linspace(0.0, 1.0, cfg.n_lambda)
    fg = _score(thr, grid, rho, b0, cfg)
    bounds = (_loss_sums(e, w, grid) + 1.0) / (n_units + 1)
    frontier = [
        CascadeFrontierPoint(
            lam=_lam(t), t2=float(t), crc_bound=float(min(bd, 1.0)), certified=bool(t <= t2_hat),
            fnr=float(fg.fnr[j]), reward=float(fg.reward[j]), routing_rate=float(fg.routing[j]),
            latency_s=float(fg.latency[j]))
        for j, (t, bd) in enumerate(zip(grid, bounds, strict=True))
    ]
    return _Fit(rho, b0, t2_hat, float(cand[i]), float(bound), n_units, chosen,
                budget_met, shape_rows, frontier)


def _statement(f: _Fit, alpha: float, ctx: str, n_pos: int, n_fit: int, grouped: bool,
               cfg: CascadeConfig) -> str:
    a, b, c = (float(v) for v in cascade_thresholds(f.t2, f.rho, f.b0))
    units = (f"{f.n_units} scenes/groups with roadwork ({n_pos} roadwork images) of the {ctx}, one "
             "exchangeable unit per group with loss L_g(lambda) = share of the group's roadwork images "
             "the cascade decides negative") if grouped else \
        f"{n_pos} roadwork images of the {ctx}, one exchangeable unit per image"
    risk = "share of a new scene's roadwork images missed" if grouped else "FNR"
    parts = [
        (f"Cascade, one lambda (conformal risk control over the composed decision, Angelopoulos et al. "
         f"2022): stage 1 exits negative iff p1 <= a = rho*t2 = {a:.6g}, exits positive iff p1 > b = "
         f"max(a, {f.b0:g}) = {b:.6g}, otherwise routes to stage 2, which says positive iff p2 > t2 = "
         f"{c:.6g} (lambda = 1 - t2 = {_lam(f.t2):.4g}, rho = {f.rho:g})."),
        ("A roadwork image is missed iff the cascade's final decision is negative, at either stage; "
         "every threshold falls as lambda grows, so the miss set is nested (never grows with lambda)."),
        (f"On the {units}: lambda_hat = {_lam(f.t2_hat):.4g} is the smallest lambda with "
         f"(sum_g L_g(lambda) + 1)/(n_g + 1) <= alpha, and the served lambda >= lambda_hat "
         f"(bound {f.crc_bound:.4g}), so E[{risk} by the composed decision] <= alpha = {alpha:g}, "
         "the expectation over the draw of the threshold part and the new "
         f"{'scene' if grouped else 'image'} (marginal, not conditional on this draw)."),
        ("Choosing lambda >= lambda_hat by estimated reward keeps the guarantee (the loss is "
         "monotone in lambda); the shape (rho, b0) was chosen on the disjoint fit part "
         f"(n={n_fit}) only."),
        (f"Assumes deployment {'scenes' if grouped else 'images'} are exchangeable with the {ctx}'s, "
         "that stage 1's calibrator and stage 2 were fitted without the threshold part, and that "
         "both stages are deterministic. Routing rate, latency and validator reward are in-sample "
         "estimates on the threshold part, not guarantees."),
    ]
    if not f.budget_met:
        parts.append(f"No certified lambda of this shape meets the latency budget "
                     f"({cfg.latency_budget_s:g} s); the served one has the least latency.")
    return " ".join(parts)


# --------------------------------------------------------------- estimator
P2Source = Any | Callable[[np.ndarray], Any]


class CascadePolicy:
    """sklearn-style estimator of the one-λ cascade (module docstring).

    `fit(p1, p2, y, groups, image_ids=None)` learns `rho_`, `exit_pos_floor_`, `t2_`,
    `t_exit_neg_`, `t_exit_pos_`, `lambda_`, `lambda_certified_` and `params_` (a
    `CascadePolicyParams`, frontiers and statement included). `predict(p1, p2)` ->
    (decision int8 {0, 1}, served probability float64, stage int8 {1, 2}).
    """

    def __init__(self, config: CascadeConfig) -> None:
        self.config = config

    # ---- fit
    def fit(self, p1: Any, p2: Any, y: Any, groups: Sequence[Any] | None = None, *,
            image_ids: Sequence[Any] | None = None) -> CascadePolicy:
        cfg = self.config
        p1a = _probabilities(p1, "p1 (stage-1 probabilities)")
        n = p1a.size
        p2a = _probabilities(p2, "p2 (stage-2 probabilities)", n)
        ya = as_binary_labels(y, n, dtype=np.int64)
        if groups is not None and len(groups) != n:
            raise BadInputError(f"groups has {len(groups)} keys for {n} images (p1); give one group key "
                                "per image (its scene), or None for one unit per image")
        ids = list(range(n)) if image_ids is None else list(image_ids)
        if len(ids) != n:
            raise BadInputError(f"image_ids has {len(ids)} ids for {n} images (p1); give one per image")
        keys = None if groups is None else np.asarray([str(g) for g in groups])
        idx_fit, idx_thr = split_calibration_set(ids, ya, cfg.fit_fraction,
                                                 groups=None if keys is None else list(keys))
        data = _Part(p1a, p2a, ya, keys)
        thr, ctx = data.take(idx_thr), f"{cfg.context} threshold part"
        n_pos, n_neg = int(thr.y.sum()), int((1 - thr.y).sum())
        if n_pos == 0 or n_neg == 0:
            what = "roadwork" if n_pos == 0 else "none (label 0)"
            raise InsufficientDataError(
                f"{ctx} has 0 {what} images ({idx_thr.size} images in "
                f"{'its groups' if keys is not None else 'it'}); the FNR certificate needs roadwork and "
                "the reward estimate both labels. Add images of that label from more scenes or change "
                "fit_fraction."
            )
        fit = data.take(idx_fit)
        fit_ok = fit if fit.y.sum() > 0 and (1 - fit.y).sum() > 0 else None
        f = _fit_at(fit_ok, thr, cfg, cfg.alpha, ctx)
        alpha_rows = [self._alpha_point(fit_ok, thr, a, ctx) for a in cfg.alphas]
        a, b, c = (float(v) for v in cascade_thresholds(f.t2, f.rho, f.b0))
        s = f.scored
        self.rho_, self.exit_pos_floor_ = f.rho, f.b0
        self.t_exit_neg_, self.t_exit_pos_, self.t2_ = a, b, c
        self.lambda_, self.lambda_certified_ = _lam(f.t2), _lam(f.t2_hat)
        self.params_ = CascadePolicyParams(
            guarantee_statement=_statement(f, cfg.alpha, ctx, n_pos, int(idx_fit.size),
                                           keys is not None, cfg),
            alpha=cfg.alpha, lam=self.lambda_, lambda_certified=self.lambda_certified_,
            rho=f.rho, exit_pos_floor=f.b0, t_exit_neg=a, t_exit_pos=b, t2=c,
            crc_bound=min(f.crc_bound, 1.0),
            latency_stage1_s=cfg.latency_stage1_s, latency_stage2_s=cfg.latency_stage2_s,
            latency_budget_s=cfg.latency_budget_s, routing_rate=float(s.routing[0]),
            expected_latency_s=float(s.latency[0]), latency_budget_met=f.budget_met,
            positive_prior=cfg.positive_prior, estimated_reward=float(s.reward[0]),
            estimated_mcc=float(s.mcc[0]), estimated_accuracy=float(s.acc[0]),
            threshold_fnr=float(s.fnr[0]), n_calib_fit=int(idx_fit.size),
            n_calib_threshold=int(idx_thr.size), n_pos_threshold=n_pos, n_neg_threshold=n_neg,
            calibration_unit="group" if keys is not None else "image", n_calibration_units=f.n_units,
            fit_fraction=cfg.fit_fraction,
            split_rule=("whole groups: sha256(salt:group_key) < fit_fraction -> fit part" if keys is not None
                        else "sha256(salt:image_id) order within each label; fit part first"),
            shape_candidates=f.shapes, frontier=f.frontier, alpha_frontier=alpha_rows,
        )
        return self

    def _alpha_point(self, fit: _Part | None, thr: _Part, alpha: float, ctx: str) -> CascadeAlphaPoint:
        try:
            f = _fit_at(fit, thr, self.config, alpha, ctx)
        except InsufficientDataError as err:
            return CascadeAlphaPoint(alpha=alpha, feasible=False, reason=str(err))
        s = f.scored
        return CascadeAlphaPoint(
            alpha=alpha, feasible=True, lam=_lam(f.t2), rho=f.rho, exit_pos_floor=f.b0,
            crc_bound=min(f.crc_bound, 1.0), reward=float(s.reward[0]),
            routing_rate=float(s.routing[0]), latency_s=float(s.latency[0]),
            latency_budget_met=f.budget_met)

    @classmethod
    def from_params(cls, params: CascadePolicyParams, config: CascadeConfig | None = None) -> CascadePolicy:
        """An applicable policy from its artifact (only the thresholds are needed to predict)."""
        self = cls(config or CascadeConfig(
            alpha=params.alpha, latency_stage1_s=params.latency_stage1_s,
            latency_stage2_s=params.latency_stage2_s, latency_budget_s=params.latency_budget_s))
        self.rho_, self.exit_pos_floor_ = params.rho, params.exit_pos_floor
        self.t_exit_neg_, self.t_exit_pos_, self.t2_ = params.t_exit_neg, params.t_exit_pos, params.t2
        self.lambda_, self.lambda_certified_ = params.lam, params.lambda_certified
        self.params_ = params
        return self

    # ---- predict
    def route(self, p1: Any) -> np.ndarray:
        """Mask of the images stage 1 sends to stage 2: t_exit_neg < p1 <= t_exit_pos."""
        self._check_fitted()
        p = _probabilities(p1, "p1 (stage-1 probabilities)")
        return (p > self.t_exit_neg_) & (p <= self.t_exit_pos_)

    def predict(self, p1: Any, p2: P2Source) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(decision, served_probability, stage) per image.

        `p2`: an array with one stage-2 probability per image (only the routed ones are
        read; others may be NaN), or a callable taking the routed indices and returning
        their stage-2 probabilities — stage 2 then runs on the routed images only.
        served_probability binarises at 0.5 (np.round) to `decision`; 0.5 is never emitted.
        """
        self._check_fitted()
        p = _probabilities(p1, "p1 (stage-1 probabilities)")
        routed = (p > self.t_exit_neg_) & (p <= self.t_exit_pos_)
        idx = np.flatnonzero(routed)
        if callable(p2):
            q = _probabilities(p2(idx), "p2 (stage-2 probabilities of the routed images)", idx.size) \
                if idx.size else np.zeros(0)
        else:
            arr = np.asarray(p2, dtype=np.float64).ravel()
            if arr.size != p.size:
                raise BadInputError(f"p2 has {arr.size} values for {p.size} images (p1); give one per "
                                    "image (NaN where not routed), or a callable over the routed indices")
            q = _probabilities(arr[idx], "p2 (stage-2 probabilities of the routed images)")
        decision = (p > self.t_exit_pos_).astype(np.int8)
        served = np.empty_like(p)
        neg1 = p <= self.t_exit_neg_
        served[neg1] = remap_probability(p[neg1], self.t_exit_neg_, self.t_exit_neg_,
                                         np.ones(neg1.sum(), bool), np.zeros(neg1.sum(), bool))
        pos1 = decision == 1
        served[pos1] = remap_probability(p[pos1], self.t_exit_pos_, self.t_exit_pos_,
                                         np.zeros(pos1.sum(), bool), np.ones(pos1.sum(), bool))
        neg2 = q <= self.t2_
        decision[idx] = (~neg2).astype(np.int8)
        served[idx] = remap_probability(q, self.t2_, self.t2_, neg2, ~neg2)
        stage = np.where(routed, STAGE2, STAGE1).astype(np.int8)
        return decision, served, stage

    def _check_fitted(self) -> None:
        if not hasattr(self, "t2_"):
            raise BadInputError("this CascadePolicy is not fitted; call fit(p1, p2, y, groups) or "
                                "CascadePolicy.from_params(params) first")


def fit_cascade(p1: Any, p2: Any, y: Any, groups: Sequence[Any] | None = None, *,
                config: CascadeConfig, image_ids: Sequence[Any] | None = None) -> CascadePolicyParams:
    """Functional form: `CascadePolicy(config).fit(...).params_`."""
    return CascadePolicy(config).fit(p1, p2, y, groups, image_ids=image_ids).params_


# ------------------------------------------------- from logits: calibrate, fit, serve
def _stage2_logits(z: Any, n: int) -> np.ndarray:
    """Stage-2 pooled logits as [N, 2] ([N, 1, 2] accepted: one pooled view)."""
    a = np.asarray(z, dtype=np.float64)
    if a.ndim == 3 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 2 or a.shape != (n, 2):
        raise BadInputError(f"stage-2 logits have shape {a.shape}; expected ({n}, 2) or ({n}, 1, 2), "
                            "one pooled pair of logits per image (multiview_logits)")
    if not np.isfinite(a).all():
        raise BadInputError("stage-2 logits are not all finite; re-materialize multiview_logits")
    return a


def fit_cascade_policy(stage1_view_logits: Any, stage2_logits: Any, labels: Any,
                       image_ids: Sequence[Any], groups: Sequence[Any] | None, *,
                       policy: PolicyFitConfig, cascade: CascadeConfig) -> CascadePolicyParams:
    """The cascade from val_calib logits: one calibrator per stage chosen and fitted on the
    fit part (`select_calibrator`, as the stage-1 policies do), then `CascadePolicy.fit` on
    the calibrated probabilities, which splits val_calib the same way (same salt, ids,
    groups and fit_fraction) and certifies λ on the threshold part only."""
    from roadwork_assets.core.calibration.gate import check_view_logits

    v = check_view_logits(stage1_view_logits)
    if policy.main_view >= v.shape[1]:
        raise BadInputError(f"main_view={policy.main_view} but the logits have {v.shape[1]} view(s)")
    n = v.shape[0]
    z2 = _stage2_logits(stage2_logits, n)
    y = as_binary_labels(labels, n, dtype=np.int64)
    ids = [str(i) for i in image_ids]
    if len(ids) != n:
        raise BadInputError(f"{len(ids)} image ids for {n} logit rows")
    keys = None if groups is None else [str(g) for g in groups]
    idx_fit, idx_thr = split_calibration_set(ids, y, cascade.fit_fraction, groups=keys)
    if np.unique(y[idx_fit]).size < 2:
        raise InsufficientDataError(
            f"the {cascade.context} fit part ({idx_fit.size} images) lacks one label, so neither "
            "stage can be calibrated; add images of both labels from more scenes")
    cals = []
    for scores in (v[:, policy.main_view], z2):
        cal, _ = select_calibrator(scores[idx_fit], y[idx_fit], policy.calibrator_methods,
                                   policy.holdout_fraction, policy.n_bins)
        cals.append(cal)
    p1, p2 = cals[0].predict_proba(v[:, policy.main_view]), cals[1].predict_proba(z2)
    params = CascadePolicy(cascade).fit(p1, p2, y, keys, image_ids=ids).params_
    return params.model_copy(update={
        "main_view": policy.main_view,
        "calibrator_stage1": CalibratorSpec(**cals[0].to_params()),
        "calibrator_stage2": CalibratorSpec(**cals[1].to_params()),
        "score_reference": score_reference(p1[idx_thr], y[idx_thr])})


def _calibrated(spec: CalibratorSpec | None, scores: np.ndarray, what: str) -> np.ndarray:
    if spec is None:
        raise BadInputError(f"this cascade policy records no {what} calibrator, so it cannot be "
                            "applied to logits; re-fit it with fit_cascade_policy")
    return calibrator_from_params(spec.model_dump()).predict_proba(scores)


def cascade_stage1_probability(params: CascadePolicyParams, view_logits: Any) -> np.ndarray:
    """Calibrated stage-1 P(roadwork) of the main view (`policies.policy_probability`)."""
    return policy_probability(params, view_logits)


def cascade_stage2_probability(params: CascadePolicyParams, stage2_logits: Any) -> np.ndarray:
    """Calibrated stage-2 P(roadwork) of pooled logits [N, 2]."""
    z = np.asarray(stage2_logits, dtype=np.float64)
    return _calibrated(params.calibrator_stage2, _stage2_logits(z, z.shape[0]), "stage-2")


def apply_cascade(params: CascadePolicyParams, stage1_view_logits: Any,
                  stage2: Any | Callable[[np.ndarray], Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(decision int8 {0, 1}, served probability, stage int8 {1, 2}) per image.

    `stage2`: pooled stage-2 logits [N, 2] for every image, or a callable taking the routed
    indices and returning their stage-2 logits [k, 2], so stage 2 runs on routed images only.
    The served probability binarises at 0.5 (np.round) to the decision."""
    p1 = cascade_stage1_probability(params, stage1_view_logits)
    if callable(stage2):
        def p2(idx: np.ndarray) -> np.ndarray:
            return cascade_stage2_probability(params, stage2(idx))
    else:
        p2 = np.full(p1.size, np.nan)
        routed = CascadePolicy.from_params(params).route(p1)
        z = _stage2_logits(stage2, p1.size)
        p2[routed] = cascade_stage2_probability(params, z[routed])
    return CascadePolicy.from_params(params).predict(p1, p2)
