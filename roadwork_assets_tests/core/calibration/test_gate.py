"""Failure gate: features, fit/apply round trip, and when it beats max-prob."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.special import expit

from roadwork_assets.contracts.errors import ArtifactIntegrityError, InsufficientDataError
from roadwork_assets.core.calibration.gate import (
    GATE_FEATURES,
    FailureGate,
    fit_failure_gate,
    gate_features,
)
from roadwork_assets.core.calibration.metrics import decision_confidence


def _multi_view(rng, n, n_views=4, corrupt=0.3):
    """Main view is confidently wrong-ish on a corrupted subset; the other views are not."""
    x = rng.uniform(-3, 3, n)
    y = (rng.uniform(size=n) < expit(2 * x)).astype(np.int64)
    z = 2 * x[:, None] + rng.normal(0, 0.5, (n, n_views))
    bad = rng.uniform(size=n) < corrupt
    z[bad, 0] = rng.normal(0, 4, bad.sum())  # e.g. the crop cut the cone out
    return np.stack([np.zeros_like(z), z], axis=-1), y


def test_features_shape_and_single_view_degeneracy(rng):
    logits, _ = _multi_view(rng, 100, n_views=1)
    p = expit(logits[:, 0, 1])
    f = gate_features(logits, p, 0.3)
    assert f.shape == (100, len(GATE_FEATURES))
    col = dict(zip(GATE_FEATURES, f.T))
    assert np.all(col["view_pos_std"] == 0) and np.all(col["view_disagreement"] == 0)
    np.testing.assert_allclose(col["max_prob"], np.maximum(p, 1 - p))


def test_gate_beats_max_prob_when_views_disagree_informatively(rng):
    logits, y = _multi_view(rng, 6000)
    p = expit(logits[:, 0, 1] - logits[:, 0, 0])
    t_lo = 0.2
    dec = (p > t_lo).astype(int)
    wrong = dec != y
    feats = gate_features(logits, p, t_lo)
    a, b = slice(0, 3000), slice(3000, None)
    fit = fit_failure_gate(feats[a], wrong[a], feats[b], wrong[b], decision_confidence(p[b], dec[b]),
                           gate_risk=0.05)
    assert fit.beats_baseline and fit.aurc_gate < 0.8 * fit.aurc_baseline
    assert fit.risk_met and fit.selective_risk <= 0.05 and fit.accept_rate > 0.2
    assert fit.selective_risk <= fit.selective_risk_upper


def test_gate_params_round_trip_and_feature_check(rng):
    logits, y = _multi_view(rng, 2000)
    p = expit(logits[:, 0, 1])
    feats = gate_features(logits, p, 0.2)
    gate = FailureGate().fit(feats, (p > 0.2) != y)
    rebuilt = FailureGate.from_params(json.loads(json.dumps(gate.to_params())))
    np.testing.assert_array_equal(rebuilt.predict_proba(feats), gate.predict_proba(feats))
    bad = gate.to_params() | {"feature_names": ["max_prob"]}
    with pytest.raises(ArtifactIntegrityError, match="Re-fit"):
        FailureGate.from_params(bad)


def test_gate_with_no_wrong_decisions_accepts_everything(rng):
    """A near-perfect stage 1 (0 wrong of 50 on the fit part) is a success: the gate is
    constant, P(wrong) = 1/(n+2) = 1/52, tau = 1, and every image is accepted; the
    held-out error rate (2 of 40 here) is still measured and reported."""
    feats = rng.normal(size=(50, len(GATE_FEATURES)))
    gate = FailureGate().fit(feats, np.zeros(50, dtype=bool))
    assert gate.constant_ and not np.any(gate.coef_)
    np.testing.assert_allclose(gate.predict_proba(feats), 1 / 52)
    rebuilt = FailureGate.from_params(json.loads(json.dumps(gate.to_params())))
    assert rebuilt.constant_
    wrong_eval = np.zeros(40, dtype=bool)
    wrong_eval[:2] = True
    fit = fit_failure_gate(feats, np.zeros(50, dtype=bool), feats[:40], wrong_eval,
                           rng.uniform(size=40), gate_risk=0.1)
    assert fit.accepts_all and fit.tau == 1.0 and fit.accept_rate == 1.0
    assert np.all(rebuilt.predict_proba(feats) <= fit.tau)
    assert fit.selective_risk == pytest.approx(2 / 40) and fit.risk_met
    assert fit.selective_risk < fit.selective_risk_upper < 1.0


def test_gate_refuses_when_every_decision_is_wrong(rng):
    feats = rng.normal(size=(50, len(GATE_FEATURES)))
    with pytest.raises(InsufficientDataError, match="50 wrong of 50"):
        FailureGate().fit(feats, np.ones(50, dtype=bool))
