"""Calibration, ranking, selective and decision metrics for a binary classifier.

Conventions (stated because libraries differ):
- `p` is P(y = 1 = roadwork). Hard decisions default to p > 0.5 (StreetVision's
  np.round: exactly 0.5 counts as 0).
- ECE: equal-width bins on [0, 1], L1, `n_bins` (default 15, as torchmetrics).
  variant="positive" bins p and compares with the rate of y = 1 (torchmetrics
  BinaryCalibrationError); variant="top_label" bins max(p, 1 - p) and compares
  with accuracy of the 0.5 decision (Guo et al. 2017). p = 1.0 falls in the last bin.
- AURC: area under the selective risk–coverage curve, confidence sorted high to
  low; ties are resolved by the expectation over random tie-breaking. E-AURC =
  AURC minus the AURC of an oracle that abstains on every error first.
- FNR/FPR intervals: exact Clopper–Pearson (scipy.stats.binomtest); other intervals:
  percentile bootstrap (scipy.stats.bootstrap, paired resampling of (p, y), seeded).
- Brier, NLL, AUROC, MCC and balanced accuracy are sklearn's (as the trainer's are).
  What stays hand-rolled has no sklearn counterpart (ECE, AURC, the risk–coverage
  curve) or must run along a batch axis for the bootstrap (the `_*_axis` statistics).
Everything is vectorised; the cost is one sort, O(n log n).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
from scipy import stats
from sklearn.metrics import (
    balanced_accuracy_score,
    brier_score_loss,
    log_loss,
    matthews_corrcoef,
    roc_auc_score,
)

from roadwork_assets.contracts.errors import BadInputError
from roadwork_assets.core.calibration.calibrators import as_binary_labels

_NLL_EPS = 1e-15


def _as_prob_label(p: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(p, dtype=np.float64).ravel()
    y = np.asarray(y).ravel()
    if p.shape != y.shape:
        raise BadInputError(f"probabilities {p.shape} and labels {y.shape} differ in length")
    if p.size and (np.nanmin(p) < 0 or np.nanmax(p) > 1 or not np.all(np.isfinite(p))):
        raise BadInputError("probabilities must be finite and in [0, 1]")
    return p, as_binary_labels(y, p.size, dtype=np.int64)


# ------------------------------------------------------------------ calibration
def _bin_index(conf: np.ndarray, n_bins: int) -> np.ndarray:
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # Same rule as torch.bucketize(right=True) - 1: bin i holds [e_i, e_{i+1}).
    return np.clip(np.searchsorted(edges, conf, side="right") - 1, 0, n_bins - 1)


def reliability_bins(
    p: Any, y: Any, n_bins: int = 15, variant: Literal["positive", "top_label"] = "positive"
) -> dict[str, np.ndarray]:
    """Per-bin count, mean confidence and observed frequency (for reliability diagrams)."""
    p, y = _as_prob_label(p, y)
    if variant == "positive":
        conf, hit = p, y.astype(np.float64)
    elif variant == "top_label":
        conf = np.maximum(p, 1.0 - p)
        hit = ((p > 0.5).astype(np.int64) == y).astype(np.float64)
    else:
        raise BadInputError(f"ECE variant must be 'positive' or 'top_label', got {variant!r}")
    idx = _bin_index(conf, n_bins)
    count = np.bincount(idx, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(idx, weights=conf, minlength=n_bins) / count
        freq = np.bincount(idx, weights=hit, minlength=n_bins) / count
    return {"count": count, "confidence": mean_conf, "frequency": freq,
            "edges": np.linspace(0.0, 1.0, n_bins + 1)}


def ece(p: Any, y: Any, n_bins: int = 15, variant: Literal["positive", "top_label"] = "positive") -> float:
    """Expected calibration error: sum_b (n_b / n) |freq_b - conf_b| over equal-width bins."""
    b = reliability_bins(p, y, n_bins=n_bins, variant=variant)
    n = b["count"].sum()
    if n == 0:
        return float("nan")
    gap = np.nan_to_num(np.abs(b["frequency"] - b["confidence"]))
    return float(np.sum(b["count"] * gap) / n)


def brier(p: Any, y: Any) -> float:
    """Mean squared error of p against y (sklearn brier_score_loss); NaN when empty."""
    p, y = _as_prob_label(p, y)
    if not y.size:
        return float("nan")
    return float(brier_score_loss(y, p, labels=[0, 1]))


def nll(p: Any, y: Any, eps: float = _NLL_EPS) -> float:
    """Mean binary negative log-likelihood, p clipped to [eps, 1 - eps] (sklearn log_loss).

    The clip is done here: sklearn clips only at the float eps (2.2e-16), so p = 1.0 for
    a negative (a saturated sigmoid) would cost 36.04 there and 34.54 here, as it always has.
    NaN when empty.
    """
    p, y = _as_prob_label(p, y)
    if not y.size:
        return float("nan")
    return float(log_loss(y, np.clip(p, eps, 1.0 - eps), labels=[0, 1]))


def auroc(p: Any, y: Any) -> float:
    """ROC AUC (sklearn); NaN when only one class is present."""
    p, y = _as_prob_label(p, y)
    if y.min(initial=1) == y.max(initial=0):
        return float("nan")
    return float(roc_auc_score(y, p))


# ---------------------------------------------------------- selective prediction
def risk_coverage_curve(confidence: Any, errors: Any) -> tuple[np.ndarray, np.ndarray]:
    """Selective risk at every coverage k/n, k = 1..n, accepting the most confident first.

    Within a run of tied confidences the cumulative error count is the expectation
    under a uniformly random order of the tied items (linear inside the run).
    """
    c = np.asarray(confidence, dtype=np.float64).ravel()
    e = np.asarray(errors, dtype=np.float64).ravel()
    if c.shape != e.shape:
        raise BadInputError(f"confidence {c.shape} and errors {e.shape} differ in length")
    n = c.size
    if n == 0:
        return np.zeros(0), np.zeros(0)
    order = np.argsort(-c, kind="stable")
    c_sorted, e_sorted = c[order], e[order]
    starts = np.flatnonzero(np.r_[True, c_sorted[1:] != c_sorted[:-1]])
    sizes = np.diff(np.r_[starts, n])
    group_err = np.add.reduceat(e_sorted, starts)
    err_before = np.r_[0.0, np.cumsum(group_err)[:-1]]
    group_of = np.repeat(np.arange(starts.size), sizes)
    pos_in_group = np.arange(n) - starts[group_of] + 1  # 1..size
    cum_err = err_before[group_of] + pos_in_group * (group_err / sizes)[group_of]
    k = np.arange(1, n + 1, dtype=np.float64)
    return k / n, cum_err / k


def aurc(confidence: Any, errors: Any) -> float:
    """Area under the risk–coverage curve (mean selective risk over coverages k/n)."""
    _, risk = risk_coverage_curve(confidence, errors)
    return float(np.mean(risk)) if risk.size else float("nan")


def optimal_aurc(errors: Any) -> float:
    """AURC of the oracle ranking that puts every error last."""
    e = np.asarray(errors, dtype=np.float64).ravel()
    n = e.size
    if n == 0:
        return float("nan")
    n_err = float(e.sum())
    k = np.arange(1, n + 1, dtype=np.float64)
    return float(np.mean(np.maximum(0.0, k - (n - n_err)) / k))


def eaurc(confidence: Any, errors: Any) -> float:
    """Excess AURC: AURC minus the oracle AURC for the same errors."""
    return aurc(confidence, errors) - optimal_aurc(errors)


def decision_confidence(p: Any, decision: Any) -> np.ndarray:
    """Calibrated probability that a hard decision is right: p if positive, 1 - p if negative.

    This is the max-probability confidence generalised to a threshold other than 0.5.
    """
    p = np.asarray(p, dtype=np.float64)
    return np.where(np.asarray(decision) == 1, p, 1.0 - p)


# --------------------------------------------------------------- hard decisions
def confusion_counts(y: Any, pred: Any) -> dict[str, int]:
    y = np.asarray(y).ravel().astype(np.int64)
    pred = np.asarray(pred).ravel().astype(np.int64)
    return {
        "tn": int(np.sum((y == 0) & (pred == 0))),
        "fp": int(np.sum((y == 0) & (pred == 1))),
        "fn": int(np.sum((y == 1) & (pred == 0))),
        "tp": int(np.sum((y == 1) & (pred == 1))),
    }


def _mcc_from_counts(tp, tn, fp, fn):
    tp, tn, fp, fn = (np.asarray(v, dtype=np.float64) for v in (tp, tn, fp, fn))
    denom = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (tp * tn - fp * fn) / np.where(denom > 0, denom, 1.0), 0.0)


def _hard_labels(y: Any, pred: Any) -> tuple[np.ndarray, np.ndarray]:
    return (np.asarray(y).ravel().astype(np.int64), np.asarray(pred).ravel().astype(np.int64))


def mcc(y: Any, pred: Any) -> float:
    """Matthews correlation coefficient (sklearn): 0 when a margin of the table is empty,
    and 0 for no items (sklearn refuses those; a policy may accept none)."""
    y, pred = _hard_labels(y, pred)
    if not y.size:
        return 0.0
    with warnings.catch_warnings():  # one label only is a legitimate answer here: MCC 0
        warnings.filterwarnings("ignore", message="A single label was found", category=UserWarning)
        return float(matthews_corrcoef(y, pred))


def balanced_accuracy(y: Any, pred: Any) -> float:
    """Mean recall over the classes present in y (sklearn); NaN for no items."""
    y, pred = _hard_labels(y, pred)
    if not y.size:
        return float("nan")
    with warnings.catch_warnings():  # a predicted class absent from y is left out, as intended
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true",
                                category=UserWarning)
        return float(balanced_accuracy_score(y, pred))


def clopper_pearson(
    k: int, n: int, confidence: float = 0.95,
    alternative: Literal["two-sided", "less"] = "two-sided",
) -> tuple[float, float]:
    """Exact (Clopper–Pearson) binomial interval for k successes in n trials, as
    scipy.stats.binomtest(k, n).proportion_ci(method="exact") computes it.

    alternative="less" is the one-sided upper bound (low = 0): high is the Beta(k + 1, n - k)
    quantile at `confidence` (1 when k = n). (NaN, NaN) when n = 0.
    """
    if n <= 0:
        return float("nan"), float("nan")
    ci = stats.binomtest(int(k), int(n), alternative=alternative).proportion_ci(
        confidence_level=confidence, method="exact")
    return float(ci.low), float(ci.high)


def rate_with_ci(k: int, n: int, confidence: float = 0.95) -> dict[str, Any]:
    lo, hi = clopper_pearson(k, n, confidence)
    return {"value": (k / n) if n else None, "k": int(k), "n": int(n),
            "ci_low": _jsonable(lo), "ci_high": _jsonable(hi), "ci": "clopper_pearson"}


# ------------------------------------------------------------------- bootstrap
def _ece_axis(p, y, axis=-1, n_bins=15):
    p = np.moveaxis(np.asarray(p, dtype=np.float64), axis, -1)
    y = np.moveaxis(np.asarray(y, dtype=np.float64), axis, -1)
    batch_shape = p.shape[:-1]
    p2, y2 = p.reshape(-1, p.shape[-1]), y.reshape(-1, y.shape[-1])
    rows, n = p2.shape
    flat = (np.arange(rows)[:, None] * n_bins + _bin_index(p2, n_bins)).ravel()
    sp = np.bincount(flat, weights=p2.ravel(), minlength=rows * n_bins).reshape(rows, n_bins)
    sy = np.bincount(flat, weights=y2.ravel(), minlength=rows * n_bins).reshape(rows, n_bins)
    return (np.abs(sy - sp).sum(axis=1) / n).reshape(batch_shape)


def _brier_axis(p, y, axis=-1):
    return np.mean((np.asarray(p) - np.asarray(y)) ** 2, axis=axis)


def _auroc_axis(p, y, axis=-1):
    # Mann–Whitney form with average ranks for ties; NaN if a resample has one class.
    r = stats.rankdata(p, axis=axis)
    y = np.asarray(y, dtype=np.float64)
    n_pos = y.sum(axis=axis)
    n_neg = y.shape[axis] - n_pos
    with np.errstate(invalid="ignore", divide="ignore"):
        return ((r * y).sum(axis=axis) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def _decision_axis(fn_name):
    def stat(pred, y, axis=-1):
        pred = np.asarray(pred, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        tp = (pred * y).sum(axis=axis)
        fp = (pred * (1 - y)).sum(axis=axis)
        fn = ((1 - pred) * y).sum(axis=axis)
        tn = ((1 - pred) * (1 - y)).sum(axis=axis)
        if fn_name == "mcc":
            return _mcc_from_counts(tp, tn, fp, fn)
        with np.errstate(invalid="ignore", divide="ignore"):
            return 0.5 * (tp / (tp + fn) + tn / (tn + fp))
    return stat


def bootstrap_ci(
    statistic: Callable[..., Any],
    *arrays: Any,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap CI of a vectorised statistic(*arrays, axis=-1), paired resampling."""
    arrays = tuple(np.asarray(a) for a in arrays)
    n = arrays[0].shape[0]
    if n < 2 or n_resamples <= 0:
        return float("nan"), float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = stats.bootstrap(
            arrays, statistic, paired=True, vectorized=True, n_resamples=n_resamples,
            confidence_level=confidence, method="percentile",
            batch=max(1, int(2e7 // n)), rng=np.random.default_rng(seed),
        )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


# ---------------------------------------------------------------------- report
def _jsonable(x: Any) -> Any:
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return None if not math.isfinite(float(x)) else float(x)
    return x


def classification_report(
    p: Any,
    y: Any,
    threshold: float = 0.5,
    decisions: Any = None,
    *,
    n_bins: int = 15,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """All metrics in JSON-able form (plain floats/ints; undefined values are None).

    decisions: optional int array with 1 = positive, 0 = negative, -1 = defer (a
    policy's output). Without it, decisions are p > threshold. With deferrals:
    the confusion matrix, accuracy, balanced accuracy and MCC are over accepted
    items; `fnr`/`fpr` are cascade rates over *all* positives/negatives, where a
    deferred positive is not a miss (and a deferred negative not a false alarm).
    Calibration/ranking metrics (ECE, Brier, NLL, AUROC) use p on every item;
    AURC/E-AURC rank the hard decisions p > threshold by decision confidence.
    """
    p, y = _as_prob_label(p, y)
    hard = (p > threshold).astype(np.int64)
    dec = hard if decisions is None else np.asarray(decisions).ravel().astype(np.int64)
    if dec.shape != y.shape or not np.all(np.isin(dec, (-1, 0, 1))):
        raise BadInputError("decisions must be an int array of -1/0/1 with one entry per item")
    acc_mask = dec != -1
    ya, da = y[acc_mask], dec[acc_mask]
    cm = confusion_counts(ya, da)
    n_pos, n_neg = int(y.sum()), int((1 - y).sum())
    n_acc = int(acc_mask.sum())
    errors_acc = int(np.sum(ya != da))
    boot = {"n_resamples": n_bootstrap, "confidence": confidence, "seed": seed}

    def ci(stat, *arrays):
        lo, hi = bootstrap_ci(stat, *arrays, **boot)
        return {"ci_low": _jsonable(lo), "ci_high": _jsonable(hi)}

    errs = (hard != y).astype(np.float64)
    conf = decision_confidence(p, hard)
    report: dict[str, Any] = {
        "n": int(y.size), "n_pos": n_pos, "n_neg": n_neg,
        "threshold": float(threshold),
        "n_accepted": n_acc,
        "coverage": _jsonable(n_acc / y.size if y.size else float("nan")),
        "defer_rate": _jsonable(1.0 - n_acc / y.size if y.size else float("nan")),
        "confusion_matrix": cm,
        "accuracy": _jsonable((cm["tp"] + cm["tn"]) / n_acc if n_acc else float("nan")),
        "selective_risk": rate_with_ci(errors_acc, n_acc, confidence),
        "fnr": rate_with_ci(cm["fn"], n_pos, confidence),
        "fpr": rate_with_ci(cm["fp"], n_neg, confidence),
        "balanced_accuracy": {"value": _jsonable(balanced_accuracy(ya, da)),
                              **ci(_decision_axis("balanced_accuracy"), da, ya)},
        "mcc": {"value": _jsonable(mcc(ya, da)), **ci(_decision_axis("mcc"), da, ya)},
        "ece": {"value": _jsonable(ece(p, y, n_bins, "positive")), "n_bins": n_bins,
                "variant": "positive", "norm": "l1",
                **ci(lambda a, b, axis=-1: _ece_axis(a, b, axis, n_bins), p, y)},
        "ece_top_label": {"value": _jsonable(ece(p, y, n_bins, "top_label")), "n_bins": n_bins},
        "brier": {"value": _jsonable(brier(p, y)), **ci(_brier_axis, p, y)},
        "nll": _jsonable(nll(p, y)),
        "auroc": {"value": _jsonable(auroc(p, y)), **ci(_auroc_axis, p, y)},
        "aurc": _jsonable(aurc(conf, errs)),
        "eaurc": _jsonable(eaurc(conf, errs)),
        "bootstrap": {"method": "percentile", **boot},
    }
    return report
