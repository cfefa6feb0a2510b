"""The one-λ cascade (core.calibration.cascade): a guarantee over the composed decision.

Data with a known answer. Scenes are all-roadwork or all-none, m frames each; the frames
of scene g share a latent z_g and the two stages of one frame share a latent ε_i:

    logit p1 = ±μ₁ + z_g + 0.5 ε_i + η₁,     logit p2 = ±μ₂ + z_g + 0.5 ε_i + 0.5 η₂,

(+ for roadwork, − for none; z, ε, η standard normal), so the stages' scores are
correlated per image and frames are correlated within a scene, while scenes are i.i.d.
The served FNR of any fixed (a, b, c) on a new scene — the expected share of its roadwork
frames the cascade decides negative — is the miss rate of one roadwork frame of a fresh
scene, estimated on a large fresh pool (the same pool for every draw).
"""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError
from scipy.special import expit

from roadwork_assets.contracts.errors import BadInputError, InsufficientDataError
from roadwork_assets.contracts.policy_schemas import CascadePolicyParams
from roadwork_assets.core.calibration.cascade import (
    CascadeConfig,
    CascadePolicy,
    effective_score,
    validator_reward,
)
from roadwork_assets.core.calibration.metrics import mcc
from roadwork_assets.core.calibration.policies import split_calibration_set
from roadwork_assets.core.calibration.risk_control import crc_fnr_threshold

MU1, MU2 = 1.5, 1.5  # stage 2 has less noise (sd 1.22 vs 1.5 on the logit scale)
LAT1, LAT2 = 0.02, 0.2


def scenes(rng, n_pos, n_neg, m, lead=()):
    """(p1, p2, y, groups): n_pos roadwork then n_neg none scenes of m frames each."""
    n = n_pos + n_neg
    sign = np.repeat(np.r_[np.ones(n_pos), -np.ones(n_neg)], m)
    z = np.repeat(rng.normal(size=(*lead, n)), m, axis=-1)
    shared = z + 0.5 * rng.normal(size=(*lead, n * m))
    p1 = expit(sign * MU1 + shared + rng.normal(size=(*lead, n * m)))
    p2 = expit(sign * MU2 + shared + 0.5 * rng.normal(size=(*lead, n * m)))
    return p1, p2, (sign > 0).astype(np.int64), np.repeat(np.arange(n), m)


def missed(p1, p2, a, b, c):
    """The composed miss indicator, written from the rule (not from effective_score):
    negative at stage 1 (p1 <= a) or routed (a < p1 <= b) and negative at stage 2."""
    neg1 = p1 <= a
    return neg1 | (~neg1 & (p1 <= b) & (p2 <= c))


def served_fnr(pool, a, b, c, chunk=100):
    """Miss rate on the fresh pool for per-draw thresholds a, b, c [D]."""
    p1, p2 = pool
    out = np.empty(len(a))
    for s in range(0, len(a), chunk):
        sl = slice(s, s + chunk)
        out[sl] = missed(p1[None], p2[None], a[sl, None], b[sl, None], c[sl, None]).mean(axis=1)
    return out


def mean_se(x):
    return x.mean(), x.std(ddof=1) / np.sqrt(x.size)


# ------------------------------------------------------------------ statistics
ALPHA, N_POS, N_NEG, M, DRAWS, POOL = 0.1, 100, 60, 3, 1000, 100_000
STAT_CONFIG = CascadeConfig(
    alpha=ALPHA, latency_stage1_s=LAT1, latency_stage2_s=LAT2, latency_budget_s=1.0,
    rho_grid=(0.25, 1.0), exit_pos_grid=(0.8, 0.95), n_lambda=51, alphas=(),
)


@pytest.fixture(scope="module")
def draws():
    """Per draw: the fitted cascade's served FNR and the naive rule's, on one fresh pool."""
    rng = np.random.default_rng(2024)
    p1, p2, y, g = scenes(rng, N_POS, N_NEG, M, lead=(DRAWS,))
    pool_p1, pool_p2, _, _ = scenes(rng, POOL, 0, 1)
    fits = [CascadePolicy(STAT_CONFIG).fit(p1[d], p2[d], y, g) for d in range(DRAWS)]
    served = served_fnr((pool_p1, pool_p2), *np.array([[f.t_exit_neg_, f.t_exit_pos_, f.t2_] for f in fits]).T)
    # the certified boundary λ̂ itself (the served λ >= λ̂ is chosen by reward)
    rho, b0, t2_hat = np.array([[f.rho_, f.exit_pos_floor_, 1.0 - f.lambda_certified_] for f in fits]).T
    at_hat = served_fnr((pool_p1, pool_p2), rho * t2_hat, np.maximum(rho * t2_hat, b0), t2_hat)
    # naive: certify stage 1's own misses (p1 <= t_lo) by the same group CRC on the same
    # threshold part, route t_lo < p1 <= 0.9, and let stage 2 decide at 0.5
    _, idx_thr = split_calibration_set(range(y.size), y, 0.5, groups=list(g))
    pos = idx_thr[y[idx_thr] == 1]
    t_lo = np.array([crc_fnr_threshold(p1[d, pos], ALPHA, groups=g[pos]).t_lo for d in range(DRAWS)])
    naive = served_fnr((pool_p1, pool_p2), t_lo, np.maximum(t_lo, 0.9), np.full(DRAWS, 0.5))
    return (served, at_hat), naive, None, int(np.unique(g[pos]).size)


def test_composed_fnr_on_fresh_scenes_is_at_most_alpha(draws):
    """Mean FNR of the composed decision on fresh scenes over 1000 draws <= α + 3 SE, at
    α = 0.1 with 54 scenes with roadwork in each threshold part (shape chosen on the fit
    part among 4, λ by reward among the certified):
    served λ: measured 0.0765 ± 0.0008; certified boundary λ̂: 0.0890 ± 0.0009.
    Not vacuous: at λ̂ the mean is within 0.02 of α (CRC is tight up to the 1/(n_g+1)
    slack), and the naive rule below, on the same draws, exceeds α by ~60 SE."""
    (served, at_hat), _, _, n_units = draws
    assert n_units >= 40
    for fnr in (served, at_hat):
        mean, se = mean_se(fnr)
        assert mean <= ALPHA + 3 * se, (mean, se)
    assert mean_se(at_hat)[0] > ALPHA - 0.02
    assert np.all(served <= at_hat + 1e-12)  # λ >= λ̂: pointwise fewer misses


def test_certifying_stage1_alone_breaks_the_composed_guarantee(draws):
    """Power: CRC on stage 1's misses only, stage 2 deciding the routed images at 0.5,
    exceeds α by more than 3 SE on the same data (measured 0.1534 ± 0.0006): stage 2's
    misses are outside that certificate. So the test above would catch a cascade that
    certified one stage only."""
    _, naive, _, _ = draws
    mean, se = mean_se(naive)
    assert mean > ALPHA + 3 * se, (mean, se)


def test_effective_score_is_the_composed_miss():
    """miss(t₂) = 1{e <= t₂} for every image, shape and t₂ (the reduction CRC runs on),
    and the miss set is nested: it never grows as λ = 1 - t₂ grows."""
    rng = np.random.default_rng(3)
    p1, p2 = rng.uniform(size=2000), rng.uniform(size=2000)
    p1[:50], p2[50:100] = 0.0, 1.0  # edges
    t2 = np.linspace(-0.01, 1.0, 203)
    for rho in (0.05, 0.5, 1.0):
        for b0 in (0.0, 0.5, 0.9, 1.0):
            a = rho * t2
            miss = missed(p1[None], p2[None], a[:, None], np.maximum(a, b0)[:, None], t2[:, None])
            e = effective_score(p1, p2, rho, b0)
            np.testing.assert_array_equal(miss, e[None] <= t2[:, None])
            assert np.all(miss[:-1] <= miss[1:])  # t₂ ascending = λ descending: more misses


# ----------------------------------------------------------- served probability
@pytest.fixture(scope="module")
def fitted():
    rng = np.random.default_rng(7)
    p1, p2, y, g = scenes(rng, 300, 300, 4)
    cfg = CascadeConfig(alpha=0.05, latency_stage1_s=LAT1, latency_stage2_s=LAT2,
                        latency_budget_s=0.08, positive_prior=None, alphas=(0.02, 0.05, 0.2))
    return CascadePolicy(cfg).fit(p1, p2, y, g), (p1, p2, y, g)


def test_served_probability_binarises_to_the_decision(fitted):
    pol, (p1, p2, _, _) = fitted
    decision, served, stage = pol.predict(p1, p2)
    assert np.array_equal(np.round(served).astype(np.int8), decision)
    assert not np.any(served == 0.5) and np.all((served >= 0) & (served <= 1))
    assert set(np.unique(stage)) == {1, 2} and set(np.unique(decision)) == {0, 1}
    # stage 2 runs on the routed images only; the callable form gives the same answer
    seen = []

    def stage2(idx):
        seen.append(idx)
        return p2[idx]

    d2, s2, st2 = pol.predict(p1, stage2)
    assert np.array_equal(d2, decision) and np.array_equal(s2, served) and np.array_equal(st2, stage)
    np.testing.assert_array_equal(seen[0], np.flatnonzero(stage == 2))
    p2_nan = np.where(stage == 2, p2, np.nan)  # unrouted stage-2 values are never read
    assert np.array_equal(pol.predict(p1, p2_nan)[0], decision)
    # thresholds on both sides of each cut, exactly at them included
    t = np.array([pol.t_exit_neg_, np.nextafter(pol.t_exit_neg_, 1), pol.t_exit_pos_,
                  np.nextafter(pol.t_exit_pos_, 1), 0.0, 1.0])
    for q in (0.0, pol.t2_, np.nextafter(pol.t2_, 1), 1.0):
        d, s, _ = pol.predict(t, np.full(t.size, q))
        assert np.array_equal(np.round(s).astype(np.int8), d) and not np.any(s == 0.5)


def test_round_trip_through_the_schema(fitted):
    pol, (p1, p2, _, _) = fitted
    params = CascadePolicyParams.model_validate_json(pol.params_.model_dump_json())
    assert params == pol.params_ and params.kind == "cascade" and params.schema_version == 2
    again = CascadePolicy.from_params(params)
    for a, b in zip(again.predict(p1, p2), pol.predict(p1, p2), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValidationError, match="must be >= t_exit_neg"):
        CascadePolicyParams.model_validate(params.model_dump() | {"t_exit_pos": params.t_exit_neg - 0.1})
    st = params.guarantee_statement
    assert "composed decision" in st and "share of a new scene's roadwork images missed" in st
    assert f"alpha = {params.alpha:g}" in st and "Assumes" in st


# ----------------------------------------------------------- cost and reward
def test_choice_respects_the_budget_and_maximises_reward_among_certified(fitted):
    pol, (p1, p2, y, g) = fitted
    pr = pol.params_
    assert pr.latency_budget_met and pr.expected_latency_s <= pr.latency_budget_s
    assert pr.expected_latency_s == pytest.approx(LAT1 + pr.routing_rate * LAT2)
    assert pr.crc_bound <= pr.alpha and pr.lam >= pr.lambda_certified
    ok = [f for f in pr.frontier if f.certified and f.latency_s <= pr.latency_budget_s]
    assert ok and pr.estimated_reward >= max(f.reward for f in ok) - 1e-12
    assert any(f.certified and f.latency_s > pr.latency_budget_s for f in pr.frontier) or \
        any(not f.certified and f.reward > pr.estimated_reward for f in pr.frontier)  # the choice binds
    for f in pr.frontier:
        assert f.certified == (f.crc_bound <= pr.alpha + 1e-12)
    # the reward, recomputed from predict() on the threshold part with sklearn's MCC
    _, idx_thr = split_calibration_set(range(y.size), y, 0.5, groups=list(g))
    d, _, stage = pol.predict(p1[idx_thr], p2[idx_thr])
    yt = y[idx_thr]
    acc = float(np.mean(d == yt))
    assert pr.estimated_reward == pytest.approx((0.5 * max(mcc(yt, d), 0.0) + 0.5 * acc) ** 3)
    assert pr.routing_rate == pytest.approx(np.mean(stage == 2))
    assert pr.threshold_fnr == pytest.approx(np.mean(d[yt == 1] == 0))
    # the α frontier: looser α never lowers the reward of the best certified choice here
    rows = [r for r in pr.alpha_frontier if r.feasible]
    assert [r.alpha for r in pr.alpha_frontier] == [0.02, 0.05, 0.2] and len(rows) == 3
    assert all(r.crc_bound <= r.alpha for r in rows)
    assert rows[-1].reward >= rows[0].reward


def test_tight_budget_gives_less_routing():
    rng = np.random.default_rng(8)
    p1, p2, y, g = scenes(rng, 200, 200, 4)
    base = dict(alpha=0.05, latency_stage1_s=LAT1, latency_stage2_s=LAT2, alphas=())
    loose = CascadePolicy(CascadeConfig(**base, latency_budget_s=1.0)).fit(p1, p2, y, g).params_
    tight = CascadePolicy(CascadeConfig(**base, latency_budget_s=LAT1 + 0.1 * LAT2)).fit(p1, p2, y, g).params_
    assert tight.routing_rate < loose.routing_rate
    assert tight.expected_latency_s <= tight.latency_budget_s or not tight.latency_budget_met
    stage1_only = CascadeConfig(**base, latency_budget_s=LAT1)  # no room for stage 2
    solo = CascadePolicy(stage1_only).fit(p1, p2, y, g).params_
    assert solo.routing_rate == 0.0 and solo.latency_budget_met and solo.exit_pos_floor == 0.0


def test_validator_reward_matches_the_formula():
    y = np.array([1, 1, 1, 0, 0, 0, 0, 0])
    neg = np.array([[False, False, True, True, True, True, False, True]])
    r, m, acc = validator_reward(y, neg, None)
    pred = (~neg[0]).astype(int)
    assert acc[0] == pytest.approx(np.mean(pred == y)) and m[0] == pytest.approx(mcc(y, pred))
    assert r[0] == pytest.approx((0.5 * m[0] + 0.5 * acc[0]) ** 3)
    _, _, acc_bal = validator_reward(y, neg, 0.5)  # 50/50 mix: accuracy = balanced accuracy
    assert acc_bal[0] == pytest.approx(0.5 * (2 / 3) + 0.5 * (4 / 5))
    everything_neg = validator_reward(y, np.ones((1, 8), bool), 0.5)
    assert everything_neg[1][0] == 0.0 and everything_neg[0][0] == pytest.approx((0.5 * 0.5) ** 3)


# ------------------------------------------------------------------ bad input
def test_bad_input_names_the_item_and_the_fix():
    rng = np.random.default_rng(9)
    p1, p2, y, g = scenes(rng, 60, 60, 2)
    cfg = CascadeConfig(alpha=0.1, latency_stage1_s=LAT1, latency_stage2_s=LAT2, alphas=())
    with pytest.raises(BadInputError, match=r"p2 \(stage-2 probabilities\) has 239 values for 240 images"):
        CascadePolicy(cfg).fit(p1, p2[:-1], y, g)
    with pytest.raises(BadInputError, match=r"groups has 239 keys for 240 images.*one group key per image"):
        CascadePolicy(cfg).fit(p1, p2, y, g[:-1])
    with pytest.raises(BadInputError, match=r"labels must have shape \(240,\)"):
        CascadePolicy(cfg).fit(p1, p2, y[:-1], g)
    bad = p1.copy()
    bad[5] = 1.2
    with pytest.raises(BadInputError, match=r"p1 .* outside \[0, 1\].*index 5: 1.2.*calibrated probabilities"):
        CascadePolicy(cfg).fit(bad, p2, y, g)
    with pytest.raises(BadInputError, match=r"p2 .* outside \[0, 1\].*apply the calibrator or sigmoid"):
        CascadePolicy(cfg).fit(p1, p2 * 3 - 1, y, g)
    y_none = np.zeros_like(y)
    with pytest.raises(InsufficientDataError, match="threshold part has 0 roadwork images.*Add images"):
        CascadePolicy(cfg).fit(p1, p2, y_none, g)
    few = CascadeConfig(alpha=0.01, latency_stage1_s=LAT1, latency_stage2_s=LAT2, alphas=())
    with pytest.raises(InsufficientDataError, match="groups with roadwork; α=0.01 needs at least 99"):
        CascadePolicy(few).fit(p1, p2, y, g)
    with pytest.raises(BadInputError, match="not fitted"):
        CascadePolicy(cfg).predict(p1, p2)
    pol = CascadePolicy(cfg).fit(p1, p2, y, g)
    with pytest.raises(BadInputError, match=r"p2 has 10 values for 240 images.*callable"):
        pol.predict(p1, p2[:10])
    with pytest.raises(BadInputError, match="routed images"):
        pol.predict(p1, lambda idx: np.full(idx.size, 2.0))
    with pytest.raises(ValidationError, match="exceeds latency_budget_s"):
        CascadeConfig(latency_stage1_s=2.0, latency_stage2_s=1.0, latency_budget_s=1.0)
