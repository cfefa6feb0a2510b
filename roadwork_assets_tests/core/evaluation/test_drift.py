"""Drift statistics (core.evaluation.drift), tested as statistics: the false-alarm rate
on seeded no-drift draws, the power against known shifts, and PSI against its formula.

Power (200 seeded draws, 120 reference vs 60 incoming images, 32-d embeddings, default
DriftConfig: alpha 0.01, PSI threshold 0.2, 10 bins, 5 components), measured when written:
no drift -> flagged in 0.5%; scores shifted by 1.5 logit (1 reference sd) -> 100%;
embeddings shifted by 0.35 per dimension (0.35 sd of the isotropic part) -> 99.5%;
smaller shifts are missed often: 0.5 logit -> 9.5%, 0.25 per dimension -> 59%.
"""

import numpy as np
import pytest

from roadwork_assets.contracts.errors import BadInputError, InsufficientDataError
from roadwork_assets.core.evaluation.drift import (
    DriftConfig,
    DriftDetector,
    psi,
    psi_noise_floor,
    quantile_edges,
)

N_DRAWS = 200


def _draw(rng, n, score_shift=0.0, embedding_shift=0.0):
    scores = 1 / (1 + np.exp(-(rng.normal(0, 1.5, n) + score_shift)))
    emb = rng.normal(0, 1, (n, 32))
    emb[:, :3] *= 3  # a few dominant directions, as real features have
    return scores, emb + embedding_shift


def _rates(score_shift=0.0, embedding_shift=0.0, config=None):
    flags = []
    for seed in range(N_DRAWS):
        rng = np.random.default_rng(seed)
        det = DriftDetector(config).fit(*_draw(rng, 120))
        report = det.compare(*_draw(rng, 60, score_shift, embedding_shift))
        flags.append((report.drifted, report.score.psi_drift, report.score.ks_drift,
                      report.embedding.psi_drift, report.embedding.ks_drift))
    return np.mean(flags, axis=0)


def test_no_drift_is_flagged_at_most_at_alpha_and_psi_stays_below_its_limit():
    rates = _rates()
    # alpha = 0.01 for the whole verdict; 200 draws: allow binomial noise up to 3%
    assert rates[0] <= 0.03, rates
    # the brief's bar: PSI below its limit in >= 95% of no-drift draws, score and embedding
    assert rates[1] <= 0.05 and rates[3] <= 0.05, rates


def test_known_shifts_are_detected():
    score = _rates(score_shift=1.5)
    assert score[0] >= 0.95 and score[2] >= 0.95, score  # measured 1.00
    embedding = _rates(embedding_shift=0.35)
    assert embedding[0] >= 0.95, embedding  # measured 0.995
    assert embedding[1] <= 0.05, "an embedding-only shift must not move the score test"


def test_psi_matches_its_formula_and_the_noise_floor_shrinks_with_n():
    ref = np.arange(100, dtype=float)  # deciles: 10 values per bin
    inc = np.concatenate([np.full(30, 5.0), np.full(10, 95.0)])  # 30 in bin 0, 10 in bin 9
    edges = quantile_edges(ref, 10)
    assert len(edges) == 9
    r = (np.full(10, 10) + 0.5) / (100 + 5)
    c = (np.array([30, 0, 0, 0, 0, 0, 0, 0, 0, 10]) + 0.5) / (40 + 5)
    assert psi(ref, inc, edges) == pytest.approx(np.sum((c - r) * np.log(c / r)))
    assert psi(ref, ref, edges) == pytest.approx(0.0, abs=1e-12)
    # chi2_{0.99}(9) = 21.67: floor = 21.67 * (1/120 + 1/60)
    assert psi_noise_floor(10, 120, 60, 0.01) == pytest.approx(21.666 * 0.025, rel=1e-3)
    assert psi_noise_floor(10, 10_000, 10_000, 0.01) < 0.005


def test_a_small_batch_gets_the_noise_floor_not_the_rule_of_thumb():
    rng = np.random.default_rng(0)
    report = DriftDetector().fit(*_draw(rng, 120)).compare(*_draw(rng, 30))
    assert report.score.psi_limit > 0.2  # the floor on 30 images is above 0.2
    big = DriftDetector().fit(*_draw(rng, 5000)).compare(*_draw(rng, 5000))
    assert big.score.psi_limit == 0.2


def test_bad_inputs_are_refused_naming_the_problem():
    rng = np.random.default_rng(0)
    det = DriftDetector(DriftConfig(min_images=20)).fit(*_draw(rng, 50))
    scores, emb = _draw(rng, 40)
    scores[3] = np.nan
    with pytest.raises(BadInputError, match=r"incoming scores has 1 row\(s\) with NaN/inf \(first: row 3\)"):
        det.compare(scores, emb)
    with pytest.raises(BadInputError, match="incoming embeddings have 8 dimensions, the reference 32"):
        det.compare(np.zeros(30), emb[:30, :8])
    with pytest.raises(InsufficientDataError, match="10 incoming images, fewer than min_images = 20"):
        det.compare(*_draw(rng, 10))
    with pytest.raises(InsufficientDataError, match=r"reference \(val_test\) has 5 images"):
        DriftDetector().fit(*_draw(rng, 5))
    with pytest.raises(BadInputError, match="40 incoming scores but 39 incoming embeddings"):
        det.compare(_draw(rng, 40)[0], _draw(rng, 39)[1])
