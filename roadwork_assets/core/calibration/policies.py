"""Fit an exit policy on val_calib, and apply it at inference.

Fitting (val_calib only):
  1. `split_calibration_set`: a deterministic, label-stratified, disjoint split
     into a fit part (calibrator, gate) and a threshold part (t_lo, t_hi, tau,
     conformal quantiles). Fitting both on the same images would break the
     guarantee (docs/domain.md, "Calibration and risk control").
  2. `select_calibrator` on the fit part (held-out NLL), refit on the whole part.
  3. t_lo on the threshold part's positives: CRC (E[FNR] <= α) or LTT
     (P(FNR <= α) >= 1 - δ). With group keys the exchangeable unit is the group
     (scene): the guarantee is on the share of a new scene's roadwork images
     missed, since frames of one scene are not exchangeable with each other
     (`calibration_unit` in the artifact). A roadwork image counts as missed only when the
     policy's final decision is "negative" (calibrated p <= t_lo); deferrals are
     never misses. Every kind below only ever says "negative" when p <= t_lo, so
     the FNR guarantee holds for the whole cascade's stage-1 output.
  4. kind-specific exits:
       softmax  two_way: positive iff p > t_lo. three_way: positive iff p > t_hi
                (LTT-certified positive-exit FDR), defer in between.
       gate     stage 1 as two_way; a learned failure gate defers images whose
                decision it predicts to be wrong.
       scrc     split-conformal sets (Mondrian or LAC): {1} exits positive, {0}
                exits negative if also p <= t_lo, {} / {0, 1} defer.

Application: `apply_policy(params, view_logits)` -> (decision, remapped_prob).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import ValidationError

from roadwork_assets.contracts.errors import BadInputError, InsufficientDataError
from roadwork_assets.contracts.policy_schemas import (
    CalibratorCandidate,
    CalibratorSpec,
    GatePolicyParams,
    GateSpec,
    ScrcPolicyParams,
    SoftmaxPolicyParams,
    ThresholdPartStats,
)
from roadwork_assets.core.calibration.calibrators import (
    CALIBRATORS,
    Calibrator,
    as_binary_labels,
    calibrator_from_params,
)
from roadwork_assets.core.calibration.conformal import (
    SplitConformalBinary,
    coverage_report,
    prediction_sets,
    set_decisions,
)
from roadwork_assets.core.calibration.gate import (
    FailureGate,
    check_view_logits,
    fit_failure_gate,
    gate_features,
)
from roadwork_assets.core.calibration.metrics import (
    brier,
    decision_confidence,
    ece,
    nll,
)
from roadwork_assets.core.calibration.policy_config import (
    DEFAULT_CALIBRATOR_METHODS,
    PolicyFitConfig,
)
from roadwork_assets.core.calibration.risk_control import (
    FnrThreshold,
    crc_fnr_threshold,
    crc_min_positives,
    ltt_fnr_threshold,
    ltt_min_positives,
    ltt_positive_exit_threshold,
)
from roadwork_assets.core.evaluation.shift import score_reference
from roadwork_assets.core.hashing import unit_hash

AnyPolicy = SoftmaxPolicyParams | GatePolicyParams | ScrcPolicyParams
SPLIT_SALT = "roadwork_assets.val_calib"
DEFER, NEGATIVE, POSITIVE = -1, 0, 1


# ----------------------------------------------------------------------- splits
def split_calibration_set(
    image_ids: Sequence[Any], labels: Any, fit_fraction: float = 0.5, *, salt: str = SPLIT_SALT,
    groups: Sequence[Any] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(idx_fit, idx_thr): disjoint, stratified by label, deterministic.

    Within each label, images are ordered by sha256(f"{salt}:{image_id}") and the
    first round(fit_fraction * n_label) go to the fit part. The result depends only
    on the set of (id, label) pairs, not on their order. Both are sorted int arrays.

    With ``groups`` (scene / near-duplicate group keys), whole groups go to one part:
    a group is in the fit part iff sha256(salt:group) maps below ``fit_fraction``.
    Frames of one scene are not exchangeable with each other, so splitting a group
    across the parts would let the calibrator see the threshold part's scenes.
    Stratification is then in expectation only.
    """
    if not 0.0 < fit_fraction < 1.0:
        raise BadInputError(f"fit_fraction must be in (0, 1); got {fit_fraction}")
    ids = [str(i) for i in image_ids]
    y = as_binary_labels(labels, len(ids), dtype=np.int64)
    if groups is not None:
        if len(groups) != len(ids):
            raise BadInputError(f"{len(groups)} group keys for {len(ids)} calibration items")
        unit = unit_hash((f"{salt}:{g}" for g in map(str, groups)), bits=52)
        in_fit = unit < fit_fraction
        return np.flatnonzero(in_fit), np.flatnonzero(~in_fit)
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dup = next(i for i in ids if i in seen or seen.add(i))
        raise BadInputError(f"image ids must be unique in the calibration split; {dup!r} repeats")
    keys = np.array([hashlib.sha256(f"{salt}:{i}".encode()).hexdigest() for i in ids])
    fit, thr = [], []
    for c in (0, 1):
        idx = np.flatnonzero(y == c)
        order = idx[np.argsort(keys[idx], kind="stable")]
        n_fit = int(np.floor(fit_fraction * idx.size + 0.5))
        fit.append(order[:n_fit])
        thr.append(order[n_fit:])
    return np.sort(np.concatenate(fit)), np.sort(np.concatenate(thr))


def units_needed(alpha: float, guarantee: str, delta: float) -> int:
    """Exchangeable units with roadwork the threshold part needs: CRC k = ⌊α(n+1)⌋ >= 1,
    i.e. n >= ⌈1/α⌉ - 1; LTT (fixed sequence) (1-α)^n <= δ."""
    if guarantee not in ("crc", "ltt"):
        raise BadInputError(f"guarantee must be 'crc' or 'ltt'; got {guarantee!r}")
    return crc_min_positives(alpha) if guarantee == "crc" else ltt_min_positives(alpha, delta)


def check_calibration_capacity(
    item_ids: Sequence[Any], labels: Any, group_keys: Sequence[Any] | None, *,
    alpha: float, guarantee: str, delta: float, fit_fraction: float,
) -> int:
    """Units (groups) with roadwork in the threshold part of val_calib; refuse too few.

    The threshold part is computed exactly as `split_calibration_set` (same salt,
    by group) will compute it when the policy is fitted; the count is of the units
    the risk control sees: groups with at least one positive (every image is its
    own group when ``group_keys`` is None). Raises InsufficientDataError when that
    count is below `units_needed(alpha, guarantee, delta)`; returns it otherwise.
    """
    y = as_binary_labels(labels, len(item_ids), dtype=np.int64)
    idx_fit, idx_thr = split_calibration_set(item_ids, y, fit_fraction, groups=group_keys)
    keys = np.asarray([str(g) for g in (item_ids if group_keys is None else group_keys)])
    pos = y == 1
    fit_counts = np.bincount(y[idx_fit], minlength=2)
    if fit_counts.min() < _MIN_FIT_PER_LABEL:  # the calibrator's held-out selection needs them
        raise InsufficientDataError(
            f"val_calib's fit part (the fit_fraction = {fit_fraction:g} share, chosen by group) "
            f"holds {fit_counts[1]} roadwork and {fit_counts[0]} none images; choosing the "
            f"calibrator needs at least {_MIN_FIT_PER_LABEL} of each. Add images from more "
            "scenes, or raise the val_calib fraction.")
    have = int(np.unique(keys[idx_thr][y[idx_thr] == 1]).size)
    need = units_needed(alpha, guarantee, delta)
    if have < need:
        scenes = "groups" if group_keys is not None else "images (no group keys: one group each)"
        raise InsufficientDataError(
            f"val_calib has {int(pos.sum())} positive images in {int(np.unique(keys[pos]).size)} "
            f"{scenes}; its threshold part (the 1 - fit_fraction = {1 - fit_fraction:g} share, "
            f"chosen by group) has {have} groups with roadwork; the exit policy at alpha={alpha:g} "
            f"({guarantee}{f', delta={delta:g}' if guarantee == 'ltt' else ''}) needs at least "
            f"{need}. Add roadwork images from more scenes, raise the val_calib fraction, or raise alpha."
        )
    return have


_MIN_FIT_PER_LABEL = 2  # the held-out calibrator choice needs one to hold out, one to fit


def _stratified_holdout(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    train, hold = [], []
    for c in (0, 1):
        idx = np.flatnonzero(y == c)
        if idx.size < _MIN_FIT_PER_LABEL:
            raise InsufficientDataError(
                f"calibrator selection needs at least {_MIN_FIT_PER_LABEL} images of label {c} in "
                f"the fit part; got {idx.size}"
            )
        idx = rng.permutation(idx)
        n_hold = min(max(1, round(fraction * idx.size)), idx.size - 1)
        hold.append(idx[:n_hold])
        train.append(idx[n_hold:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(hold))


# ------------------------------------------------------------------ calibrator
def select_calibrator(
    scores_fit: Any,
    y_fit: Any,
    methods: Sequence[str] = DEFAULT_CALIBRATOR_METHODS,
    holdout_fraction: float = 0.3,
    n_bins: int = 15,
    *,
    seed: int = 0,
) -> tuple[Calibrator, list[dict[str, Any]]]:
    """Pick the calibrator with the lowest NLL on a seeded, stratified held-out part of
    the fit set, then refit it on the whole fit set.

    candidates: one dict per method with held-out "nll", "ece" (positive-class,
    `n_bins` equal-width bins, L1) and "brier". Ties go to the earlier method.
    """
    scores = np.asarray(scores_fit, dtype=np.float64)
    y = as_binary_labels(y_fit, scores.shape[0], dtype=np.int64)
    if not methods:
        raise BadInputError("select_calibrator needs at least one method")
    unknown = [m for m in methods if m not in CALIBRATORS]
    if unknown:
        raise BadInputError(f"unknown calibrator method(s) {unknown}; known: {list(CALIBRATORS)}")
    if "classwise_temperature" in methods and not (scores.ndim == 2 and scores.shape[1] == 2):
        raise BadInputError("classwise_temperature needs [N, 2] logits; drop it or pass two-class logits")
    idx_tr, idx_ho = _stratified_holdout(y, holdout_fraction, seed)
    candidates = []
    for m in methods:
        p_ho = CALIBRATORS[m]().fit(scores[idx_tr], y[idx_tr]).predict_proba(scores[idx_ho])
        y_ho = y[idx_ho]
        candidates.append({"method": m, "nll": nll(p_ho, y_ho), "ece": ece(p_ho, y_ho, n_bins),
                           "brier": brier(p_ho, y_ho)})
    best = min(candidates, key=lambda c: c["nll"])["method"]
    return CALIBRATORS[best]().fit(scores, y), candidates


# ----------------------------------------------------------------------- remap
def remap_probability(p: Any, lo: float, hi: float, negative: Any, positive: Any) -> np.ndarray:
    """Monotone map of p putting the decision boundary on StreetVision's 0.5.

    Piecewise linear: [0, lo] -> [0, 0.5], (lo, hi] -> (0.5, 0.75], (hi, 1] ->
    (0.75, 1] (when hi == lo: (lo, 1] -> (0.5, 1]). Then the exact sides are
    enforced from the decision masks (which must be a lower set / an upper set in
    p): `negative` items are made < 0.5, all others > 0.5, and with a deferral band
    `positive` items > 0.75 and deferred ones in (0.5, 0.75]. np.round sends
    exactly 0.5 to 0, hence the strict sides. Non-decreasing in p.
    """
    p = np.clip(np.asarray(p, dtype=np.float64), 0.0, 1.0)
    negative = np.asarray(negative, dtype=bool)
    positive = np.asarray(positive, dtype=bool)
    lo_c = float(np.clip(lo, 0.0, 1.0))
    hi_c = float(np.clip(max(hi, lo), 0.0, 1.0))
    band = hi_c > lo_c
    top = 0.75 if band else 0.5
    r = np.empty_like(p)
    s1 = p <= lo_c
    r[s1] = 0.5 * p[s1] / lo_c if lo_c > 0 else 0.0
    s2 = ~s1 & (p <= hi_c)
    if band:
        r[s2] = 0.5 + 0.25 * (p[s2] - lo_c) / (hi_c - lo_c)
    s3 = p > hi_c
    if hi_c < 1.0:
        r[s3] = top + (1.0 - top) * (p[s3] - hi_c) / (1.0 - hi_c)
    r = np.where(negative, np.minimum(r, np.nextafter(0.5, 0.0)), np.maximum(r, np.nextafter(0.5, 1.0)))
    if band:
        deferred = ~negative & ~positive
        r = np.where(positive, np.maximum(r, np.nextafter(0.75, 1.0)), r)
        r = np.where(deferred, np.minimum(r, 0.75), r)
    return np.clip(r, 0.0, 1.0)


# --------------------------------------------------------------------- apply
def policy_probability(params: AnyPolicy, view_logits: Any) -> np.ndarray:
    """Calibrated P(roadwork) of the main view, as the policy sees it (a cascade: stage 1's)."""
    v = check_view_logits(view_logits)
    if params.main_view >= v.shape[1]:
        raise BadInputError(f"policy reads view {params.main_view} but the logits have {v.shape[1]} view(s)")
    spec = params.calibrator_stage1 if params.kind == "cascade" else params.calibrator
    if spec is None:
        raise BadInputError("this cascade policy records no stage-1 calibrator, so it cannot be "
                            "applied to logits; re-fit it with fit_cascade_policy")
    cal = calibrator_from_params(spec.model_dump())
    return cal.predict_proba(v[:, params.main_view])


def _exits(negative: np.ndarray, positive: np.ndarray) -> np.ndarray:
    return np.where(negative, NEGATIVE, np.where(positive, POSITIVE, DEFER)).astype(np.int8)


# Each kind's decision rule, as (negative, positive) exit masks: applying a policy and
# scoring it on the threshold part while fitting run the same code.
def _gate_exits(gate: GateSpec, view_logits: Any, p: np.ndarray, t_lo: float,
                main_view: int) -> tuple[np.ndarray, np.ndarray]:
    """The stage-1 two-way decision where the gate accepts it; deferral elsewhere."""
    feats = gate_features(view_logits, p, t_lo, main_view)
    accept = FailureGate.from_params(gate.model_dump()).predict_proba(feats) <= gate.tau
    neg = p <= t_lo
    return accept & neg, accept & ~neg


def _scrc_exits(p: np.ndarray, q0: float, q1: float, t_lo: float) -> tuple[np.ndarray, np.ndarray]:
    sets_dec = set_decisions(prediction_sets(p, q0, q1))
    return (sets_dec == NEGATIVE) & (p <= t_lo), sets_dec == POSITIVE


def _scrc_anchors(t_lo: float, q0: float, q1: float) -> tuple[float, float]:
    lo = min(t_lo, q0, 1.0 - q1)
    return lo, max(q0, 1.0 - q1, lo)


def apply_policy(params: AnyPolicy, view_logits: Any) -> tuple[np.ndarray, np.ndarray]:
    """(decision int8 [N]: 1 positive, 0 negative, -1 defer; remapped_prob float64 [N]).

    remapped_prob is a non-decreasing function of the calibrated probability p with
    remapped < 0.5 exactly for the images the policy decides "negative" at stage 1
    (p <= t_lo side), so binarising it at 0.5 (StreetVision) reproduces the
    FNR-controlled answer:
    - softmax two_way: positive <=> remapped > 0.5, negative <=> remapped < 0.5.
    - softmax three_way / scrc: deferred images map into (0.5, 0.75] (the image of
      the deferral band) and positives into (0.75, 1], so a deferred image is
      emitted as "roadwork" when no later stage answers for it — deferrals never
      become misses.
    - gate: the remap is that of the stage-1 two-way decision and ignores the gate
      (a per-image gate decision is not monotone in p). A deferred image keeps its
      stage-1 side of 0.5; the decision array says it was deferred.
    """
    p = policy_probability(params, view_logits)
    if isinstance(params, SoftmaxPolicyParams):
        neg, pos = p <= params.t_lo, p > params.t_hi
        return _exits(neg, pos), remap_probability(p, params.t_lo, params.t_hi, neg, pos)
    if isinstance(params, GatePolicyParams):
        neg = p <= params.t_lo
        decision = _exits(*_gate_exits(params.gate, view_logits, p, params.t_lo, params.main_view))
        return decision, remap_probability(p, params.t_lo, params.t_lo, neg, ~neg)
    if isinstance(params, ScrcPolicyParams):
        neg, pos = _scrc_exits(p, params.q0, params.q1, params.t_lo)
        lo, hi = _scrc_anchors(params.t_lo, params.q0, params.q1)
        return _exits(neg, pos), remap_probability(p, lo, hi, neg, pos)
    if getattr(params, "kind", None) == "cascade":
        raise BadInputError("a cascade policy decides with stage 2 as well: apply it with "
                            "core.calibration.cascade.apply_cascade(params, view_logits, stage2)")
    raise BadInputError(f"unknown policy type {type(params).__name__}")


# ----------------------------------------------------------------------- fit
def _statement(
    fnr: FnrThreshold, ctx: str, n_fit: int, extra: list[str]
) -> str:
    miss_def = (
        "FNR = P(decision = negative | roadwork): a roadwork image counts as missed only when "
        f"the policy decides 'negative' (calibrated p <= t_lo = {fnr.t_lo:.6g}); deferrals are not misses"
    )
    by_group = fnr.unit == "group"
    if by_group:
        units = (f"{fnr.n_units} scenes/groups with roadwork ({fnr.n_pos} positive images) of the {ctx}, "
                 "one exchangeable unit per group with loss L_g(t) = share of the group's roadwork "
                 "images with p <= t")
        risk = "the expected share of a new scene's roadwork images missed"
    else:
        units = f"{fnr.n_pos} positives of the {ctx}, one exchangeable unit per image"
        risk = "the FNR"
    if fnr.method == "crc" and by_group:
        head = (
            f"Conformal risk control (Angelopoulos et al. 2022) on the {units}: t_lo is the largest t "
            f"with (sum_g L_g(t) + 1)/(n_g + 1) <= alpha, so E[share of a new scene's roadwork images "
            f"missed] <= alpha = {fnr.alpha:g}, the expectation taken over the draw of the threshold part "
            "and of the new scene (marginal, not conditional on this draw)."
        )
    elif fnr.method == "crc":
        head = (
            f"Conformal risk control (Angelopoulos et al. 2022) on the {units}: t_lo lies just below "
            f"the k={fnr.k}-th smallest calibrated positive score, so "
            f"E[FNR] <= k/(n+1) = {fnr.k / (fnr.n_pos + 1):.4g} <= alpha = {fnr.alpha:g}, the expectation "
            "taken over the draw of the threshold part (marginal, not conditional on this draw)."
        )
    else:
        head = (
            f"Learn-then-Test (Angelopoulos et al. 2021) on the {units}: "
            f"Hoeffding-Bentkus p-values on the mean unit loss, {fnr.fwer} FWER control over {fnr.n_grid} "
            f"fixed thresholds; with probability >= 1 - delta = {1 - fnr.delta:g} over the draw of the "
            f"threshold part, {risk} <= alpha = {fnr.alpha:g}."
        )
    population = ("deployment scenes are exchangeable with val_calib's scenes (frames within a scene "
                  "need not be)") if by_group else "deployment images are exchangeable with val_calib"
    tail = (
        f"Assumes {population}; the calibrator was fitted on "
        f"the disjoint fit part (n={n_fit}). Achieved rates on the threshold part are in-sample estimates."
    )
    return " ".join([head, miss_def + ".", *extra, tail])


def _threshold_stats(decision: np.ndarray, y_thr: np.ndarray) -> ThresholdPartStats:
    """What the policy's decisions did on the threshold part (in-sample estimates)."""
    n_pos, n_neg = int(y_thr.sum()), int((1 - y_thr).sum())
    misses = int(np.sum((decision == NEGATIVE) & (y_thr == 1)))
    pos_exit = decision == POSITIVE
    acc = decision != DEFER
    defer_rate = float(np.mean(~acc))
    return ThresholdPartStats(
        fnr=misses / n_pos, n_misses=misses, defer_rate=defer_rate, coverage=1.0 - defer_rate,
        fpr=float(np.sum(pos_exit & (y_thr == 0)) / n_neg) if n_neg else 0.0,
        positive_exit_fdr=float(np.mean(y_thr[pos_exit] == 0)) if pos_exit.any() else None,
        selective_risk=float(np.mean(decision[acc] != y_thr[acc])) if acc.any() else None,
    )


@dataclass(frozen=True)
class _Stage1:
    """What every policy kind shares, computed once: the val_calib fit / threshold
    split, the calibrator chosen and fitted on the fit part, its probabilities on both
    parts, and t_lo from the threshold part's positives (CRC or LTT, by group if given)."""

    v: np.ndarray  # [N, V, 2] val_calib logits
    y: np.ndarray  # [N] int64 labels
    idx_fit: np.ndarray
    idx_thr: np.ndarray
    calibrator: Calibrator
    candidates: list[dict[str, Any]]
    p_fit: np.ndarray  # calibrated P(roadwork) of the main view on each part
    p_thr: np.ndarray
    fnr: FnrThreshold
    context: str  # "<data> threshold part", as the statement and errors name it
    grouped: bool

    @property
    def t_lo(self) -> float:
        return self.fnr.t_lo

    @property
    def y_fit(self) -> np.ndarray:
        return self.y[self.idx_fit]

    @property
    def y_thr(self) -> np.ndarray:
        return self.y[self.idx_thr]

    def statement(self, extra: list[str]) -> str:
        return _statement(self.fnr, self.context, self.idx_fit.size, extra)

    def common_fields(self, config: PolicyFitConfig) -> dict[str, Any]:
        """The policy fields every kind shares."""
        n_thr, n_pos = int(self.idx_thr.size), int(self.y_thr.sum())
        return dict(
            main_view=config.main_view,
            calibrator=CalibratorSpec(**self.calibrator.to_params()),
            calibrator_candidates=[CalibratorCandidate(**c) for c in self.candidates],
            t_lo=self.t_lo, alpha=config.alpha, delta=config.delta,
            guarantee="crc_expectation" if config.guarantee == "crc" else "ltt_high_probability",
            n_calib_fit=int(self.idx_fit.size), n_calib_threshold=n_thr,
            n_pos_threshold=n_pos, n_neg_threshold=n_thr - n_pos,
            calibration_unit=self.fnr.unit, n_calibration_units=int(self.fnr.n_units or n_pos),
            fit_fraction=config.fit_fraction,
            **({"split_rule": "whole groups: sha256(salt:group_key) < fit_fraction -> fit part"}
               if self.grouped else {}),
        )


def _fit_stage1(view_logits: Any, labels: Any, image_ids: Sequence[Any],
                groups: Sequence[Any] | None, config: PolicyFitConfig) -> _Stage1:
    v = check_view_logits(view_logits)
    if config.main_view >= v.shape[1]:
        raise BadInputError(f"main_view={config.main_view} but the logits have {v.shape[1]} view(s)")
    y = as_binary_labels(labels, v.shape[0], dtype=np.int64)
    if len(image_ids) != v.shape[0]:
        raise BadInputError(f"{len(image_ids)} image ids for {v.shape[0]} logit rows")
    idx_fit, idx_thr = split_calibration_set(image_ids, y, config.fit_fraction, groups=groups)
    ctx = f"{config.context} threshold part"
    y_fit, y_thr = y[idx_fit], y[idx_thr]
    if int(y_thr.sum()) == 0:
        raise InsufficientDataError(f"{ctx} has 0 positives; the FNR threshold needs roadwork images")
    main = v[:, config.main_view]
    cal, candidates = select_calibrator(main[idx_fit], y_fit, config.calibrator_methods,
                                        config.holdout_fraction, config.n_bins)
    p_fit, p_thr = cal.predict_proba(main[idx_fit]), cal.predict_proba(main[idx_thr])
    pos_thr = p_thr[y_thr == 1]
    # the exchangeable unit: one per group (scene) when group keys are given
    pos_groups = None if groups is None else [str(groups[i]) for i in idx_thr[y_thr == 1]]
    if config.guarantee == "crc":
        fnr = crc_fnr_threshold(pos_thr, config.alpha, groups=pos_groups, context=ctx)
    else:
        fnr = ltt_fnr_threshold(pos_thr, config.alpha, config.delta, config.grid, fwer=config.fwer,
                                groups=pos_groups, context=ctx)
    return _Stage1(v, y, idx_fit, idx_thr, cal, candidates, p_fit, p_thr, fnr, ctx, groups is not None)


@dataclass(frozen=True)
class _KindFit:
    """A policy kind's part of the fit: its class, its own fields (t_hi and the
    guarantee statement included) and its decisions on the threshold part."""

    policy_type: type[SoftmaxPolicyParams | GatePolicyParams | ScrcPolicyParams]
    fields: dict[str, Any]
    decisions: np.ndarray


def _fit_softmax(s: _Stage1, config: PolicyFitConfig) -> _KindFit:
    """two_way: positive iff p > t_lo. three_way: positive iff p > t_hi (LTT-certified
    positive-exit FDR), defer in between."""
    t_lo, delta, fdr = s.t_lo, config.delta, config.positive_fdr
    t_hi, certified, extra = t_lo, None, []
    if config.mode == "three_way":
        ex = ltt_positive_exit_threshold(
            s.p_thr, s.y_thr, t_lo=t_lo, fdr_target=fdr, delta=delta, grid=config.grid,
            reference_scores=s.p_fit, reference_labels=s.y_fit,
        )
        t_hi, certified = ex.t_hi, ex.certified
        joint = "Both hold together with probability >= 1 - 2*delta (union bound)." \
            if config.guarantee == "ltt" else ""
        if ex.certified:
            extra.append(
                f"Positive exits (p > t_hi = {t_hi:.6g}): LTT fixed-sequence gives, with probability "
                f">= {1 - delta:g}, P(none | positive exit) <= {fdr:g}. {joint}"
            )
        else:
            extra.append("No positive-exit threshold could be certified: t_hi = 1, so every image "
                         "above t_lo is deferred.")
        extra.append("Images with t_lo < p <= t_hi are deferred.")
    else:
        extra.append("Two-way: every image with p > t_lo is decided positive (no deferral).")
    fields = {"t_hi": t_hi, "mode": config.mode,
              "positive_fdr_target": fdr if config.mode == "three_way" else None,
              "positive_exit_certified": certified, "guarantee_statement": s.statement(extra)}
    return _KindFit(SoftmaxPolicyParams, fields, _exits(s.p_thr <= t_lo, s.p_thr > t_hi))


def _fit_gate(s: _Stage1, config: PolicyFitConfig) -> _KindFit:
    """Stage 1 two-way at t_lo; a failure gate fitted on the fit part defers the images
    whose decision it predicts to be wrong."""
    t_lo, view, risk = s.t_lo, config.main_view, config.gate_risk
    v_fit, v_thr = s.v[s.idx_fit], s.v[s.idx_thr]
    dec_fit, dec_thr = (s.p_fit > t_lo).astype(np.int64), (s.p_thr > t_lo).astype(np.int64)
    gf = fit_failure_gate(
        gate_features(v_fit, s.p_fit, t_lo, view), dec_fit != s.y_fit,
        gate_features(v_thr, s.p_thr, t_lo, view), dec_thr != s.y_thr,
        decision_confidence(s.p_thr, dec_thr), gate_risk=risk, delta=config.delta, C=config.gate_C,
    )
    spec = GateSpec(
        **gf.gate.to_params(), tau=gf.tau, gate_risk=risk, risk_met=gf.risk_met,
        accept_rate=gf.accept_rate, selective_risk=gf.selective_risk,
        selective_risk_upper=gf.selective_risk_upper, aurc_gate=gf.aurc_gate,
        aurc_baseline=gf.aurc_baseline, beats_baseline=gf.beats_baseline, accepts_all=gf.accepts_all,
    )
    extra = [
        ("Stage 1 is two-way at t_lo; the failure gate (fitted on the fit part) only turns decisions "
         "into deferrals, so it cannot raise the FNR."),
        (f"Its accept threshold targets an error rate <= {risk:g} among accepted images: a plug-in "
         "estimate on the threshold part, not a guarantee."),
    ]
    if gf.accepts_all:
        extra.append(f"No stage-1 decision of the fit part was wrong (0 of {s.idx_fit.size}): the gate "
                     "accepts every image, so this policy decides like softmax two-way.")
    fields = {"t_hi": t_lo, "gate": spec, "guarantee_statement": s.statement(extra)}
    return _KindFit(GatePolicyParams, fields, _exits(*_gate_exits(spec, v_thr, s.p_thr, t_lo, view)))


def _fit_scrc(s: _Stage1, config: PolicyFitConfig) -> _KindFit:
    """Split-conformal sets (Mondrian or LAC): {1} exits positive, {0} exits negative if
    also p <= t_lo, {} / {0, 1} defer."""
    c_alpha, method = config.conformal_alpha, config.conformal_method
    conf = SplitConformalBinary(c_alpha, method).fit(s.p_thr, s.y_thr, context=s.context)
    cov = coverage_report(conf.predict_sets(s.p_thr), s.y_thr)
    if method == "mondrian":
        cstate = (
            f"Mondrian split-conformal sets at alpha_c = {c_alpha:g}: P(label in set | label) "
            f">= {1 - c_alpha:g} for each label, so a 'none' image exits positive with "
            f"probability <= {c_alpha:g} in expectation."
        )
    else:
        cstate = (f"LAC split-conformal sets at alpha_c = {c_alpha:g}: marginal coverage "
                  f"P(label in set) >= {1 - c_alpha:g}.")
    extra = [cstate, ("Singleton sets exit ({0} only if also p <= t_lo), empty or two-label sets defer. "
                      "Set quantiles and t_lo use the same threshold part; each statement holds on its own.")]
    _, hi = _scrc_anchors(s.t_lo, conf.q0_, conf.q1_)
    fields = {"t_hi": max(hi, s.t_lo), "conformal_method": method, "conformal_alpha": c_alpha,
              "q0": conf.q0_, "q1": conf.q1_, "coverage": cov, "guarantee_statement": s.statement(extra)}
    return _KindFit(ScrcPolicyParams, fields, _exits(*_scrc_exits(s.p_thr, conf.q0_, conf.q1_, s.t_lo)))


PolicyFitter = Callable[[_Stage1, PolicyFitConfig], _KindFit]
POLICY_FITTERS: dict[str, PolicyFitter] = {
    "softmax": _fit_softmax,
    "gate": _fit_gate,
    "scrc": _fit_scrc,
}


def fit_policy(
    kind: Literal["softmax", "gate", "scrc"],
    view_logits: Any,
    labels: Any,
    image_ids: Sequence[Any],
    *,
    groups: Sequence[Any] | None = None,
    config: PolicyFitConfig | None = None,
    **settings: Any,
) -> AnyPolicy:
    """Fit a policy of `kind` on val_calib logits [N, V, 2] (view `config.main_view` is
    calibrated), as `config` (a `PolicyFitConfig`; default settings when None) says.

    `groups` (scene keys) keeps each group on one side of the fit / threshold split and
    makes the group the exchangeable unit of the FNR guarantee (see risk_control).
    `settings`: PolicyFitConfig fields given one by one (`alpha=0.05`), applied over
    `config`; kept so that callers with a setting or two need not build a config.
    Raises InsufficientDataError when the threshold part has too few positives.
    """
    fitter = POLICY_FITTERS.get(kind)
    if fitter is None:
        hint = (" (a cascade needs stage 2: core.calibration.cascade.fit_cascade_policy)"
                if kind == "cascade" else "")
        raise BadInputError(f"policy kind must be one of {list(POLICY_FITTERS)}; got {kind!r}{hint}")
    if settings:
        base = config.model_dump() if config is not None else {}
        try:
            config = PolicyFitConfig.model_validate({**base, **settings})
        except ValidationError as err:
            raise BadInputError(f"invalid policy settings {sorted(settings)}: {err}") from err
    config = config or PolicyFitConfig()
    s = _fit_stage1(view_logits, labels, image_ids, groups, config)
    part = fitter(s, config)
    return part.policy_type(
        **s.common_fields(config), **part.fields,
        threshold_part=_threshold_stats(part.decisions, s.y_thr),
        score_reference=score_reference(s.p_thr, s.y_thr),
    )
