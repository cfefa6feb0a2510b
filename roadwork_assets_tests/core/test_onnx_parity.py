"""ONNX parity is judged on what is served — the policy's remapped probability and its
decision — with a tolerance that scales with the model's own fp32 sensitivity."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from roadwork_assets.core.calibration.policies import apply_policy, fit_policy
from roadwork_assets.core.export.onnx_export import (
    export_onnx,
    fp32_logit_tolerance,
    judge_served,
    onnx_parity,
    probe_images,
)
from roadwork_assets.core.models.classifier import build_classifier

TINY_VIT = "test_vit.r160_in1k"


@pytest.fixture(scope="module")
def policy():
    rng = np.random.default_rng(0)
    n = 600
    y = rng.integers(0, 2, n)
    z = np.stack([np.zeros(n), 3 * (2 * y - 1) + rng.normal(size=n)], 1)
    # Platt: smooth, so any logit gap shows in the served probability (an isotonic
    # calibrator is flat between its steps and would hide small gaps, rightly)
    return fit_policy("softmax", np.repeat(z[:, None, :], 2, axis=1), y,
                      [f"i{i}" for i in range(n)], alpha=0.1, mode="three_way",
                      calibrator_methods=("platt",))


def _views(margins: np.ndarray) -> np.ndarray:
    """[N] logit margins -> [N, 2 views, 2] logits."""
    z = np.stack([np.zeros_like(margins), margins], axis=-1)
    return np.repeat(z[:, None, :], 2, axis=1)


def _boundary_margin(policy) -> float:
    """The logit margin where the decision leaves 'negative' (bisection on the policy)."""
    lo, hi = -10.0, 10.0
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if apply_policy(policy, _views(np.array([mid])))[0][0] == 0 else (lo, mid)
    return hi


def test_gap_within_tolerance_passes_beyond_it_fails(policy):
    margins = np.array([-4.0, -2.2, 2.4, 4.0, -3.1, 3.3])
    zt = _views(margins)
    tol = np.full_like(zt, 1e-3)
    noise = np.random.default_rng(1).uniform(-0.5e-3, 0.5e-3, zt.shape)
    ok = judge_served(policy, zt, zt + noise, tol)
    assert ok.passed and ok.near_boundary == () and ok.decision_disagreements == 0
    assert 0 < ok.prob_gap <= ok.prob_tolerance
    bad_z = zt.copy()
    bad_z[2, :, 1] += 3e-3  # 3x the tolerance on one image, far from any threshold
    bad = judge_served(policy, zt, bad_z, tol)
    assert not bad.passed and bad.worst_image == 2
    # the served gap is 1.5x what is allowed: +3e-3 on z1 vs an allowed 1e-3 on each logit
    assert bad.prob_gap == pytest.approx(1.5 * bad.prob_tolerance, rel=1e-2)
    assert f"served probability gap {bad.prob_gap:.2e} vs tolerance {bad.prob_tolerance:.2e}" \
        in bad.summary()
    nan = judge_served(policy, zt, np.full_like(zt, np.nan), tol)
    assert not nan.passed and "NaN" in nan.summary()


def test_decision_flip_at_a_boundary_is_reported_not_failed(policy):
    edge = _boundary_margin(policy)
    zt = _views(np.array([edge - 2.5e-4, -3.0, 3.0]))
    zo = _views(np.array([edge + 2.5e-4, -3.0, 3.0]))
    tol = np.full_like(zt, 1e-3)
    d_t, _ = apply_policy(policy, zt)
    d_o, _ = apply_policy(policy, zo)
    assert d_t[0] == 0 and d_o[0] != 0  # the decision really flips
    report = judge_served(policy, zt, zo, tol)
    assert report.passed, report.summary()
    assert report.near_boundary == (0,) and report.decision_disagreements == 0
    # the same flip from far away is a failure
    far = judge_served(policy, _views(np.array([edge - 1.0, -3.0, 3.0])),
                       _views(np.array([edge + 1.0, -3.0, 3.0])), tol)
    assert not far.passed and far.decision_disagreements == 1


@pytest.fixture(scope="module")
def probed_vit():
    """A tiny random ViT with a linear-probe head fitted the way fit_linear_probe does."""
    torch.manual_seed(0)
    model = build_classifier(TINY_VIT, img_size=32).eval()
    with torch.no_grad():
        feats = model.features(torch.from_numpy(probe_images(32, 32, seed=5)))
        model.feat_mean.copy_(feats.mean(0))
        model.feat_std.copy_(feats.std(0) + 1e-6)
        w = torch.randn(model.num_features) * 0.3
        model.head.weight.copy_(torch.stack([-w / 2, w / 2]))
        model.head.bias.zero_()
    return model


def test_tolerance_scales_with_the_heads_amplification(probed_vit):
    x = torch.from_numpy(probe_images(4, 32))
    with torch.no_grad():
        feats = probed_vit.features(x)
        base = fp32_logit_tolerance(probed_vit, feats, probed_vit.forward_head(feats))
        sharp = copy.deepcopy(probed_vit)
        sharp.feat_std.mul_(1e-3)  # features standardised by a 1000x smaller spread
        amplified = fp32_logit_tolerance(sharp, feats, sharp.forward_head(feats))
    np.testing.assert_allclose(amplified / base, 1e3, rtol=0.05)
    # u * sqrt(K) * D * ||W/sigma|| * rms(f): width 64, 25 weighted layers in test_vit
    assert 1e-7 < base.max() < 1e-3


def test_exported_vit_passes_and_a_wrong_export_fails(tmp_path, probed_vit, policy):
    good = tmp_path / "good.onnx"
    export_onnx(probed_vit, 32, good)
    report = onnx_parity(probed_vit, good, 32, policy, n_views=2)
    assert report.passed, report.summary()
    assert report.n_images == 8 and report.opt_level == "ORT_ENABLE_BASIC"
    assert report.max_logit_gap <= report.max_logit_tolerance
    # an export whose logits are off by 1e-3 (the old fixed tolerance) is caught: this
    # model's fp32 tolerance is far smaller
    wrong_model = copy.deepcopy(probed_vit)
    with torch.no_grad():
        wrong_model.head.bias.add_(torch.tensor([0.0, 1e-3]))
    wrong = tmp_path / "wrong.onnx"
    export_onnx(wrong_model, 32, wrong)
    failed = onnx_parity(probed_vit, wrong, 32, policy, n_views=2)
    assert not failed.passed
    assert failed.prob_gap > failed.prob_tolerance
