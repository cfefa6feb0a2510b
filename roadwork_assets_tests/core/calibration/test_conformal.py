"""Split conformal sets: coverage over random splits, exit rule, link to CRC."""

from __future__ import annotations

import numpy as np
import pytest

from roadwork_assets.contracts.errors import InsufficientDataError
from roadwork_assets.core.calibration.conformal import (
    SplitConformalBinary,
    coverage_report,
    set_decisions,
)
from roadwork_assets.core.calibration.risk_control import crc_fnr_threshold

from .conftest import draw


@pytest.mark.parametrize("method", ["lac", "mondrian"])
def test_coverage_over_random_splits(rng, method):
    alpha, reps = 0.1, 300
    _, y, s = draw(rng, 3000)
    cov, cov_pos, cov_neg = [], [], []
    for _ in range(reps):
        perm = rng.permutation(y.size)
        cal, test = perm[:500], perm[500:]
        sets = SplitConformalBinary(alpha, method).fit(s[cal], y[cal]).predict_sets(s[test])
        rep = coverage_report(sets, y[test])
        cov.append(rep["coverage"])
        cov_pos.append(rep["coverage_pos"])
        cov_neg.append(rep["coverage_neg"])
    slack = 3 * np.std(cov) / np.sqrt(reps)
    assert np.mean(cov) >= 1 - alpha - slack
    if method == "mondrian":  # class-conditional coverage, each label
        assert np.mean(cov_pos) >= 1 - alpha - 3 * np.std(cov_pos) / np.sqrt(reps)
        assert np.mean(cov_neg) >= 1 - alpha - 3 * np.std(cov_neg) / np.sqrt(reps)


def test_singletons_exit_and_other_sets_defer():
    sets = np.array([[True, False], [False, True], [True, True], [False, False]])
    np.testing.assert_array_equal(set_decisions(sets), [0, 1, -1, -1])


def test_mondrian_positive_quantile_is_the_crc_fnr_threshold(rng):
    """Class 1 leaves the set exactly when CRC at the same α says 'negative'."""
    _, y, s = draw(rng, 2000)
    alpha = 0.05
    conf = SplitConformalBinary(alpha, "mondrian").fit(s, y)
    t_lo = crc_fnr_threshold(s[y == 1], alpha).t_lo
    has_one = conf.predict_sets(s)[:, 1]
    np.testing.assert_array_equal(~has_one, s <= t_lo)


def test_too_few_items_names_the_needed_count():
    with pytest.raises(InsufficientDataError, match="needs at least 19"):
        SplitConformalBinary(0.05, "lac").fit(np.linspace(0, 1, 10), np.r_[np.zeros(5), np.ones(5)])
