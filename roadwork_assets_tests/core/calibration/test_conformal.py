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


def _coverage_band(cov, n_cal, alpha) -> tuple[bool, bool]:
    """(lower_ok, upper_ok) for split-conformal coverage over many draws.

    With n calibration scores and no ties, 1 - α <= E[coverage] <= 1 - α + 1/(n+1)
    (Vovk; Angelopoulos & Bates, Thm D.1), n the calibration size of the draw (per class
    for Mondrian). Checked on the mean over draws with ±3 SE slack.
    """
    cov, n_cal = np.asarray(cov, dtype=np.float64), np.asarray(n_cal, dtype=np.float64)
    se = cov.std(ddof=1) / np.sqrt(cov.size)
    lower_ok = cov.mean() >= 1 - alpha - 3 * se
    upper_ok = np.mean(cov - (1 - alpha + 1 / (n_cal + 1))) <= 3 * se
    return bool(lower_ok), bool(upper_ok)


def _coverage_draws(rng, method, alpha, reps=300, sets_fn=None):
    """Per draw: overall / per-class coverage on 2500 test items and the calibration sizes."""
    _, y, s = draw(rng, 3000)
    out = {"cov": [], "cov_pos": [], "cov_neg": [], "n": [], "n_pos": [], "n_neg": []}
    for _ in range(reps):
        perm = rng.permutation(y.size)
        cal, test = perm[:500], perm[500:]
        conf = SplitConformalBinary(alpha, method).fit(s[cal], y[cal])
        sets = conf.predict_sets(s[test]) if sets_fn is None else sets_fn(s[test])
        rep = coverage_report(sets, y[test])
        out["cov"].append(rep["coverage"])
        out["cov_pos"].append(rep["coverage_pos"])
        out["cov_neg"].append(rep["coverage_neg"])
        out["n"].append(cal.size)
        out["n_pos"].append(int(y[cal].sum()))
        out["n_neg"].append(int(cal.size - y[cal].sum()))
    return out


@pytest.mark.parametrize("method", ["lac", "mondrian"])
def test_coverage_over_random_splits_from_both_sides(rng, method):
    """Mean coverage over 300 random splits lies in [1 - α, 1 - α + 1/(n+1)] ± 3 SE:
    marginal for LAC (n = 500), per label for Mondrian (n = that label's count).

    Scores σ(2x) are continuous, so there are no ties and the upper bound applies. The
    band is 1/501 ≈ 0.002 wide against an SE of ~0.0006 for the mean coverage."""
    alpha = 0.1
    d = _coverage_draws(rng, method, alpha)
    if method == "lac":
        assert _coverage_band(d["cov"], d["n"], alpha) == (True, True)
    else:  # class-conditional coverage, each label
        assert _coverage_band(d["cov_pos"], d["n_pos"], alpha) == (True, True)
        assert _coverage_band(d["cov_neg"], d["n_neg"], alpha) == (True, True)


def test_upper_coverage_check_rejects_over_covering_sets(rng):
    """The upper side bites: "always both labels" (coverage 1) and sets from a quantile at
    α/2 (coverage ≈ 0.95) pass the lower check but fail the upper one."""
    alpha = 0.1
    both = _coverage_draws(rng, "lac", alpha, reps=50,
                           sets_fn=lambda p: np.ones((p.size, 2), dtype=bool))
    assert _coverage_band(both["cov"], both["n"], alpha) == (True, False)
    loose = _coverage_draws(rng, "lac", alpha / 2, reps=50)
    assert _coverage_band(loose["cov"], loose["n"], alpha) == (True, False)


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
