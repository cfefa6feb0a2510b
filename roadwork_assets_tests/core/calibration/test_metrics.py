"""Metrics: ECE parity with torchmetrics, AURC ties, exact intervals, JSON report."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.special import expit
from sklearn.metrics import balanced_accuracy_score, matthews_corrcoef, roc_auc_score
from torchmetrics.classification import BinaryCalibrationError

from roadwork_assets.core.calibration.metrics import (
    aurc,
    auroc,
    balanced_accuracy,
    brier,
    classification_report,
    clopper_pearson,
    eaurc,
    ece,
    mcc,
    nll,
    optimal_aurc,
    risk_coverage_curve,
)


@pytest.fixture
def scored(rng):
    x = rng.uniform(-3, 3, 3000)
    y = (rng.uniform(size=x.size) < expit(2 * x)).astype(np.int64)
    p = expit(3.0 * x + 0.4)  # over-confident and shifted
    return p, y


def test_ece_matches_torchmetrics_binary_calibration_error(scored):
    p, y = scored
    ref = BinaryCalibrationError(n_bins=15, norm="l1")(torch.tensor(p), torch.tensor(y)).item()
    # Same bins ([e_i, e_{i+1}), float64), same positive-class definition: equal up to
    # summation order (observed ~1e-17).
    assert ece(p, y, n_bins=15, variant="positive") == pytest.approx(ref, abs=1e-12)


def test_ece_perfectly_calibrated_is_small_and_top_label_by_hand(rng):
    x = rng.uniform(-3, 3, 200_000)
    y = (rng.uniform(size=x.size) < expit(2 * x)).astype(np.int64)
    assert ece(expit(2 * x), y) < 0.01
    p = np.array([0.1, 0.25, 0.85, 0.95, 0.65])
    t = np.array([0, 1, 1, 1, 0])
    # top-label: conf = max(p, 1-p) = [.9, .75, .85, .95, .65], correct = [1, 0, 1, 1, 0];
    # 5 bins: [.6, .8) holds {.75, .65}, both wrong -> 2 * |0 - .7|;
    #         [.8, 1]  holds {.9, .85, .95}, all right -> 3 * |1 - .9|
    expected = (2 * 0.7 + 3 * 0.1) / 5
    assert ece(p, t, n_bins=5, variant="top_label") == pytest.approx(expected)


def test_brier_nll_auroc_mcc_ba_match_references(scored):
    p, y = scored
    pred = (p > 0.5).astype(int)
    assert brier(p, y) == pytest.approx(np.mean((p - y) ** 2))
    assert nll(p, y) == pytest.approx(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    assert auroc(p, y) == pytest.approx(roc_auc_score(y, p))
    assert mcc(y, pred) == pytest.approx(matthews_corrcoef(y, pred))
    assert balanced_accuracy(y, pred) == pytest.approx(balanced_accuracy_score(y, pred))
    assert mcc(y, np.ones_like(y)) == 0.0  # one predicted class: 0, as StreetVision


def test_aurc_ties_equal_the_average_over_tie_orders():
    conf = np.array([0.9, 0.9, 0.9, 0.5, 0.5, 0.2])
    err = np.array([1, 0, 0, 1, 0, 1], dtype=float)
    values = []
    groups = [[0, 1, 2], [3, 4], [5]]
    for perm_a in itertools.permutations(groups[0]):
        for perm_b in itertools.permutations(groups[1]):
            order = list(perm_a) + list(perm_b) + groups[2]
            e = err[order]
            values.append(np.mean(np.cumsum(e) / np.arange(1, 7)))
    assert aurc(conf, err) == pytest.approx(np.mean(values))
    cov, risk = risk_coverage_curve(conf, err)
    assert cov[-1] == 1.0 and risk[-1] == pytest.approx(err.mean())


def test_eaurc_is_zero_for_the_oracle_and_positive_otherwise(rng):
    err = (rng.uniform(size=500) < 0.2).astype(float)
    assert eaurc(-err, err) == pytest.approx(0.0, abs=1e-12)
    assert aurc(-err, err) == pytest.approx(optimal_aurc(err))
    assert eaurc(rng.uniform(size=500), err) > 0.01


@pytest.mark.parametrize(("k", "n"), [(0, 50), (3, 50), (50, 50), (17, 1000)])
def test_clopper_pearson_matches_scipy_binomtest(k, n):
    ref = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    lo, hi = clopper_pearson(k, n, 0.95)
    assert lo == pytest.approx(ref.low, abs=1e-12) and hi == pytest.approx(ref.high, abs=1e-12)


@pytest.mark.parametrize("confidence", [0.8, 0.9, 0.95, 0.99])
def test_clopper_pearson_keeps_the_beta_quantile_values_within_1e_12(confidence):
    """binomtest's exact interval (a root finder) against the Beta-quantile form it
    replaced, two-sided and one-sided (the failure gate's upper bound)."""
    a = 1.0 - confidence
    for n in (1, 2, 5, 30, 50, 400, 1000, 5000):
        for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
            lo = 0.0 if k == 0 else stats.beta.ppf(a / 2, k, n - k + 1)
            hi = 1.0 if k == n else stats.beta.ppf(1 - a / 2, k + 1, n - k)
            upper = 1.0 if k == n else stats.beta.ppf(confidence, k + 1, n - k)
            got_lo, got_hi = clopper_pearson(k, n, confidence)
            one_lo, one_hi = clopper_pearson(k, n, confidence, alternative="less")
            assert abs(got_lo - lo) <= 1e-12 and abs(got_hi - hi) <= 1e-12, (k, n)
            assert one_lo == 0.0 and abs(one_hi - upper) <= 1e-12, (k, n)
    assert all(np.isnan(clopper_pearson(0, 0, confidence)))


def test_sklearn_backed_metrics_keep_their_edge_cases():
    # NLL clips at 1e-15 as before (sklearn alone would clip at 2.2e-16: ~36.0)
    assert nll([1.0, 0.0], [0, 1]) == pytest.approx(34.53917619362578, rel=1e-12)
    assert np.isnan(nll([], [])) and np.isnan(brier([], []))
    assert brier([0.1, 0.2], [0, 0]) == pytest.approx(0.025)  # one class only
    assert mcc([], []) == 0.0 and mcc([0, 0], [0, 0]) == 0.0
    assert np.isnan(balanced_accuracy([], []))
    assert balanced_accuracy([0, 0, 0, 0], [0, 1, 0, 1]) == 0.5  # recall of the class present


def test_classification_report_is_json_and_counts_deferrals_as_non_misses(scored):
    p, y = scored
    decisions = np.where(p < 0.2, 0, np.where(p > 0.8, 1, -1)).astype(np.int8)
    rep = classification_report(p, y, decisions=decisions, n_bootstrap=200)
    json.dumps(rep, allow_nan=False)  # plain JSON, no NaN/inf
    n_pos = int(y.sum())
    misses = int(np.sum((decisions == 0) & (y == 1)))
    assert rep["fnr"]["k"] == misses and rep["fnr"]["n"] == n_pos
    assert rep["defer_rate"] == pytest.approx(np.mean(decisions == -1))
    cm = rep["confusion_matrix"]
    assert sum(cm.values()) == int(np.sum(decisions != -1))
    for key in ("ece", "brier", "auroc", "mcc", "balanced_accuracy"):
        assert rep[key]["ci_low"] <= rep[key]["value"] <= rep[key]["ci_high"], key
    plain = classification_report(p, y, n_bootstrap=0)
    assert plain["coverage"] == 1.0
    assert plain["confusion_matrix"]["tp"] == int(np.sum((p > 0.5) & (y == 1)))
    assert plain["ece"]["ci_low"] is None  # no bootstrap asked: interval undefined, not NaN
