"""Closed-form data shared by the calibration tests.

x ~ U(-3, 3), y ~ Bernoulli(σ(2x)), score = σ(2x) (perfectly calibrated). Given
y = 1 the density of x is ∝ σ(2x), whose integral is softplus(2x)/2, so

    F₊(x) = P(X <= x | y = 1) = (softplus(2x) - softplus(-6)) / 6,

and the true FNR of "negative iff score <= t" is F₊(clip(logit(t) / 2, -3, 3)).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from scipy.special import expit, logit

# Violation-rate tests: exact one-sided binomial test of H0 "rate <= δ" at this level,
# with enough draws to detect a true rate of 1.5·δ with probability >= MIN_POWER.
FALSE_ALARM, MIN_POWER, EFFECT = 1e-3, 0.9, 1.5


def softplus(x):
    return np.logaddexp(0.0, x)


def true_fnr(t):
    """Population FNR of 'negative iff σ(2x) <= t' under the closed-form model."""
    t = np.asarray(t, dtype=np.float64)
    with np.errstate(divide="ignore"):
        x = np.clip(logit(np.clip(t, 0.0, 1.0)) / 2.0, -3.0, 3.0)
    return (softplus(2 * x) - softplus(-6.0)) / 6.0


def true_positive_exit_fdr(t):
    """Population P(y = 0 | σ(2x) > t) under the closed-form model."""
    x = np.clip(logit(np.clip(t, 1e-300, 1 - 1e-16)) / 2.0, -3.0, 3.0)
    return 0.5 * (softplus(-2 * x) - softplus(-6.0)) / (3.0 - x)


def draw(rng, n):
    """(x, y, score) with y ~ Bernoulli(σ(2x)); vectorised over any leading shape."""
    x = rng.uniform(-3.0, 3.0, n)
    y = (rng.uniform(size=n) < expit(2 * x)).astype(np.int64)
    return x, y, expit(2 * x)


@pytest.fixture
def rng():
    return np.random.default_rng(20240607)


@pytest.fixture
def miscalibrated(rng):
    """Two-class logits that are over-confident and shifted, plus labels."""
    x, y, _ = draw(rng, 4000)
    z = 3.0 * x + 0.7 + rng.normal(0.0, 1.0, x.size)
    logits = np.stack([-0.4 * z, 0.6 * z], axis=1)  # z1 - z0 = z, z1 and z0 scaled unequally
    return logits, y


def violation_test_power(n_draws: int, delta: float, level: float = FALSE_ALARM,
                         effect: float = EFFECT) -> float:
    """P(the level-`level` one-sided binomial test rejects | true rate = effect·δ).

    The test rejects iff violations >= c, c the smallest count with P(Bin(n, δ) >= c)
    <= level; power = P(Bin(n, effect·δ) >= c)."""
    c = int(stats.binom.isf(level, n_draws, delta)) + 1
    while c > 0 and stats.binom.sf(c - 2, n_draws, delta) <= level:  # guard the float edge
        c -= 1
    return float(stats.binom.sf(c - 1, n_draws, effect * delta))


def violation_rate_ok(violations: int, n_draws: int, delta: float, level: float = FALSE_ALARM) -> bool:
    """False iff the exact one-sided binomial test rejects 'violation rate <= δ' at `level`."""
    return stats.binomtest(violations, n_draws, delta, alternative="greater").pvalue > level
