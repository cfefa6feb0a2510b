"""Risk control with one exchangeable unit per group (scene): statistics and exact reductions.

Data with a known answer: a scene g has m roadwork frames whose scores share a latent,

    s_gj = σ(z_g + σ_ε ε_gj),   z_g ~ N(μ, 1),  ε_gj ~ N(0, 1),

so the frames of one scene are strongly correlated (not exchangeable with frames of
other scenes), while the scenes are i.i.d. With equal group sizes the served
image-level FNR of "negative iff s <= t" equals the expected share of a new scene's
frames missed, in closed form:

    FNR(t) = Φ((logit t - μ) / sqrt(1 + σ_ε²)).
"""

from __future__ import annotations

import numpy as np
import pytest
from mapie.risk_control.methods import compute_hoeffding_bentkus_p_value
from scipy import stats
from scipy.special import expit, logit

from roadwork_assets.contracts.errors import BadInputError, InsufficientDataError
from roadwork_assets.core.calibration.risk_control import (
    crc_fnr_threshold,
    hoeffding_bentkus_pvalues,
    ltt_fnr_threshold,
)

from .conftest import MIN_POWER, violation_rate_ok, violation_test_power

MU, NOISE = 1.0, 0.05


def scenes(rng, n_groups, m, lead=()):
    """(scores [*lead, n_groups * m], group ids [n_groups * m]) of all-positive scenes."""
    z = rng.normal(MU, 1.0, (*lead, n_groups, 1))
    s = expit(z + NOISE * rng.normal(size=(*lead, n_groups, m)))
    return s.reshape(*lead, n_groups * m), np.repeat(np.arange(n_groups), m)


def served_fnr(t):
    with np.errstate(divide="ignore"):
        return stats.norm.cdf((logit(np.clip(t, 0.0, 1.0)) - MU) / np.sqrt(1.0 + NOISE**2))


def _mean_se(x):
    x = np.asarray(x, dtype=np.float64)
    return x.mean(), x.std(ddof=1) / np.sqrt(x.size)


def test_closed_form_fnr_matches_fresh_scenes(rng):
    """The test oracle itself: FNR(t) equals the miss rate on 20,000 fresh scenes (10 frames)."""
    s, _ = scenes(rng, 20_000, 10)
    for t in (0.3, 0.5, 0.7):
        per_scene = (s.reshape(20_000, 10) <= t).mean(axis=1)  # scenes are the i.i.d. units
        mean, se = _mean_se(per_scene)
        assert abs(mean - served_fnr(t)) <= 4 * se


# ------------------------------------------------------------------------ CRC
# α = 0.1, n_g = 11 scenes of m = 10 frames: image-level CRC uses k = ⌊0.1·111⌋ = 11,
# i.e. the first frame of the 2nd-lowest scene, so with (near-)identical frames it misses
# a new scene iff the scene ranks among the 2 lowest of 12: E[FNR] ≈ 2/12 = 0.167.
# Group-level CRC: (S(t) + 1)/12 <= 0.1 allows S(t) <= 0.2, i.e. no whole scene below t:
# E[FNR] ≈ 1/12 = 0.083 <= α.
ALPHA, N_GROUPS, M, DRAWS = 0.1, 11, 10, 4000


@pytest.fixture(scope="module")
def crc_draws():
    rng = np.random.default_rng(11)
    s, g = scenes(rng, N_GROUPS, M, lead=(DRAWS,))
    grouped = [served_fnr(crc_fnr_threshold(s[r], ALPHA, groups=g).t_lo) for r in range(DRAWS)]
    naive = [served_fnr(crc_fnr_threshold(s[r], ALPHA).t_lo) for r in range(DRAWS)]
    return np.asarray(grouped), np.asarray(naive)


def test_group_crc_keeps_the_served_fnr_at_alpha(crc_draws):
    """Mean served FNR over 4000 fresh calibration draws <= α + 3 SE (measured 0.0787 ± 0.0012).

    Power: the companion test shows the naive image-level rule on the same generator
    exceeding α by 0.051 ≈ 33 SE, so a group rule that behaved like it would fail here
    with probability ≈ 1."""
    grouped, _ = crc_draws
    mean, se = _mean_se(grouped)
    assert mean <= ALPHA + 3 * se, (mean, se)
    assert abs(mean - 1 / (N_GROUPS + 1)) <= 0.01  # ≈ 1/12: not vacuous (t_lo = 0 gives 0)


def test_image_level_crc_breaks_on_correlated_frames(crc_draws):
    """Same data, one unit per image: mean served FNR > α + 3 SE (measured 0.1506 ± 0.0015).

    Expected ≈ 2/12 = 0.167 with identical frames (the noise pulls it a little down) vs
    α = 0.1: the gap is ~33 SE, so this test (and hence the group test above) has
    power ≈ 1 to tell the two rules apart."""
    _, naive = crc_draws
    mean, se = _mean_se(naive)
    assert mean > ALPHA + 3 * se, (mean, se)
    assert mean > 0.14


def test_group_crc_formula_on_a_worked_example():
    """α = 0.25, 7 groups: budget α(n_g+1) - 1 = 1 lost group-equivalent."""
    scores = [0.1, 0.5, 0.2, 0.3, 0.35, 0.9, 0.95, 0.6, 0.7, 0.8, 0.85]
    groups = ["a", "a", "b", "c", "c", "c", "c", "d", "e", "f", "g"]
    # S(t): 0.1 -> 1/2 (a), 0.2 -> 3/2 (+b) > 1: t_lo is just below 0.2
    res = crc_fnr_threshold(scores, 0.25, groups=groups)
    assert res.t_lo == np.nextafter(0.2, 0.0) and res.unit == "group" and res.n_units == 7
    assert res.n_misses == 1 and res.unit_loss == pytest.approx(0.5) and res.k == 2
    # b's positive moved to 0.99: S = 1/2, 3/4 (c at 0.3), 1 (c at 0.35) <= 1, 3/2 at 0.5
    res = crc_fnr_threshold(scores[:2] + [0.99] + scores[3:], 0.25, groups=groups)
    assert res.t_lo == np.nextafter(0.5, 0.0) and res.unit_loss == pytest.approx(1.0)
    assert res.n_misses == 3


def test_singleton_groups_reduce_exactly_to_image_level(rng):
    s = expit(rng.normal(1.0, 1.5, 500))
    s[:20] = s[20]  # ties too
    ids = [f"g{i}" for i in range(s.size)]
    for alpha in (0.02, 0.1, 0.29):
        a, b = crc_fnr_threshold(s, alpha), crc_fnr_threshold(s, alpha, groups=ids)
        assert (a.t_lo, a.k, a.n_misses) == (b.t_lo, b.k, b.n_misses)
        assert a.k == int(np.floor(alpha * 501 + 1e-9))
        assert a.t_lo == np.nextafter(np.sort(s)[a.k - 1], -np.inf)
        la, _, pa = ltt_fnr_threshold(s, alpha, 0.1, return_pvalues=True)
        lb, _, pb = ltt_fnr_threshold(s, alpha, 0.1, groups=ids, return_pvalues=True)
        assert la.t_lo == lb.t_lo and np.array_equal(pa, pb)


def test_group_crc_too_few_groups_names_the_count():
    s = np.linspace(0.1, 0.9, 300)
    g = np.repeat(np.arange(30), 10)  # 300 positives, but 30 groups
    with pytest.raises(InsufficientDataError, match="has 30 groups with roadwork; α=0.02 needs at least 49"):
        crc_fnr_threshold(s, 0.02, groups=g)
    crc_fnr_threshold(s, 0.02)  # as 300 images it would (wrongly) pass
    with pytest.raises(BadInputError, match="299 group keys for 300 positive scores"):
        crc_fnr_threshold(s, 0.1, groups=g[:-1])


# ------------------------------------------------------------------------ LTT
def test_bounded_loss_pvalues_match_mapie():
    n, alpha = 40, 0.1
    loss = np.array([0.0, 0.5, 1.25, 2.0, 3.1, 4.0, 6.7])
    ours = hoeffding_bentkus_pvalues(loss, n, alpha, binary=False)
    ref = compute_hoeffding_bentkus_p_value(loss / n, n, alpha, binary=False)[:, 0]
    np.testing.assert_allclose(ours, ref, rtol=1e-12)


LTT_ALPHA, LTT_DELTA, LTT_GROUPS, LTT_M, LTT_DRAWS = 0.1, 0.1, 100, 5, 900


def test_group_ltt_violation_rate_at_most_delta():
    """P(FNR(t_lo) > α) <= δ for group-level LTT: exact one-sided binomial test at level
    1e-3 over 900 fresh draws of 100 scenes x 5 frames. Power to detect a true violation
    rate of 1.5·δ = 0.15: 0.93 (asserted from scipy.stats.binom). Measured rate: 0.014
    (conservative: the [0, 1]-loss Bentkus bound carries a factor e)."""
    assert violation_test_power(LTT_DRAWS, LTT_DELTA) >= MIN_POWER
    rng = np.random.default_rng(12)
    s, g = scenes(rng, LTT_GROUPS, LTT_M, lead=(LTT_DRAWS,))
    fnr = np.array([served_fnr(ltt_fnr_threshold(s[r], LTT_ALPHA, LTT_DELTA, groups=g).t_lo)
                    for r in range(LTT_DRAWS)])
    assert violation_rate_ok(int(np.sum(fnr > LTT_ALPHA)), LTT_DRAWS, LTT_DELTA)
    assert np.median(fnr) > LTT_ALPHA / 4  # not vacuous: t_lo = 0 would pass


def test_image_level_ltt_violates_on_correlated_frames():
    """Power check on the same generator: treating 500 frames as 500 independent units
    overstates the evidence ~5x, and the violation rate is far above δ (measured 0.28);
    the binomial test at level 1e-3 rejects 'rate <= δ'."""
    rng = np.random.default_rng(13)
    draws = 300
    s, _ = scenes(rng, LTT_GROUPS, LTT_M, lead=(draws,))
    fnr = np.array([served_fnr(ltt_fnr_threshold(s[r], LTT_ALPHA, LTT_DELTA).t_lo) for r in range(draws)])
    assert not violation_rate_ok(int(np.sum(fnr > LTT_ALPHA)), draws, LTT_DELTA)
