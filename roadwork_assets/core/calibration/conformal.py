"""Split conformal prediction sets for the binary roadwork task.

Non-conformity score of class c: 1 - p_c, i.e. score_0 = p and score_1 = 1 - p
(p = calibrated P(roadwork)). Class c is in the set iff score_c <= q_c.

- LAC (Sadinle et al. 2019): one quantile q from every calibration item's score
  of its true class; marginal coverage P(y ∈ C) >= 1 - α.
- Mondrian / class-conditional (Vovk): q_c from class-c items only; coverage
  P(y ∈ C | y = c) >= 1 - α for each class. For class 1 this is the statement
  "a roadwork image loses class 1 from its set with probability <= α".

The quantile is the ⌈(n+1)(1-α)⌉-th smallest score (finite-sample valid). Exit
rule: a singleton set exits with its class; an empty or two-class set defers.
Both regions are intervals in p: {0} for low p, {1} for high p, so the decisions
are monotone in p.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np

from roadwork_assets.contracts.errors import BadInputError, InsufficientDataError

ConformalMethod = Literal["lac", "mondrian"]
_CEIL_SLACK = 1e-9


def conformal_rank(alpha: float, n: int) -> int:
    """j = ⌈(n+1)(1-α)⌉ (1e-9 slack for decimal α); j > n means the quantile is +inf."""
    return int(math.ceil((n + 1) * (1.0 - alpha) - _CEIL_SLACK))


def conformal_min_n(alpha: float) -> int:
    n = max(0, math.ceil((1.0 - _CEIL_SLACK) / alpha) - 1)
    while conformal_rank(alpha, n) > n:
        n += 1
    return n


def conformal_quantile(scores: Any, alpha: float, *, what: str = "calibration items") -> float:
    """⌈(n+1)(1-α)⌉-th smallest score; refuses (rather than returning +inf) when n is too small."""
    if not 0.0 < alpha < 1.0:
        raise BadInputError(f"conformal alpha must be in (0, 1); got {alpha}")
    s = np.asarray(scores, dtype=np.float64).ravel()
    n = s.size
    j = conformal_rank(alpha, n)
    if j > n:
        raise InsufficientDataError(
            f"{what}: {n} items; split conformal at α={alpha:g} needs at least "
            f"{conformal_min_n(alpha)} (⌈(n+1)(1-α)⌉ ≤ n). Add data or raise the conformal alpha."
        )
    return float(np.partition(s, j - 1)[j - 1])


def prediction_sets(p: Any, q0: float, q1: float) -> np.ndarray:
    """bool [N, 2]: column c says whether class c is in the set (score_c <= q_c)."""
    p = np.asarray(p, dtype=np.float64).ravel()
    return np.stack([p <= q0, (1.0 - p) <= q1], axis=1)


def set_decisions(sets: np.ndarray) -> np.ndarray:
    """int8 [N]: 0 for {0}, 1 for {1}, -1 (defer) for {} or {0, 1}."""
    has0, has1 = sets[:, 0], sets[:, 1]
    out = np.full(sets.shape[0], -1, dtype=np.int8)
    out[has0 & ~has1] = 0
    out[has1 & ~has0] = 1
    return out


def coverage_report(sets: np.ndarray, y: Any) -> dict[str, Any]:
    """Empirical coverage overall and per class, and the set-size mix."""
    y = np.asarray(y).ravel().astype(np.int64)
    covered = sets[np.arange(y.size), y]
    size = sets.sum(axis=1)

    def mean(mask):
        return float(covered[mask].mean()) if mask.any() else None

    return {
        "coverage": float(covered.mean()) if y.size else None,
        "coverage_neg": mean(y == 0),
        "coverage_pos": mean(y == 1),
        "singleton_rate": float(np.mean(size == 1)) if y.size else None,
        "empty_rate": float(np.mean(size == 0)) if y.size else None,
        "both_rate": float(np.mean(size == 2)) if y.size else None,
    }


class SplitConformalBinary:
    """fit(p, y) on a calibration part; predict_sets(p) / predict_decisions(p).

    Learned: `q0_`, `q1_` (score quantiles), `n_`.
    """

    def __init__(self, alpha: float = 0.1, method: ConformalMethod = "mondrian") -> None:
        self.alpha = alpha
        self.method = method

    def fit(self, p: Any, y: Any, *, context: str = "calibration part") -> SplitConformalBinary:
        p = np.asarray(p, dtype=np.float64).ravel()
        y = np.asarray(y).ravel()
        if p.shape != y.shape:
            raise BadInputError("probabilities and labels differ in length")
        score_true = np.where(y == 1, 1.0 - p, p)
        if self.method == "lac":
            q = conformal_quantile(score_true, self.alpha, what=context)
            self.q0_, self.q1_ = q, q
        elif self.method == "mondrian":
            self.q0_ = conformal_quantile(score_true[y == 0], self.alpha, what=f"{context} negatives")
            self.q1_ = conformal_quantile(score_true[y == 1], self.alpha, what=f"{context} positives")
        else:
            raise BadInputError(f"conformal method must be 'lac' or 'mondrian'; got {self.method!r}")
        self.n_ = int(p.size)
        return self

    def predict_sets(self, p: Any) -> np.ndarray:
        return prediction_sets(p, self.q0_, self.q1_)

    def predict_decisions(self, p: Any) -> np.ndarray:
        return set_decisions(self.predict_sets(p))
