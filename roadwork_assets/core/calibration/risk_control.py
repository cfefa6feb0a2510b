"""Thresholds with a stated guarantee on the miss rate (FNR) and on positive exits.

Decision rule used everywhere in this package (p = calibrated P(roadwork)):

    negative  iff  p <= t_lo
    positive  iff  p >  t_hi          (t_hi >= t_lo)
    defer     otherwise               (t_lo < p <= t_hi)

What counts as a miss: a roadwork image is missed only when the stage-1
decision is "negative". A deferred image is *not* a stage-1 miss — it goes to a
later stage (a bigger model, TTA, a human) or, in the StreetVision remap, is
emitted on the positive side of 0.5. So the cascade FNR controlled here is

    FNR(t_lo) = P(p <= t_lo | y = 1),

which does not depend on t_hi or on any gate that only turns decisions into
deferrals (a gate can lower it, never raise it). Errors a later stage makes on
deferred images are outside this guarantee.

Exchangeable units. Frames of one scene / sequence are correlated, so they are
not exchangeable with each other; scenes are. With ``groups`` (the group key of
every positive), each group with at least one positive is one unit carrying the
loss

    L_g(t) = #{positives of g with p <= t} / #{positives of g}   in [0, 1],

the share of the scene's roadwork images missed, and the guarantees below are
about a new scene: R(t) = E[L_new(t)]. Without groups every image is its own
unit, L_i(t) = 1{p_i <= t}, and R(t) is the image-level FNR.

Guarantees (exchangeable calibration and deployment units; the calibrator is
fitted on a part of val_calib disjoint from the threshold part):
- CRC (Angelopoulos et al. 2022): t_lo = the largest t with
  (Σ_g L_g(t) + B) / (n_g + 1) <= α, B = 1 (the largest loss). Then
  E[L_new(t_lo)] <= α, the expectation over the draw of the threshold part and
  the new unit (marginal, not conditional on the draw). With one positive per
  unit this is t_lo just below the k-th smallest positive score, k = ⌊α(n₊+1)⌋,
  and E[FNR(t_lo)] <= k/(n₊+1) <= α.
- LTT (Angelopoulos et al. 2021): Hoeffding–Bentkus p-values on the mean unit
  loss (the exact binomial "binary Bentkus" when every loss is 0/1, as in MAPIE),
  tested over a fixed threshold grid with fixed-sequence or Bonferroni FWER
  control. Then P(R(t_lo) <= α) >= 1 - δ.
- Positive exits (t_hi): LTT on the conditional risk FDR(t) = P(y = 0 | p > t),
  fixed-sequence from strict to loose thresholds: P(FDR(t_hi) <= β) >= 1 - δ.
  The number of exits is random; conditionally on it, the exited labels are
  i.i.d., so the binomial p-value stays valid. The empirical FDR/FPR on the
  threshold part are reported as estimates only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from scipy import stats

from roadwork_assets.contracts.errors import BadInputError, InsufficientDataError

# Fixed before any data is seen: fine near 0 (where t_lo lives for small α) and
# uniform elsewhere. Fixed-sequence testing makes the grid size free of cost.
DEFAULT_GRID: np.ndarray = np.unique(
    np.concatenate([np.linspace(0.0, 1.0, 1001), np.geomspace(1e-6, 1e-3, 31)])
)

FwerMethod = Literal["fixed_sequence", "bonferroni"]
# α given as a decimal (0.29) is stored just below it in binary; without this
# slack ⌊α(n+1)⌋ would come out one short exactly at integer α(n+1).
_FLOOR_SLACK = 1e-9


@dataclass(frozen=True)
class FnrThreshold:
    """A stage-1 negative threshold: decide negative iff p <= t_lo."""

    t_lo: float
    method: Literal["crc", "ltt"]
    alpha: float
    delta: float | None
    n_pos: int
    n_misses: int  # positives with p <= t_lo on the part it was fitted on (in-sample)
    k: int | None = None  # CRC rank ⌊α(n_units+1)⌋: Σ unit losses at t_lo <= k - 1
    unit: Literal["image", "group"] = "image"  # the exchangeable unit of the guarantee
    n_units: int | None = None  # units with at least one positive (n_pos for images)
    unit_loss: float | None = None  # Σ_g L_g(t_lo), in-sample
    fwer: str | None = None  # LTT
    n_grid: int | None = None
    n_certified: int | None = None

    @property
    def empirical_fnr(self) -> float:
        return self.n_misses / self.n_pos

    @property
    def empirical_unit_risk(self) -> float:
        """Mean unit loss at t_lo on the threshold part (= empirical_fnr for images)."""
        if self.unit_loss is None or not self.n_units:
            return self.empirical_fnr
        return self.unit_loss / self.n_units


@dataclass(frozen=True)
class PositiveExitThreshold:
    """An auto-positive threshold: decide positive iff p > t_hi."""

    t_hi: float
    fdr_target: float
    delta: float
    certified: bool  # False: nothing certified, t_hi = 1.0 and no positive exits
    n_exits: int  # on the threshold part
    n_false_exits: int
    n_certified: int

    @property
    def empirical_fdr(self) -> float | None:
        return self.n_false_exits / self.n_exits if self.n_exits else None


def _as_scores(scores: Any, what: str) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64).ravel()
    if not np.all(np.isfinite(s)):
        raise BadInputError(f"{what} contain non-finite values (NaN/inf)")
    return s


def _check_level(name: str, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise BadInputError(f"{name} must be in (0, 1); got {value}")


def unit_weights(groups: Any, n_pos: int) -> tuple[np.ndarray, int]:
    """(w, n_units): w_i = 1 / #{positives in the group of positive i}, so that
    Σ_i w_i 1{p_i <= t} = Σ_g L_g(t). ``groups=None``: every positive is its own unit."""
    if groups is None:
        return np.ones(n_pos), n_pos
    keys = np.asarray([str(g) for g in groups])
    if keys.shape != (n_pos,):
        raise BadInputError(f"{keys.size} group keys for {n_pos} positive scores; give one per positive")
    _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    return 1.0 / counts[inverse], int(counts.size)


def _unit_word(groups: Any) -> str:
    return "image" if groups is None else "group"


# -------------------------------------------------------------------------- CRC
def crc_rank(alpha: float, n_pos: int) -> int:
    """k = ⌊α(n₊+1)⌋ (with a 1e-9 slack for decimal α)."""
    return int(math.floor(alpha * (n_pos + 1) + _FLOOR_SLACK))


def crc_min_positives(alpha: float) -> int:
    """Smallest n₊ with ⌊α(n₊+1)⌋ >= 1 (49 at α = 0.02)."""
    n = max(0, math.ceil((1.0 - _FLOOR_SLACK) / alpha) - 1)
    while crc_rank(alpha, n) < 1:  # guard the float edge
        n += 1
    return n


def crc_fnr_threshold(
    pos_scores: Any, alpha: float, *, groups: Any = None, context: str = "calibration threshold part",
) -> FnrThreshold:
    """Conformal risk control of the miss rate: E[L_new(t_lo)] <= α.

    Units: every positive (``groups=None``; L_i(t) = 1{p_i <= t}) or every group
    of the given positives' group keys (L_g(t) = share of g's positives with
    p <= t). With S(t) = Σ_g L_g(t) over the n_g units and k = ⌊α(n_g+1)⌋ >= 1,

        t_lo = max{t : (S(t) + 1) / (n_g + 1) <= α} = the float just below
               v* = min{v : S(v) > α(n_g+1) - 1},

    v* a positive score (S is a right-continuous step function). For images v* is
    the k-th smallest positive score s_(k): a test positive is missed only if it
    ranks among the k smallest of n₊+1 exchangeable positives, probability
    <= k/(n₊+1) <= α. Ties only make this conservative. O(n log n).
    """
    _check_level("alpha", alpha)
    s = _as_scores(pos_scores, "positive scores")
    w, n_units = unit_weights(groups, s.size)
    unit = _unit_word(groups)
    k = crc_rank(alpha, n_units)
    if k < 1:
        need = crc_min_positives(alpha)
        what = "positives" if unit == "image" else "groups with roadwork"
        raise InsufficientDataError(
            f"{context} has {n_units} {what}; α={alpha:g} needs at least {need} "
            f"(k=⌊α(n+1)⌋ ≥ 1). Add positives{' from more scenes' if unit == 'group' else ''} "
            "or raise alpha."
        )
    order = np.argsort(s, kind="stable")
    loss_sum = np.cumsum(w[order])  # S at each sorted score (ties: the last one counts)
    # first sorted position whose cumulative loss exceeds the budget α(n_g+1) - 1
    i = int(np.argmax(loss_sum > alpha * (n_units + 1) - 1.0 + _FLOOR_SLACK))
    t_lo = float(np.nextafter(s[order[i]], -np.inf))
    missed = s <= t_lo
    return FnrThreshold(
        t_lo=t_lo, method="crc", alpha=alpha, delta=None, n_pos=s.size,
        n_misses=int(np.sum(missed)), k=k, unit=unit, n_units=n_units,
        unit_loss=float(np.sum(w[missed])),
    )


# -------------------------------------------------------------------------- LTT
def hoeffding_bentkus_pvalues(n_errors: Any, n: Any, alpha: float, *, binary: bool = True) -> np.ndarray:
    """p-values for H0: risk > α from a total loss k over n units (LTT, Sec. 3.2).

    r̂ = k/n. Hoeffding: exp(-n h₁(min(r̂, α), α)), h₁(a, α) = a ln(a/α) +
    (1-a) ln((1-a)/(1-α)). Bentkus: c · P(Bin(n, α) <= ⌈k⌉), c = 1 for a 0/1 loss
    (then it is the exact binomial tail) and c = e for losses in [0, 1].
    p = min(Hoeffding, Bentkus). Matches MAPIE's
    `compute_hoeffding_bentkus_p_value(k/n, n, α, binary=binary)`. n = 0 gives p = 1.
    """
    k = np.asarray(n_errors, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(n > 0, k / np.where(n > 0, n, 1.0), 1.0)
        r_cap = np.minimum(r, alpha)
        term1 = np.where(r_cap > 0, r_cap * np.log(r_cap / alpha), 0.0)
        h1 = term1 + (1.0 - r_cap) * np.log((1.0 - r_cap) / (1.0 - alpha))
    hoeffding = np.exp(-n * h1)
    # non-binary: ⌈k⌉ with slack, since sums of 1/m_g land a hair above an integer
    bentkus = (stats.binom.cdf(k, n, alpha) if binary
               else np.e * stats.binom.cdf(np.ceil(k - 1e-9), n, alpha))
    return np.where(n > 0, np.minimum(hoeffding, bentkus), 1.0)


def fwer_rejections(pvalues: np.ndarray, delta: float, fwer: FwerMethod) -> np.ndarray:
    """Boolean mask of rejected nulls (certified hypotheses), hypotheses in test order."""
    if fwer == "fixed_sequence":
        # Test in the given order at level δ; stop at the first non-rejection.
        fails = np.flatnonzero(pvalues > delta)
        n_rej = fails[0] if fails.size else pvalues.size
        mask = np.zeros(pvalues.size, dtype=bool)
        mask[:n_rej] = True
        return mask
    if fwer == "bonferroni":
        return pvalues <= delta / pvalues.size
    raise BadInputError(f"fwer must be 'fixed_sequence' or 'bonferroni'; got {fwer!r}")


def ltt_min_positives(alpha: float, delta: float, n_tests: int = 1) -> int:
    """Smallest n (positives, or groups with roadwork) for which zero misses can be
    certified: (1-α)^n <= δ / n_tests (also the [0, 1]-loss Hoeffding bound at r̂ = 0)."""
    return int(math.ceil(math.log(delta / n_tests) / math.log1p(-alpha) - 1e-12))


def ltt_fnr_threshold(
    pos_scores: Any,
    alpha: float,
    delta: float,
    grid: Any = None,
    *,
    fwer: FwerMethod = "fixed_sequence",
    groups: Any = None,
    context: str = "calibration threshold part",
    return_pvalues: bool = False,
) -> FnrThreshold | tuple[FnrThreshold, np.ndarray, np.ndarray]:
    """Learn-then-Test: P(R(t_lo) <= α) >= 1 - δ over the draw of the threshold part.

    Null at grid point t: R(t) = E[L_new(t)] > α, R the image FNR P(p <= t | y=1)
    (``groups=None``) or the expected share of a new group's positives missed.
    The mean unit loss S(t)/n_g at every grid point comes from one sort +
    searchsorted over weighted positives; p-values are Hoeffding–Bentkus, binary
    when every unit holds one positive. Fixed-sequence tests the grid
    from the smallest threshold up (the FNR is non-decreasing in t, so this order
    is fixed in advance); Bonferroni tests each at δ/|grid|. t_lo is the largest
    certified grid point. The grid must not depend on the threshold part.
    """
    _check_level("alpha", alpha)
    _check_level("delta", delta)
    s = _as_scores(pos_scores, "positive scores")
    w, n = unit_weights(groups, s.size)
    unit = _unit_word(groups)
    order = np.argsort(s, kind="stable")
    s, w = s[order], w[order]
    g = np.sort(np.asarray(DEFAULT_GRID if grid is None else grid, dtype=np.float64).ravel())
    if g.size == 0:
        raise BadInputError("LTT needs a non-empty threshold grid")
    n_tests = 1 if fwer == "fixed_sequence" else g.size
    need = ltt_min_positives(alpha, delta, n_tests)
    if n < need:
        what = "positives" if unit == "image" else "groups with roadwork"
        raise InsufficientDataError(
            f"{context} has {n} {what}; LTT at α={alpha:g}, δ={delta:g} ({fwer}, "
            f"{n_tests} test(s)) needs at least {need} (even zero misses must give "
            f"(1-α)^n ≤ δ/{n_tests}). Add positives, raise alpha or delta, or use guarantee='crc'."
        )
    below = np.searchsorted(s, g, side="right")  # #{p <= t}
    loss = np.r_[0.0, np.cumsum(w)][below]  # S(t) = Σ_g L_g(t)
    pvals = hoeffding_bentkus_pvalues(loss, n, alpha, binary=bool(np.all(w == 1.0)))
    certified = fwer_rejections(pvals, delta, fwer)
    if not certified.any():
        raise InsufficientDataError(
            f"{context}: LTT certified no threshold — already at the lowest grid point "
            f"t={g[0]:g}, {int(below[0])} of {s.size} positives would be missed (α={alpha:g}). "
            "Check the calibrated scores or use a grid that starts lower."
        )
    idx = int(np.flatnonzero(certified)[-1])
    res = FnrThreshold(
        t_lo=float(g[idx]), method="ltt", alpha=alpha, delta=delta, n_pos=s.size,
        n_misses=int(below[idx]), fwer=fwer, n_grid=int(g.size), n_certified=int(certified.sum()),
        unit=unit, n_units=n, unit_loss=float(loss[idx]),
    )
    return (res, g, pvals) if return_pvalues else res


# --------------------------------------------------------------- positive exits
def _exit_counts(p: np.ndarray, y: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """#{p > t} and #{p > t, y = 0} for every t (one sort each)."""
    p_sorted, neg_sorted = np.sort(p), np.sort(p[y == 0])
    n_exit = p.size - np.searchsorted(p_sorted, thresholds, side="right")
    n_false = neg_sorted.size - np.searchsorted(neg_sorted, thresholds, side="right")
    return n_exit, n_false


def ltt_positive_exit_threshold(
    scores: Any,
    labels: Any,
    *,
    t_lo: float,
    fdr_target: float,
    delta: float,
    grid: Any = None,
    reference_scores: Any = None,
    reference_labels: Any = None,
) -> PositiveExitThreshold:
    """t_hi with P(FDR(t_hi) <= β) >= 1 - δ, FDR(t) = P(y = 0 | p > t); t_hi >= t_lo.

    Hypotheses are tested by fixed sequence from strict (high t) to loose, starting
    at a grid point chosen on *reference* data (the calibrator's fit part, disjoint
    from the threshold part, so the order is fixed before the threshold part is
    looked at): the highest t whose reference p-value, with counts rescaled to the
    threshold part's size, is <= δ/10 (else the reference's most significant t).
    Without reference data the sequence starts at the top of the grid, where few
    exits usually stop it at once. All certified grid points are simultaneously
    valid, so picking the smallest certified one that is >= t_lo keeps the
    guarantee. If none is certified, t_hi = 1.0: no positive exits, everything
    above t_lo defers. Only the FDR is guaranteed; the FPR is an estimate.
    """
    _check_level("fdr_target", fdr_target)
    _check_level("delta", delta)
    p = _as_scores(scores, "threshold-part scores")
    y = np.asarray(labels).ravel()
    if y.shape != p.shape:
        raise BadInputError("scores and labels differ in length")
    g = np.sort(np.asarray(DEFAULT_GRID if grid is None else grid, dtype=np.float64).ravel())[::-1]
    start = 0
    if reference_scores is not None and reference_labels is not None:
        ref_exit, ref_false = _exit_counts(
            _as_scores(reference_scores, "reference scores"), np.asarray(reference_labels).ravel(), g
        )
        scale = p.size / max(int(np.size(reference_scores)), 1)
        ref_p = hoeffding_bentkus_pvalues(np.floor(ref_false * scale), np.floor(ref_exit * scale), fdr_target)
        strong = np.flatnonzero(ref_p <= delta / 10)
        start = int(strong[0]) if strong.size else int(np.argmin(ref_p))
    seq = g[start:]
    n_exit, n_false = _exit_counts(p, y, seq)
    if seq.size:
        pvals = hoeffding_bentkus_pvalues(n_false, n_exit, fdr_target)
        certified = fwer_rejections(pvals, delta, "fixed_sequence")
    else:
        certified = np.zeros(0, dtype=bool)
    usable = certified & (seq >= t_lo)
    if usable.any():
        i = int(np.flatnonzero(usable)[-1])  # seq is descending: last = smallest
        t_hi, ne, nf = float(seq[i]), int(n_exit[i]), int(n_false[i])
        ok_flag = True
    else:
        t_hi, ok_flag = 1.0, False
        ne, nf = int(np.sum(p > 1.0)), int(np.sum((p > 1.0) & (y == 0)))
    return PositiveExitThreshold(
        t_hi=max(t_hi, t_lo), fdr_target=fdr_target, delta=delta, certified=ok_flag,
        n_exits=ne, n_false_exits=nf, n_certified=int(certified.sum()),
    )
