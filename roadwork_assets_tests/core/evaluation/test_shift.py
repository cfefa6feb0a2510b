"""Score-shift warning: KS tests of val_test scores against the policy's val_calib reference."""

import json

import numpy as np
import pytest
from scipy.special import expit
from scipy.stats import binomtest, ks_2samp

from roadwork_assets.contracts.errors import BadInputError
from roadwork_assets.contracts.schemas import TestReport
from roadwork_assets.core.artifacts import make_provenance
from roadwork_assets.core.calibration.policies import fit_policy
from roadwork_assets.core.evaluation.report import evaluate_bundle_policy
from roadwork_assets.core.evaluation.shift import (
    SHIFT_LEVEL,
    compare_to_reference,
    score_reference,
)

# sizes like a val_calib threshold part and a val_test split
N_REF = (150, 300)
N_TEST = (100, 200)


def _scores(rng, n_pos, n_neg, pos_shift=0.0, neg_shift=0.0):
    """Calibrated-probability-like scores: positives ~ Beta(5, 2), negatives ~ Beta(2, 5)."""
    pos = np.clip(rng.beta(5, 2, n_pos) - pos_shift, 0, 1)
    neg = np.clip(rng.beta(2, 5, n_neg) + neg_shift, 0, 1)
    return np.r_[pos, neg], np.r_[np.ones(n_pos, np.int64), np.zeros(n_neg, np.int64)]


def _rates(n_draws, **shift):
    pos_flags, warnings = [], []
    for seed in range(n_draws):
        rng = np.random.default_rng(seed)
        result = compare_to_reference(score_reference(*_scores(rng, *N_REF)),
                                      *_scores(rng, *N_TEST, **shift))
        pos_flags.append(result.tests[0].shifted)
        warnings.append(result.warning is not None)
    return int(np.sum(pos_flags)), int(np.sum(warnings))


def test_p_values_are_scipys_two_sample_ks_per_class():
    rng = np.random.default_rng(0)
    ref_s, ref_y = _scores(rng, *N_REF)
    s, y = _scores(rng, *N_TEST, pos_shift=0.05)
    result = compare_to_reference(score_reference(ref_s, ref_y), s, y)
    groups = {
        "positives": (ref_s[ref_y == 1], s[y == 1]),
        "negatives": (ref_s[ref_y == 0], s[y == 0]),
        "all": (ref_s, s),
    }
    assert [t.group for t in result.tests] == list(groups)
    for t in result.tests:
        ref, test = groups[t.group]
        expected = ks_2samp(ref, test)
        assert t.statistic == pytest.approx(expected.statistic, abs=1e-12)
        assert t.p_value == pytest.approx(expected.pvalue, rel=1e-9)
        assert (t.n_reference, t.n_test) == (ref.size, test.size)
        assert t.shifted == (expected.pvalue < SHIFT_LEVEL)


def test_same_distribution_rarely_warns():
    n = 600
    pos_alarms, any_alarms = _rates(n)
    # exact binomial tests: the positives' false-alarm rate is not above the level, and
    # the warning (positives or negatives shifted) not above twice the level
    assert binomtest(pos_alarms, n, SHIFT_LEVEL, alternative="greater").pvalue > 1e-3, pos_alarms
    assert binomtest(any_alarms, n, 2 * SHIFT_LEVEL, alternative="greater").pvalue > 1e-3, \
        any_alarms


def test_roadwork_scores_shifted_down_warn_and_say_misses_rise():
    n = 200
    pos_alarms, _ = _rates(n, pos_shift=0.1)
    assert pos_alarms / n >= 0.85  # measured 0.95 over 500 draws
    rng = np.random.default_rng(1)
    result = compare_to_reference(score_reference(*_scores(rng, *N_REF)),
                                  *_scores(rng, *N_TEST, pos_shift=0.2))
    assert result.tests[0].shifted
    assert result.warning.startswith("Score shift between val_calib and val_test at level 0.01.")
    assert "exchangeable with val_calib" in result.warning
    assert "val_test roadwork scores lower, which raises misses" in result.warning
    assert f"p = {result.tests[0].p_value:.2g}" in result.warning


def test_negatives_shift_warns_about_fpr_not_fnr():
    rng = np.random.default_rng(2)
    result = compare_to_reference(score_reference(*_scores(rng, *N_REF)),
                                  *_scores(rng, *N_TEST, neg_shift=0.2))
    assert not result.tests[0].shifted and result.tests[1].shifted
    assert "Non-roadwork scores differ" in result.warning
    assert "Roadwork scores on val_test differ" not in result.warning


def test_class_balance_change_alone_is_a_note_not_a_warning():
    rng = np.random.default_rng(3)
    result = compare_to_reference(score_reference(*_scores(rng, 300, 300)),
                                  *_scores(rng, 300, 60))
    assert result.tests[2].shifted and not any(t.shifted for t in result.tests[:2])
    assert result.warning is None
    assert "class balance changed (label shift)" in result.note


def test_reference_is_thinned_with_one_stride_above_the_cap():
    rng = np.random.default_rng(4)
    s, y = _scores(rng, 3000, 6000)
    ref = score_reference(s, y, max_points=1000)
    assert ref.stride == 9 and (ref.n_positive, ref.n_negative) == (3000, 6000)
    assert len(ref.positives) == 333 and len(ref.negatives) == 667  # 1 : 2, as in the data
    assert ref.positives == sorted(ref.positives)
    exact = score_reference(s[:500], y[:500])
    assert exact.stride == 1 and len(exact.positives) == int(y[:500].sum())


def test_bad_scores_are_refused_naming_rows():
    with pytest.raises(BadInputError, match=r"NaN/inf at rows \[1\]"):
        score_reference([0.1, np.nan], [0, 1])


def _logits(rng, n, pos_margin_shift=0.0):
    x = rng.uniform(-3, 3, n)
    y = (rng.uniform(size=n) < expit(2 * x)).astype(np.int64)
    z = 3.0 * x + 0.5 + rng.normal(0, 0.8, n) - pos_margin_shift * y
    return np.stack([-0.5 * z, 0.5 * z], axis=-1)[:, None, :], y


def test_policy_stores_its_threshold_part_and_the_report_warns_on_shift():
    logits, y = _logits(np.random.default_rng(5), 2000)
    policy = fit_policy("softmax", logits, y, [f"i{i}" for i in range(len(y))], alpha=0.05)
    ref = policy.score_reference
    assert ref is not None and ref.stride == 1
    assert len(ref.positives) == policy.n_pos_threshold
    assert len(ref.negatives) == policy.n_neg_threshold

    def report(shift):
        z, yt = _logits(np.random.default_rng(6), 800, shift)
        rep, _ = evaluate_bundle_policy(policy, z, yt, bundle_id="b", n_bootstrap=20,
                                        provenance=make_provenance("test"))
        return TestReport.model_validate(json.loads(rep.model_dump_json()))  # JSON round trip

    same, shifted = report(0.0), report(2.0)
    assert same.shift_warning is None and not same.score_shift.tests[0].shifted
    assert shifted.score_shift.tests[0].shifted
    assert shifted.shift_warning == shifted.score_shift.warning
    assert "guaranteed miss rate may not hold" in shifted.shift_warning
