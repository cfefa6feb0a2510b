"""Policy fitting and application: split, selection, remap, JSON contract, end-to-end FNR."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pytest
from scipy.special import expit, logit

from roadwork_assets.contracts.errors import (
    ArtifactIntegrityError,
    BadInputError,
    InsufficientDataError,
)
from roadwork_assets.contracts.policy_schemas import (
    POLICY_KINDS,
    STAGE1_POLICY_KINDS,
    GatePolicyParams,
    ScrcPolicyParams,
    SoftmaxPolicyParams,
    parse_policy,
    policy_from_json,
    policy_to_json,
)
from roadwork_assets.core.calibration.policies import (
    DEFAULT_CALIBRATOR_METHODS,
    POLICY_FITTERS,
    PolicyFitConfig,
    apply_policy,
    check_calibration_capacity,
    fit_policy,
    policy_probability,
    remap_probability,
    select_calibrator,
    split_calibration_set,
    units_needed,
)

from .conftest import draw, true_fnr

POLICY_CASES = [
    ("softmax", {}),
    ("softmax", {"mode": "three_way"}),
    ("softmax", {"mode": "three_way", "guarantee": "ltt"}),
    ("gate", {}),
    ("scrc", {}),
    ("scrc", {"conformal_method": "lac"}),
]


def _views(rng, n):
    """val_calib-like multi-view logits [N, 3, 2] and labels: y ~ Bernoulli(σ(2x)), an
    over-confident shifted margin, and a main view that is noise on 20% of the images."""
    x = rng.uniform(-3, 3, n)
    y = (rng.uniform(size=n) < expit(2 * x)).astype(np.int64)
    z = 3.0 * x[:, None] + 0.5 + rng.normal(0, 0.8, (n, 3))
    bad = rng.uniform(size=n) < 0.2
    z[bad, 0] = rng.normal(0, 3, bad.sum())
    return np.stack([-0.5 * z, 0.5 * z], axis=-1), y


@pytest.fixture(scope="module")
def calib_data():
    """val_calib-like multi-view logits [N, 3, 2], labels and ids."""
    n = 3000
    logits, y = _views(np.random.default_rng(7), n)
    ids = [f"img_{i:05d}" for i in range(n)]
    return logits, y, ids


@pytest.fixture(scope="module")
def fitted(calib_data):
    logits, y, ids = calib_data
    return {f"{k}{sorted(kw.items())}": fit_policy(k, logits, y, ids, config=PolicyFitConfig(alpha=0.05, **kw))
            for k, kw in POLICY_CASES}


# ----------------------------------------------------------------------- split
def test_split_is_disjoint_stratified_and_order_independent(calib_data):
    _, y, ids = calib_data
    fit, thr = split_calibration_set(ids, y, 0.5)
    assert np.intersect1d(fit, thr).size == 0 and fit.size + thr.size == y.size
    for c in (0, 1):
        n_c = int(np.sum(y == c))
        assert abs(int(np.sum(y[fit] == c)) - n_c / 2) <= 1
    perm = np.random.default_rng(0).permutation(y.size)
    fit_p, _ = split_calibration_set([ids[i] for i in perm], y[perm], 0.5)
    assert sorted(ids[i] for i in fit) == sorted(ids[perm[i]] for i in fit_p)
    fit_s, _ = split_calibration_set(ids, y, 0.5, salt="other")
    assert not np.array_equal(fit, fit_s)
    with pytest.raises(BadInputError, match="repeats"):
        split_calibration_set(ids[:-1] + [ids[0]], y, 0.5)


def test_select_calibrator_picks_lowest_heldout_nll(calib_data):
    logits, y, _ = calib_data
    best, cands = select_calibrator(logits[:1500, 0], y[:1500])
    assert [c["method"] for c in cands] == list(DEFAULT_CALIBRATOR_METHODS)
    assert all(np.isfinite([c["nll"], c["ece"], c["brier"]]).all() for c in cands)
    assert best.method == min(cands, key=lambda c: c["nll"])["method"]
    json.dumps(cands, allow_nan=False)


# ---------------------------------------------------------------------- apply
@pytest.mark.parametrize(("kind", "kw"), POLICY_CASES)
def test_remap_matches_decisions_and_is_monotone(kind, kw, fitted, calib_data):
    logits, _, _ = calib_data
    params = fitted[f"{kind}{sorted(kw.items())}"]
    decision, remapped = apply_policy(params, logits)
    p = policy_probability(params, logits)
    assert decision.dtype == np.int8 and set(np.unique(decision)) <= {-1, 0, 1}
    assert np.all((remapped >= 0) & (remapped <= 1))
    assert np.all(remapped[decision == 1] > 0.5)
    assert np.all(remapped[decision == 0] < 0.5)
    order = np.argsort(p, kind="stable")
    assert np.all(np.diff(remapped[order]) >= 0)  # monotone in the calibrated probability
    if kind == "gate":
        # the remap is the stage-1 answer: below 0.5 exactly when p <= t_lo
        np.testing.assert_array_equal(remapped < 0.5, p <= params.t_lo)
    else:
        # negatives exactly below 0.5; deferrals sit above it, in the band (0.5, 0.75]
        np.testing.assert_array_equal(decision == 0, remapped < 0.5)
        assert np.all((remapped[decision == -1] > 0.5) & (remapped[decision == -1] <= 0.75))
    if kind == "softmax" and kw.get("mode", "two_way") == "two_way":
        assert not np.any(decision == -1)
        np.testing.assert_array_equal(decision == 1, remapped > 0.5)


def test_remap_boundaries_are_exact():
    t = 0.137
    p = np.array([0.0, np.nextafter(t, 0), t, np.nextafter(t, 1), 0.5, 1.0])
    neg = p <= t
    r = remap_probability(p, t, t, neg, ~neg)
    assert list(r < 0.5) == [True, True, True, False, False, False]
    assert list(r > 0.5) == [False, False, False, True, True, True]
    assert np.all(np.diff(r) >= 0) and r[0] == 0.0 and r[-1] == 1.0
    # three-way band: (t_lo, t_hi] -> (0.5, 0.75]
    t_hi = 0.8
    p = np.array([0.1, t, 0.5, t_hi, np.nextafter(t_hi, 1), 1.0])
    neg, pos = p <= t, p > t_hi
    r = remap_probability(p, t, t_hi, neg, pos)
    assert r[1] < 0.5 < r[2] <= 0.75 and r[3] == 0.75 and r[4] > 0.75 and r[5] == 1.0


@pytest.mark.parametrize(("kind", "kw"), POLICY_CASES)
def test_policy_json_round_trip(kind, kw, fitted, calib_data):
    logits, _, _ = calib_data
    params = fitted[f"{kind}{sorted(kw.items())}"]
    text = policy_to_json(params)
    back = policy_from_json(text)
    assert back == params and type(back) is type(params)
    d1, r1 = apply_policy(params, logits)
    d2, r2 = apply_policy(back, logits)
    np.testing.assert_array_equal(d1, d2)
    np.testing.assert_array_equal(r1, r2)
    data = json.loads(text)
    assert data["schema_version"] == 2 and data["kind"] == kind
    assert "deferrals are not misses" in params.guarantee_statement


def test_fitted_policy_kinds_and_fields(fitted):
    soft2 = fitted["softmax[]"]
    soft3 = fitted["softmax[('mode', 'three_way')]"]
    gate = fitted["gate[]"]
    scrc = fitted["scrc[]"]
    assert isinstance(soft2, SoftmaxPolicyParams) and soft2.t_hi == soft2.t_lo
    assert soft3.t_hi > soft3.t_lo and soft3.positive_exit_certified
    assert soft3.threshold_part.defer_rate > 0
    assert isinstance(gate, GatePolicyParams) and gate.gate.beats_baseline
    assert gate.gate.aurc_gate < gate.gate.aurc_baseline
    assert isinstance(scrc, ScrcPolicyParams) and set(scrc.coverage) >= {"coverage_pos", "coverage_neg"}
    for p in fitted.values():
        assert p.n_calib_fit + p.n_calib_threshold == 3000
        assert p.threshold_part.coverage == pytest.approx(1 - p.threshold_part.defer_rate)


def test_unknown_schema_version_kind_or_bad_fields_are_refused(fitted):
    data = json.loads(policy_to_json(fitted["softmax[]"]))
    with pytest.raises(ArtifactIntegrityError, match="schema_version=1"):
        parse_policy(data | {"schema_version": 1})
    with pytest.raises(ArtifactIntegrityError, match="kind='bagging'"):
        parse_policy(data | {"kind": "bagging"})
    # a softmax artifact relabelled as a cascade is refused by the cascade schema
    with pytest.raises(ArtifactIntegrityError, match="kind 'cascade' is invalid"):
        parse_policy(data | {"kind": "cascade"})
    with pytest.raises(ArtifactIntegrityError, match="must be >= t_lo"):
        parse_policy(data | {"t_hi": data["t_lo"] - 0.1})
    with pytest.raises(ArtifactIntegrityError, match="invalid"):
        parse_policy(data | {"unexpected": 1})
    with pytest.raises(ArtifactIntegrityError, match="not valid JSON"):
        policy_from_json("{")


def test_too_few_positives_through_fit_policy(calib_data):
    logits, y, ids = calib_data
    keep = np.flatnonzero(y == 0)[:400].tolist() + np.flatnonzero(y == 1)[:60].tolist()
    msg = r"val_calib threshold part has 30 positives; α=0\.02 needs at least 49"
    with pytest.raises(InsufficientDataError, match=msg):
        fit_policy("softmax", logits[keep], y[keep], [ids[i] for i in keep], alpha=0.02)


# (draws, n_calib, n_test): the gate fits a logistic regression per draw (~0.5 s)
OUT_OF_SAMPLE = {"gate": (5, 3000, 20000)}


@pytest.mark.parametrize(("kind", "kw"), POLICY_CASES)
def test_served_fnr_out_of_sample(kind, kw):
    """Every kind, fitted on fresh val_calib draws and served on fresh test images from the
    same generator: mean served FNR (roadwork decided 'negative') <= α + 3 SE.

    CRC promises E[FNR] <= α and LTT P(FNR <= α) >= 1 - δ (hence also a mean near or
    below α); the gate and set-valued kinds only turn decisions into deferrals, so their
    FNR is at most the stage-1 one. Measured mean ± SE at α = 0.05: softmax two-way
    0.0503 ± 0.0018, three-way 0.0495 ± 0.0017, three-way LTT 0.0365 ± 0.0015, gate
    0.0181 ± 0.0009 (5 draws), scrc 0.0478 ± 0.0015, LAC 0.0474 ± 0.0016. With SE ≈ 0.0017
    a rule serving FNR α + 0.01 (≈ 6 SE above α) fails with probability > 0.99.
    For scrc also the Mondrian positive-class coverage out of sample is >= 1 - α_c - 3 SE.
    """
    alpha = 0.05
    rng = np.random.default_rng(zlib.crc32(f"{kind}{sorted(kw.items())}".encode()))
    draws, n_cal, n_test = OUT_OF_SAMPLE.get(kind, (30, 3000, 20000))
    fnr, cov_pos = [], []
    for r in range(draws):
        logits, y = _views(rng, n_cal)
        params = fit_policy(kind, logits, y, [f"{r}-{i}" for i in range(n_cal)],
                            config=PolicyFitConfig(alpha=alpha, **kw))
        test_logits, y_test = _views(rng, n_test)
        decision, _ = apply_policy(params, test_logits)
        fnr.append(np.mean(decision[y_test == 1] == 0))
        if kind == "scrc" and params.conformal_method == "mondrian":
            p = policy_probability(params, test_logits)
            cov_pos.append(np.mean(1.0 - p[y_test == 1] <= params.q1))
    fnr = np.asarray(fnr)
    se = fnr.std(ddof=1) / np.sqrt(draws)
    assert fnr.mean() <= alpha + 3 * se, (fnr.mean(), se)
    assert fnr.mean() > alpha / 5  # not vacuous (never deciding 'negative' would pass)
    if cov_pos:
        cov_pos = np.asarray(cov_pos)
        se_c = cov_pos.std(ddof=1) / np.sqrt(cov_pos.size)
        assert cov_pos.mean() >= 1 - params.conformal_alpha - 3 * se_c


def test_end_to_end_crc_policy_keeps_expected_fnr(rng):
    """Split + temperature fit + CRC, repeated on fresh draws: E[FNR] <= α.

    Logits are the margin 2x (two-class: [0, 2x]); the fitted calibrator is
    σ(2x / T), so 'p <= t_lo' is 'x <= T·logit(t_lo)/2' and the FNR is closed form.
    """
    alpha, reps, n = 0.1, 200, 600
    fnrs, n_pos = [], []
    for r in range(reps):
        x, y, _ = draw(rng, n)
        logits = np.stack([np.zeros(n), 2 * x], axis=1)[:, None, :]
        params = fit_policy("softmax", logits, y, [f"{r}-{i}" for i in range(n)], alpha=alpha,
                            calibrator_methods=("temperature",))
        temp = params.calibrator.params["temperature"]
        x_star = temp * logit(params.t_lo) / 2
        fnrs.append(true_fnr(expit(2 * x_star)))
        n_pos.append(params.n_pos_threshold)
    fnrs = np.asarray(fnrs)
    se = fnrs.std(ddof=1) / np.sqrt(reps)
    assert alpha - 2 / (min(n_pos) + 1) - 3 * se <= fnrs.mean() <= alpha + 3 * se


def _scene_data(rng, n_scenes, frames, pos_share=0.5):
    """Multi-view logits of scenes with `frames` frames each; a scene is all roadwork or all none."""
    n = n_scenes * frames
    scene_y = (rng.uniform(size=n_scenes) < pos_share).astype(np.int64)
    y = np.repeat(scene_y, frames)
    z = np.repeat(rng.normal(0.0, 1.5, n_scenes), frames) + 2.0 * (2 * y - 1) + rng.normal(0, 0.3, n)
    logits = np.stack([np.zeros((n, 1)), z[:, None]], axis=-1)
    groups = [f"scene{i // frames}" for i in range(n)]
    return logits, y, [f"img{i}" for i in range(n)], groups


def test_fit_policy_with_groups_calibrates_one_unit_per_scene(rng):
    logits, y, ids, groups = _scene_data(rng, 300, 8)
    params = fit_policy("softmax", logits, y, ids, groups=groups, config=PolicyFitConfig(alpha=0.05))
    _, idx_thr = split_calibration_set(ids, y, 0.5, groups=groups)
    scenes_with_roadwork = {groups[i] for i in idx_thr if y[i] == 1}
    assert params.calibration_unit == "group"
    assert params.n_calibration_units == len(scenes_with_roadwork) < params.n_pos_threshold
    assert "share of a new scene's roadwork images missed" in params.guarantee_statement
    assert "scenes are exchangeable" in params.guarantee_statement
    plain = fit_policy("softmax", logits, y, ids, alpha=0.05)
    assert plain.calibration_unit == "image" and plain.n_calibration_units == plain.n_pos_threshold


def test_check_calibration_capacity_counts_scenes_of_the_real_split(rng):
    """200 roadwork images in 20 scenes: the old image-count rule (2 x 19 = 38 at α = 0.05)
    passes, but the group split leaves about 10 scenes with roadwork for the threshold
    part, and CRC at α = 0.05 needs 19 units."""
    _, y, ids, groups = _scene_data(rng, 40, 10, pos_share=0.5)
    # the rule this replaced: ceil(units_needed / (1 - fit_fraction)) positive images
    assert int(y.sum()) >= 2 * units_needed(0.05, "crc", 0.1)
    _, idx_thr = split_calibration_set(ids, y, 0.5, groups=groups)
    have = len({groups[i] for i in idx_thr if y[i] == 1})
    msg = (rf"val_calib has {int(y.sum())} positive images in \d+ groups; its threshold part "
           rf"\(the 1 - fit_fraction = 0.5 share, chosen by group\) has {have} groups with roadwork; "
           r"the exit policy at alpha=0.05 \(crc\) needs at least 19\. Add roadwork images from more scenes")
    with pytest.raises(InsufficientDataError, match=msg):
        check_calibration_capacity(ids, y, groups, alpha=0.05, guarantee="crc", delta=0.1, fit_fraction=0.5)
    # enough at α = 0.2 (needs 4): returns the unit count of the real split
    assert check_calibration_capacity(ids, y, groups, alpha=0.2, guarantee="crc", delta=0.1,
                                      fit_fraction=0.5) == have
    # LTT at α = 0.1, δ = 0.1 needs 22 groups: refused with the LTT count
    with pytest.raises(InsufficientDataError, match=r"alpha=0.1 \(ltt, delta=0.1\) needs at least 22"):
        check_calibration_capacity(ids, y, groups, alpha=0.1, guarantee="ltt", delta=0.1, fit_fraction=0.5)
    # without group keys every image is a unit, and the split is the stratified one
    _, idx_img = split_calibration_set(ids, y, 0.5)
    assert check_calibration_capacity(ids, y, None, alpha=0.05, guarantee="crc", delta=0.1,
                                      fit_fraction=0.5) == int(y[idx_img].sum())


def test_check_calibration_capacity_agrees_with_fit_policy(rng):
    """Where the capacity check passes, fit_policy's risk control has enough units; where
    it refuses, fit_policy refuses too."""
    passed = []
    for n_scenes, alpha in ((120, 0.05), (40, 0.05), (60, 0.1)):
        logits, y, ids, groups = _scene_data(rng, n_scenes, 6)
        try:
            n_units = check_calibration_capacity(ids, y, groups, alpha=alpha, guarantee="crc",
                                                 delta=0.1, fit_fraction=0.5)
        except InsufficientDataError:
            passed.append(False)
            with pytest.raises(InsufficientDataError, match="groups with roadwork"):
                fit_policy("softmax", logits, y, ids, groups=groups, alpha=alpha)
        else:
            passed.append(True)
            params = fit_policy("softmax", logits, y, ids, groups=groups, alpha=alpha)
            assert params.n_calibration_units == n_units
    assert set(passed) == {True, False}  # both branches were exercised


# ----------------------------------------------------------- config and registry
def test_every_policy_kind_has_a_fitter_and_unknown_kinds_are_refused(calib_data):
    logits, y, ids = calib_data
    assert tuple(POLICY_FITTERS) == STAGE1_POLICY_KINDS
    assert set(POLICY_KINDS) == {*STAGE1_POLICY_KINDS, "cascade"}
    with pytest.raises(BadInputError, match="fit_cascade_policy"):
        fit_policy("cascade", logits, y, ids)
    with pytest.raises(BadInputError, match="policy kind"):
        fit_policy("bagging", logits, y, ids)


def test_policy_fit_config_is_frozen_strict_and_keeps_the_defaults():
    c = PolicyFitConfig()
    assert (c.alpha, c.delta, c.guarantee, c.mode, c.positive_fdr, c.gate_risk, c.gate_C,
            c.conformal_alpha, c.conformal_method, c.fwer, c.grid, c.fit_fraction,
            c.holdout_fraction, c.n_bins, c.main_view, c.context) == (
        0.02, 0.1, "crc", "two_way", 0.05, 0.05, 1.0, 0.1, "mondrian", "fixed_sequence", None,
        0.5, 0.3, 15, 0, "val_calib")
    assert c.calibrator_methods == DEFAULT_CALIBRATOR_METHODS
    with pytest.raises(ValueError):
        c.alpha = 0.1  # frozen
    with pytest.raises(ValueError):
        PolicyFitConfig(alpah=0.1)  # extra="forbid"
    with pytest.raises(ValueError):
        PolicyFitConfig(guarantee="pac")
    assert PolicyFitConfig(grid=np.array([0.1, 0.2])).grid == (0.1, 0.2)


def test_settings_one_by_one_equal_the_config_and_override_it(calib_data):
    logits, y, ids = calib_data
    cfg = PolicyFitConfig(alpha=0.05, mode="three_way")
    by_config = fit_policy("softmax", logits, y, ids, config=cfg)
    assert fit_policy("softmax", logits, y, ids, alpha=0.05, mode="three_way") == by_config
    over = fit_policy("softmax", logits, y, ids, config=cfg, mode="two_way")
    assert over.mode == "two_way" and over.alpha == 0.05
    with pytest.raises(BadInputError, match="invalid policy settings"):
        fit_policy("softmax", logits, y, ids, guarantee="pac")


def test_check_calibration_capacity_also_refuses_a_fit_part_without_both_labels():
    """Enough roadwork scenes in the threshold part but the by-group fit part holds a single
    'none' image: refused at split_assignment time, not later at the policy."""
    ids = [f"i{k}" for k in range(400)]
    groups = [f"g{k}" for k in range(400)]
    y = np.ones(400, dtype=int)
    fit, _ = split_calibration_set(ids, y, 0.5, groups=groups)
    y[fit[0]] = 0  # exactly one negative, in the fit part
    with pytest.raises(InsufficientDataError, match=r"fit part .* holds \d+ roadwork and 1 none images"):
        check_calibration_capacity(ids, y, groups, alpha=0.05, guarantee="crc", delta=0.1,
                                   fit_fraction=0.5)
