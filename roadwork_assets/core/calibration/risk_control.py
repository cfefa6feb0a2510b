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

Guarantees (exchangeable calibration and deployment images; the calibrator is
fitted on a part of val_calib disjoint from the threshold part):
- CRC (Angelopoulos et al. 2022): t_lo just below the k-th smallest positive
  score, k = ⌊α(n₊+1)⌋. Then E[FNR(t_lo)] <= k/(n₊+1) <= α, the expectation over
  the draw of the threshold part (marginal, not conditional on it).
- LTT (Angelopoulos et al. 2021): exact binomial ("binary Bentkus") p-values,
  min'ed with Hoeffding as in MAPIE, tested over a fixed threshold grid with
  fixed-sequence or Bonferroni FWER control. Then P(FNR(t_lo) <= α) >= 1 - δ.
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
    k: int | None = None  # CRC rank
    fwer: str | None = None  # LTT
    n_grid: int | None = None
    n_certified: int | None = None

    @property
    def empirical_fnr(self) -> float:
        return self.n_misses / self.n_pos


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


def crc_fnr_threshold(pos_scores: Any, alpha: float, *, context: str = "calibration threshold part") -> FnrThreshold:
    """Conformal risk control of the FNR: E[P(p <= t_lo | y=1)] <= α.

    Loss of a positive at threshold t: 1{p <= t}. With the n₊ positive scores of
    the threshold part sorted, s_(1) <= ... <= s_(n₊), and k = ⌊α(n₊+1)⌋ >= 1,
    t_lo is the largest float below s_(k). A test positive is missed only if its
    score is strictly below s_(k), i.e. it ranks among the k smallest of the
    n₊+1 exchangeable positives: probability <= k/(n₊+1) <= α. Ties only make
    this conservative. O(n) via np.partition.
    """
    _check_level("alpha", alpha)
    s = _as_scores(pos_scores, "positive scores")
    n = s.size
    k = crc_rank(alpha, n)
    if k < 1:
        need = crc_min_positives(alpha)
        raise InsufficientDataError(
            f"{context} has {n} positives; α={alpha:g} needs at least {need} "
            f"(k=⌊α(n+1)⌋ ≥ 1). Add positives or raise alpha."
        )
    s_k = float(np.partition(s, k - 1)[k - 1])
    t_lo = float(np.nextafter(s_k, -np.inf))
    return FnrThreshold(
        t_lo=t_lo, method="crc", alpha=alpha, delta=None, n_pos=n,
        n_misses=int(np.sum(s <= t_lo)), k=k,
    )


# -------------------------------------------------------------------------- LTT
def hoeffding_bentkus_pvalues(n_errors: Any, n: Any, alpha: float) -> np.ndarray:
    """p-values for H0: risk > α from k errors in n binary trials (LTT, Sec. 3.2).

    min(Hoeffding, exact binomial tail P(Bin(n, α) <= k)); for a 0/1 loss the
    binomial tail is the exact (valid) p-value and is always the smaller one.
    Matches MAPIE's `compute_hoeffding_bentkus_p_value(..., binary=True)`.
    n = 0 gives p = 1.
    """
    k = np.asarray(n_errors, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(n > 0, k / np.where(n > 0, n, 1.0), 1.0)
        r_cap = np.minimum(r, alpha)
        term1 = np.where(r_cap > 0, r_cap * np.log(r_cap / alpha), 0.0)
        h1 = term1 + (1.0 - r_cap) * np.log((1.0 - r_cap) / (1.0 - alpha))
    hoeffding = np.exp(-n * h1)
    bentkus = stats.binom.cdf(k, n, alpha)
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
    """Smallest n₊ for which zero misses can be certified: (1-α)^n <= δ / n_tests."""
    return int(math.ceil(math.log(delta / n_tests) / math.log1p(-alpha) - 1e-12))


def ltt_fnr_threshold(
    pos_scores: Any,
    alpha: float,
    delta: float,
    grid: Any = None,
    *,
    fwer: FwerMethod = "fixed_sequence",
    context: str = "calibration threshold part",
    return_pvalues: bool = False,
) -> FnrThreshold | tuple[FnrThreshold, np.ndarray, np.ndarray]:
    """Learn-then-Test: P(FNR(t_lo) <= α) >= 1 - δ over the draw of the threshold part.

    Null at grid point t: FNR(t) = P(p <= t | y=1) > α. The empirical FNR at every
    grid point comes from one sort + searchsorted. Fixed-sequence tests the grid
    from the smallest threshold up (the FNR is non-decreasing in t, so this order
    is fixed in advance); Bonferroni tests each at δ/|grid|. t_lo is the largest
    certified grid point. The grid must not depend on the threshold part.
    """
    _check_level("alpha", alpha)
    _check_level("delta", delta)
    s = np.sort(_as_scores(pos_scores, "positive scores"))
    g = np.sort(np.asarray(DEFAULT_GRID if grid is None else grid, dtype=np.float64).ravel())
    if g.size == 0:
        raise BadInputError("LTT needs a non-empty threshold grid")
    n = s.size
    n_tests = 1 if fwer == "fixed_sequence" else g.size
    need = ltt_min_positives(alpha, delta, n_tests)
    if n < need:
        raise InsufficientDataError(
            f"{context} has {n} positives; LTT at α={alpha:g}, δ={delta:g} ({fwer}, "
            f"{n_tests} test(s)) needs at least {need} (even zero misses must give "
            f"(1-α)^n ≤ δ/{n_tests}). Add positives, raise alpha or delta, or use guarantee='crc'."
        )
    misses = np.searchsorted(s, g, side="right")  # #{p <= t}
    pvals = hoeffding_bentkus_pvalues(misses, n, alpha)
    certified = fwer_rejections(pvals, delta, fwer)
    if not certified.any():
        raise InsufficientDataError(
            f"{context}: LTT certified no threshold — already at the lowest grid point "
            f"t={g[0]:g}, {int(misses[0])} of {n} positives would be missed (α={alpha:g}). "
            "Check the calibrated scores or use a grid that starts lower."
        )
    idx = int(np.flatnonzero(certified)[-1])
    res = FnrThreshold(
        t_lo=float(g[idx]), method="ltt", alpha=alpha, delta=delta, n_pos=n,
        n_misses=int(misses[idx]), fwer=fwer, n_grid=int(g.size), n_certified=int(certified.sum()),
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
