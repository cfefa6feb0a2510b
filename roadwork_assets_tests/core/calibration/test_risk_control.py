"""Statistical tests of the FNR guarantees (closed-form risk), MAPIE parity, refusals."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from mapie.risk_control import BinaryClassificationController, MultiLabelClassificationController
from mapie.risk_control.methods import compute_hoeffding_bentkus_p_value
from scipy.special import expit

from roadwork_assets.contracts.errors import InsufficientDataError
from roadwork_assets.core.calibration.risk_control import (
    crc_fnr_threshold,
    crc_min_positives,
    hoeffding_bentkus_pvalues,
    ltt_fnr_threshold,
    ltt_min_positives,
    ltt_positive_exit_threshold,
)

from .conftest import (
    MIN_POWER,
    draw,
    true_fnr,
    true_positive_exit_fdr,
    violation_rate_ok,
    violation_test_power,
)


# ------------------------------------------------------------------------ CRC
def test_crc_mean_fnr_over_random_calibration_test_splits(rng):
    """Mean test FNR over 1000 random splits of one pool is within [α - 2/(n₊+1) - 3SE, α + 3SE]."""
    alpha, n_cal = 0.1, 600
    _, y, s = draw(rng, 4000)
    fnrs, n_pos = [], []
    for _ in range(1000):
        perm = rng.permutation(y.size)
        cal, test = perm[:n_cal], perm[n_cal:]
        pos_cal = s[cal][y[cal] == 1]
        t_lo = crc_fnr_threshold(pos_cal, alpha).t_lo
        pos_test = s[test][y[test] == 1]
        fnrs.append(np.mean(pos_test <= t_lo))
        n_pos.append(pos_cal.size)
    fnrs = np.asarray(fnrs)
    se = fnrs.std(ddof=1) / np.sqrt(fnrs.size)
    lower = alpha - 2.0 / (min(n_pos) + 1) - 3 * se
    assert lower <= fnrs.mean() <= alpha + 3 * se, (fnrs.mean(), lower, se)


def test_crc_expected_true_fnr_is_k_over_n_plus_1_on_fresh_draws(rng):
    """With the closed-form FNR, E[FNR] = k/(n₊+1) exactly for continuous scores."""
    alpha, n_pos, reps = 0.05, 299, 3000  # k = ⌊0.05·300⌋ = 15, k/(n+1) = 0.05
    x, y, _ = draw(rng, (reps, 2 * n_pos + 200))
    true = []
    for r in range(reps):
        pos = expit(2 * x[r][y[r] == 1][:n_pos])
        if pos.size < n_pos:
            continue
        true.append(true_fnr(crc_fnr_threshold(pos, alpha).t_lo))
    true = np.asarray(true)
    se = true.std(ddof=1) / np.sqrt(true.size)
    assert true.size > 0.99 * reps
    assert abs(true.mean() - 15 / 300) <= 3 * se
    assert true.mean() <= alpha + 3 * se


def test_crc_threshold_is_just_below_the_kth_smallest_positive(rng):
    pos = rng.uniform(size=200)
    res = crc_fnr_threshold(pos, 0.1)  # k = ⌊20.1⌋ = 20
    s_k = np.sort(pos)[19]
    assert res.k == 20 and res.t_lo < s_k and np.nextafter(res.t_lo, 1.0) == s_k
    assert res.n_misses == 19  # strictly below s_(k): k - 1 misses in-sample


def test_crc_too_few_positives_names_the_needed_count():
    assert crc_min_positives(0.02) == 49
    with pytest.raises(InsufficientDataError, match=r"has 30 positives; α=0\.02 needs at least 49"):
        crc_fnr_threshold(np.linspace(0.1, 0.9, 30), 0.02, context="val_calib threshold part")
    crc_fnr_threshold(np.linspace(0.1, 0.9, 49), 0.02)  # 49 is enough


# ------------------------------------------------------------------------ LTT
@pytest.mark.parametrize("fwer", ["fixed_sequence", "bonferroni"])
def test_ltt_violation_rate_at_most_delta_over_fresh_draws(rng, fwer):
    """P(FNR(t_lo) > α) <= δ, by an exact one-sided binomial test (level 1e-3) of the
    violations of the closed-form FNR over 900 fresh draws.

    Power: a true violation rate of 1.5·δ = 0.15 is detected with probability 0.93
    (computed with scipy.stats.binom and asserted, so the draw count cannot silently
    shrink). Measured violation rates: 0.07 (fixed sequence), 0.00 (Bonferroni)."""
    alpha, delta, reps = 0.1, 0.1, 900
    assert violation_test_power(reps, delta) >= MIN_POWER
    x, y, _ = draw(rng, (reps, 1000))
    true = np.array([
        true_fnr(ltt_fnr_threshold(expit(2 * x[r][y[r] == 1]), alpha, delta, fwer=fwer).t_lo)
        for r in range(reps)
    ])
    assert violation_rate_ok(int(np.sum(true > alpha)), reps, delta), np.mean(true > alpha)
    assert np.median(true) > alpha / 3  # and it is not vacuous (t_lo = 0 would pass)


def test_ltt_too_few_positives_names_the_needed_count():
    need = ltt_min_positives(0.02, 0.1)
    assert need == 114  # (1 - 0.02)^n <= 0.1  <=>  n >= 113.97
    with pytest.raises(InsufficientDataError, match=f"has 100 positives.*needs at least {need}"):
        ltt_fnr_threshold(np.linspace(0.1, 0.9, 100), 0.02, 0.1)
    ltt_fnr_threshold(np.linspace(0.1, 0.9, need), 0.02, 0.1)


def test_hoeffding_bentkus_pvalues_match_mapie():
    n = 300
    k = np.arange(0, 60)
    ours = hoeffding_bentkus_pvalues(k, n, 0.1)
    ref = compute_hoeffding_bentkus_p_value(k / n, n, 0.1, binary=True)[:, 0]
    # MAPIE works from r̂ = k/n and ceil(n·r̂): that float product can land a hair above
    # k and count one miss more. Compare only where it reproduces k exactly.
    exact = np.ceil(n * (k / n)) == k
    assert exact.mean() > 0.8
    np.testing.assert_allclose(ours[exact], ref[exact], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("fwer", ["fixed_sequence", "bonferroni"])
def test_ltt_matches_mapie_binary_classification_controller(rng, fwer):
    """MAPIE's BinaryClassificationController is LTT (not CRC): compare with our LTT.

    MAPIE predicts positive iff p >= λ; we decide negative iff p <= t. With continuous
    scores no score equals a grid point, so both test the same hypotheses. n₊ = 1024
    (a power of two) keeps MAPIE's r̂ = 1 - recall exact in floating point; for other
    n₊ its ceil(n·r̂) can add one miss (more conservative by <= one count).
    """
    grid = np.linspace(0.0, 0.99, 100)
    for _ in range(3):
        p_pos = expit(rng.normal(1.5, 1.5, 1024))
        p_neg = expit(rng.normal(-1.5, 1.5, 700))
        p = np.r_[p_pos, p_neg]
        y = np.r_[np.ones(1024, int), np.zeros(700, int)]
        bcc = BinaryClassificationController(
            predict_function=lambda X: np.c_[1 - X[:, 0], X[:, 0]], risk="recall",
            target_level=0.9, confidence_level=0.9, list_predict_params=grid, fwer_method=fwer,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bcc.calibrate(p[:, None], y)
        ours, _, pvals = ltt_fnr_threshold(p_pos, 0.1, 0.1, grid, fwer=fwer, return_pvalues=True)
        np.testing.assert_allclose(pvals, bcc.p_values[:, 0], rtol=1e-12, atol=1e-14)
        assert ours.n_certified == len(bcc.valid_predict_params)
        assert ours.t_lo == float(np.max(bcc.valid_predict_params))


def test_crc_matches_mapie_multilabel_crc_on_a_grid(rng):
    """MAPIE's CRC (MultiLabelClassificationController, recall, one label) thresholds a
    grid: 'label kept iff p > λ', the same side convention as ours. Its λ must be the
    largest grid point <= our exact t_lo. α(n₊+1) = 20.1 is not an integer: MAPIE
    requires the CRC bound to be < α where the paper (and we) use <= α, which only
    differs when α(n₊+1) is an integer.
    """
    grid = np.arange(0.0, 1.0, 0.005)
    for _ in range(2):
        pos = expit(rng.normal(1.0, 1.5, 200))
        ml = MultiLabelClassificationController(
            predict_function=lambda X: X, risk="recall", method="crc", target_level=0.9,
            predict_params=grid,
        )
        ml.calibrate(pos[:, None], np.ones((pos.size, 1), dtype=int))
        ours = crc_fnr_threshold(pos, 0.1)
        assert float(ml.best_predict_param[0]) == grid[grid <= ours.t_lo].max()


# ------------------------------------------------------------- positive exits
def test_positive_exit_fdr_holds_with_probability_1_minus_delta(rng):
    """P(FDR(t_hi) > β) <= δ, by an exact one-sided binomial test (level 1e-3) over 900
    fresh threshold parts, true FDR in closed form. Power to detect a true violation
    rate of 1.5·δ: 0.93 (asserted). Measured violation rate: 0.08."""
    beta, delta, reps = 0.05, 0.1, 900
    assert violation_test_power(reps, delta) >= MIN_POWER
    _, y_ref, s_ref = draw(rng, 2000)
    x, y, _ = draw(rng, (reps, 2000))
    fdr, t_his = [], []
    for r in range(reps):
        s = expit(2 * x[r])
        res = ltt_positive_exit_threshold(
            s, y[r], t_lo=0.05, fdr_target=beta, delta=delta, reference_scores=s_ref, reference_labels=y_ref
        )
        t_his.append(res.t_hi)
        fdr.append(true_positive_exit_fdr(res.t_hi) if res.certified else 0.0)
    fdr = np.asarray(fdr)
    assert violation_rate_ok(int(np.sum(fdr > beta)), reps, delta), np.mean(fdr > beta)
    assert np.median(t_his) < 0.99  # positive exits exist: not vacuous


def test_positive_exit_without_certification_exits_nothing():
    s = np.linspace(0.01, 0.99, 50)
    y = np.zeros(50, dtype=int)  # every exit would be false
    res = ltt_positive_exit_threshold(s, y, t_lo=0.2, fdr_target=0.05, delta=0.1)
    assert not res.certified and res.t_hi == 1.0 and res.n_exits == 0
