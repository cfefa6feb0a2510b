"""Uncertainty signals: evidential loss and u, MC-dropout variance, error-detection AUROC."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from roadwork_assets.core.calibration.uncertainty import (
    error_detection_auroc,
    select_signals,
    uncertainty_signals,
)
from roadwork_assets.core.models.classifier import RoadworkClassifier
from roadwork_assets.core.training.recipe import evidential_loss, evidential_uncertainty
from roadwork_assets.core.training.trainer import mc_dropout_variance


def _log_alpha(*alpha):
    return torch.log(torch.tensor([alpha], dtype=torch.float32))


def test_evidential_loss_hand_computed():
    y = torch.tensor([[0.0, 1.0]])
    # alpha = (1, 3): S = 4, p = (.25, .75); MSE = .0625 + .0625 + 2 * (.1875 / 5) = 0.2;
    # alpha~ = (1, 1): KL = 0 at any epoch
    assert float(evidential_loss(_log_alpha(1, 3), y, epoch=7)) == pytest.approx(0.2, abs=1e-6)
    # alpha = (3, 1), the evidence points the wrong way: MSE = 1.2, alpha~ = (3, 1),
    # KL(Dir(3, 1) || Dir(1, 1)) = ln 6 - ln 2 + 2 (psi(3) - psi(4)) = ln 3 - 2/3
    kl = math.log(3) - 2 / 3
    got = float(evidential_loss(_log_alpha(3, 1), y, epoch=5, anneal_epochs=10))
    assert got == pytest.approx(1.2 + 0.5 * kl, abs=1e-5)
    got = float(evidential_loss(_log_alpha(3, 1), y, epoch=20, anneal_epochs=10))
    assert got == pytest.approx(1.2 + kl, abs=1e-5)  # annealing weight capped at 1
    # log loss: log S - log alpha_y = log 4 - log 1
    got = float(evidential_loss(_log_alpha(3, 1), y, epoch=0, kind="log"))
    assert got == pytest.approx(math.log(4), abs=1e-6)


class _Const(nn.Module):
    num_features = 4

    def forward(self, x):
        return x.flatten(1)[:, :4]


def test_evidential_head_u_in_unit_interval_and_softmax_is_dirichlet_mean():
    torch.manual_seed(0)
    model = RoadworkClassifier(_Const(), head_type="evidential").eval()
    feats = torch.randn(256, 4) * 10
    out = model.forward_head(feats).detach()
    u = evidential_uncertainty(out.numpy())
    assert np.all(u > 0) and np.all(u <= 1 + 1e-12) and u.min() < 0.5
    alpha = out.exp()
    assert torch.all(alpha >= 1 - 1e-6)  # evidence >= 0
    assert torch.allclose(torch.softmax(out, 1), alpha / alpha.sum(1, keepdim=True), atol=1e-6)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.fill_(-50.0)  # no evidence at all: u = 1
    assert evidential_uncertainty(model.forward_head(feats).detach().numpy()) == pytest.approx(1.0)


def test_mc_dropout_variance_zero_without_dropout_positive_with():
    images = np.random.default_rng(0).integers(0, 255, (10, 3, 2, 2), dtype=np.uint8)
    for p, positive in ((0.0, False), (0.5, True)):
        torch.manual_seed(0)
        model = RoadworkClassifier(_Const(), head_dropout=p)
        var = mc_dropout_variance(model, images, passes=8, batch_size=4,
                                  device=torch.device("cpu"))
        assert var.shape == (10,)
        assert (var.min() > 0) if positive else np.all(var == 0)
        assert not model.dropout.training  # dropout back off afterwards


def test_error_detection_auroc_toy_and_ties():
    s = np.array([0.1, 0.4, 0.35, 0.8])
    wrong = np.array([0, 0, 1, 1])
    # wrong {0.35, 0.8} above right {0.1, 0.4} in 3 of 4 pairs
    assert error_detection_auroc(s, wrong) == pytest.approx(0.75)
    rng = np.random.default_rng(1)
    s, w = rng.normal(size=300).round(1), rng.random(300) < 0.2
    assert error_detection_auroc(s, w) == pytest.approx(roc_auc_score(w, s))
    assert error_detection_auroc(np.ones(5), [0, 1, 0, 1, 0]) == pytest.approx(0.5)
    assert math.isnan(error_detection_auroc(s[:5], np.zeros(5)))


def test_select_signals_keeps_only_informative_ones():
    rng = np.random.default_rng(0)
    n = 600
    z = rng.normal(0, 2, n)
    logits = np.stack([np.zeros(n), z], axis=1)[:, None, :]
    wrong = rng.random(n) < 0.15
    informative = wrong + rng.normal(0, 0.5, n)
    sig = uncertainty_signals(logits, mc_dropout_var=informative)
    sig["noise"] = rng.normal(size=n)
    helps, scores = select_signals(sig, wrong, n_boot=300)
    assert helps == ["mc_dropout_var"]
    by = {s.name: s for s in scores}
    assert by["mc_dropout_var"].gain_low > 0 and by["noise"].gain_low <= 0
    assert "view_disagreement" not in sig  # one view: no disagreement signal
