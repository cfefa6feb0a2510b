"""Each training-recipe switch changes what it claims, in numbers (fast, CPU)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from roadwork_assets.core.models.classifier import RoadworkClassifier
from roadwork_assets.core.training import trainer
from roadwork_assets.core.training.augment import validator_augment_image
from roadwork_assets.core.training.config import TrainerConfig
from roadwork_assets.core.training.recipe import (
    WeightEMA,
    epoch_indices,
    measure_cpu_bf16,
    mix_batch,
    recipe_loss,
    resolve_amp,
    sample_weights,
    soft_targets,
)


def test_focal_gamma0_is_weighted_cross_entropy_and_gamma2_downweights_easy():
    z = torch.tensor([[-3.0, 3.0], [0.2, -0.1], [1.0, 0.5], [-0.3, 2.0]])
    y = torch.tensor([1, 0, 1, 1])
    w = torch.tensor([0.7, 1.9])
    s, n = recipe_loss(z, soft_targets(y), w, gamma=0.0)
    assert float(s / n) == pytest.approx(float(F.cross_entropy(z, y, weight=w)), rel=1e-6)
    # per example: focal term / CE term = (1 - p_y)^gamma; the easy one (p_y ~ 0.998) ~ 6e-6
    p_y = torch.softmax(z, 1)[torch.arange(4), y]
    for i in range(4):
        ce, _ = recipe_loss(z[i : i + 1], soft_targets(y[i : i + 1]), torch.ones(2), 0.0)
        fl, _ = recipe_loss(z[i : i + 1], soft_targets(y[i : i + 1]), torch.ones(2), 2.0)
        assert float(fl / ce) == pytest.approx(float((1 - p_y[i]) ** 2), rel=1e-5)
    assert float((1 - p_y[0]) ** 2) < 1e-5 < float((1 - p_y[2]) ** 2)


def test_label_smoothing_changes_the_target_and_the_loss():
    t = soft_targets(torch.tensor([1, 0]), smoothing=0.1)
    assert torch.allclose(t, torch.tensor([[0.05, 0.95], [0.95, 0.05]]))
    z = torch.tensor([[-2.0, 2.0], [1.0, -1.0]])
    s, n = recipe_loss(z, t, torch.ones(2))
    manual = -(t * F.log_softmax(z, 1)).sum() / 2
    assert float(s / n) == pytest.approx(float(manual), rel=1e-6)
    s0, n0 = recipe_loss(z, soft_targets(torch.tensor([1, 0])), torch.ones(2))
    assert float(s / n) > float(s0 / n0) + 0.1  # confident right answers now cost more


def test_mixup_mixes_images_and_labels_with_the_drawn_lambda():
    b = 16
    x = torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1).expand(b, 3, 4, 4).clone()
    y = torch.tensor([i % 2 for i in range(b)])
    gen = torch.Generator().manual_seed(3)
    xm, tm, lam = mix_batch(x, soft_targets(y), mixup_alpha=0.4, cutmix_alpha=0.0, gen=gen)
    assert 0 < lam < 1
    partner = (xm[:, 0, 0, 0] - lam * torch.arange(b)) / (1 - lam)
    j = partner.round().long()
    assert torch.allclose(partner, j.float(), atol=1e-3) and sorted(j.tolist()) == list(range(b))
    assert torch.allclose(tm, lam * soft_targets(y) + (1 - lam) * soft_targets(y[j]), atol=1e-6)
    lams = [mix_batch(x, soft_targets(y), mixup_alpha=0.4, cutmix_alpha=0.0, gen=gen)[2]
            for _ in range(400)]
    assert np.mean(lams) == pytest.approx(0.5, abs=0.05)  # Beta(a, a) is symmetric


def test_cutmix_lambda_is_the_kept_area():
    x = torch.zeros(8, 3, 32, 32)
    x[::2] = 1.0
    y = torch.tensor([0, 1] * 4)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        xm, tm, lam = mix_batch(x, soft_targets(y), mixup_alpha=0.0, cutmix_alpha=1.0, gen=gen)
        changed = (xm != x).any(dim=1).float().mean(dim=(1, 2))  # pasted from a differing partner
        differs = changed > 0
        if differs.any():
            assert float(changed[differs][0]) == pytest.approx(1 - lam, abs=1e-6)
        assert torch.allclose(tm.sum(1), torch.ones(8))


def test_class_balanced_sampler_draws_classes_equally():
    y = np.array([0] * 900 + [1] * 100)
    w = sample_weights(y, class_balanced=True)
    assert w[y == 1].sum() == pytest.approx(0.5) and w[y == 0].sum() == pytest.approx(0.5)
    gen = torch.Generator().manual_seed(0)
    draws = np.concatenate([epoch_indices(w, gen).numpy() for _ in range(20)])
    assert y[draws].mean() == pytest.approx(0.5, abs=0.015)
    # uniform weights keep today's order: a permutation from the same generator
    u = sample_weights(y, class_balanced=False)
    assert torch.equal(epoch_indices(u, torch.Generator().manual_seed(1)),
                       torch.randperm(1000, generator=torch.Generator().manual_seed(1)))


def test_hard_negatives_are_oversampled_by_the_factor():
    y = np.array([0] * 500 + [1] * 500)
    hard = np.zeros(1000, bool)
    hard[:50] = True  # 50 train false positives
    w = sample_weights(y, class_balanced=False, hard_negatives=hard, hard_negative_factor=3.0)
    assert w[0] / w[100] == pytest.approx(3.0) and w[0] / w[600] == pytest.approx(3.0)
    draws = torch.multinomial(torch.from_numpy(w), 200_000, replacement=True,
                              generator=torch.Generator().manual_seed(0)).numpy()
    per_hard = np.isin(draws, np.arange(50)).mean() / 50
    per_easy_neg = np.isin(draws, np.arange(50, 500)).mean() / 450
    assert per_hard / per_easy_neg == pytest.approx(3.0, rel=0.05)


def test_ema_equals_the_formula_after_k_steps_and_differs_from_raw():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    d = 0.8
    ema = WeightEMA(model, d)
    expected = [p.detach().clone() for p in model.parameters()]
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model)
        expected = [d * e + (1 - d) * p.detach() for e, p in zip(expected, model.parameters(),
                                                                strict=True)]
    for e, got, raw in zip(expected, ema.model.parameters(), model.parameters(), strict=True):
        assert torch.allclose(got, e, atol=1e-6)
        assert (got - raw).abs().max() > 0.1


class _Flat(nn.Module):
    """A BatchNorm-free backbone (batch statistics would make micro-batches differ)."""

    num_features = 5

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 8 * 8, 5)

    def forward(self, x):
        return self.fc(x.flatten(1))


def _one_step(cfg: TrainerConfig, x, y) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = RoadworkClassifier(_Flat(), head_dropout=0.0)
    loop = trainer._make_loop(model, cfg, y)
    trainer._train_epoch(loop, torch.from_numpy(x), torch.from_numpy(y), torch.arange(len(y)), 1)
    return [p.detach().clone() for p in model.parameters()]


def test_accumulating_k_micro_batches_equals_one_big_batch(monkeypatch):
    monkeypatch.setattr(trainer, "light_augment", lambda x, gen: x)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (12, 3, 8, 8), dtype=np.uint8)
    y = np.array([0, 1, 0, 0, 1, 0, 0, 0, 1, 0, 1, 0])  # unequal class weights per micro-batch
    base = dict(img_size=16, epochs=1, device="cpu", focal_gamma=1.0, label_smoothing=0.1)
    big = _one_step(TrainerConfig(batch_size=12, grad_accum_steps=1, **base), x, y)
    acc = _one_step(TrainerConfig(batch_size=4, grad_accum_steps=3, **base), x, y)
    small = _one_step(TrainerConfig(batch_size=4, grad_accum_steps=1, **base), x, y)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(big, acc, strict=True))
    assert any((a - b).abs().max() > 1e-4 for a, b in zip(big, small, strict=True))


def test_amp_decisions_and_cpu_bf16_probe_is_cached():
    cpu = torch.device("cpu")
    assert resolve_amp("off", cpu).dtype == "float32"
    assert resolve_amp("fp16", cpu).dtype == "float32"  # never fp16 on CPU
    first = measure_cpu_bf16()
    assert measure_cpu_bf16() is first  # measured once per process
    assert first.dtype in {"float32", "bfloat16"} and "cpu bf16" in first.reason
    if first.dtype == "bfloat16":
        assert first.bf16_seconds * 1.2 < first.fp32_seconds
    assert resolve_amp("auto", cpu) is first


def _ramp_image(size: int = 96) -> np.ndarray:
    ramp = np.linspace(20, 235, size)
    img = np.zeros((3, size, size), np.uint8)
    img[0] = ramp[:, None]  # red grows downwards
    img[1] = ramp[None, :]  # green grows rightwards
    img[2] = 128
    return img


def test_validator_augmentation_flips_rotates_and_draws_levels_as_configured():
    img = _ramp_image()
    n = 240
    vflip = hflip = 0
    levels, angles = [], []
    for i in range(n):
        out, level = validator_augment_image(img, np.random.default_rng([7, i]))
        assert out.shape == img.shape and out.dtype == np.uint8
        levels.append(level)
        if level == 0:
            assert np.abs(out.astype(int) - img).mean() < 6  # centre crop + JPEG only
            continue
        c = out.astype(np.float64)
        keep = (np.abs(c[2] - 128) < 40)[1:-1, 1:-1]  # not the black rotation corners
        gy_r = (c[0, 2:, 1:-1] - c[0, :-2, 1:-1])[keep].mean()
        gy_g = (c[1, 2:, 1:-1] - c[1, :-2, 1:-1])[keep].mean()
        gx_g = (c[1, 1:-1, 2:] - c[1, 1:-1, :-2])[keep].mean()
        vflip += gy_r < 0
        hflip += gx_g < 0
        if level == 1:  # L2/L3 saturation mixes the red (vertical) ramp into green
            angles.append(math.degrees(math.atan2(abs(gy_g), abs(gx_g))))
    counts = np.bincount(levels, minlength=4)
    assert counts.min() > n / 4 - 25  # levels drawn uniformly
    m = n - counts[0]
    assert abs(vflip / m - 0.5) < 0.12 and abs(hflip / m - 0.5) < 0.12
    assert max(angles) < 24 and np.mean(angles) > 5  # |rotation| <= 20 deg, not zero


def test_pipeline_records_the_recipe_and_stores_mc_dropout_variance(tmp_path):
    """Checkpoint metadata names the AMP decision and EMA selection; logits carry the
    optional mc_dropout_var array when asked, and only then."""
    import pandas as pd
    from PIL import Image

    from roadwork_assets.core.artifacts import read_npz
    from roadwork_assets.core.training.checkpoint import load_checkpoint
    from roadwork_assets.core.training.pipeline import (
        compute_embeddings,
        compute_logits,
        train_checkpoint,
    )

    rng = np.random.default_rng(0)
    rows = []
    for i in range(16):
        arr = rng.integers(0, 60, (40, 40, 3), dtype=np.uint8)
        if i % 2:
            arr[10:30, 10:30] = (255, 120, 0)
        Image.fromarray(arr).save(tmp_path / f"i{i}.png")
        rows.append({"item_id": f"i{i}", "uri": str(tmp_path / f"i{i}.png"), "label": i % 2})
    frame = pd.DataFrame(rows)
    cfg = TrainerConfig(img_size=16, epochs=2, batch_size=4, threads=2, ema_decay=0.5,
                        head="evidential", augment="validator", head_dropout=0.3)
    caches = {}
    for split, part in (("train", frame.iloc[:10]), ("val_select", frame.iloc[10:])):
        compute_embeddings(part.reset_index(drop=True), cfg, tmp_path / f"{split}.npz", split,
                           "dv", assignment_version="a1")
        caches[split] = read_npz(tmp_path / f"{split}.npz")
    train_checkpoint(caches, cfg, tmp_path / "model.pt")
    payload = load_checkpoint(tmp_path / "model.pt")
    assert payload["training_recipe"] == {
        "amp_dtype": "float32", "amp_reason": "amp off", "ema_selected": True,
        "augment": "validator", "selection_views": "validator_l0_l3"}
    compute_logits(payload, caches["val_select"], "val_select", tmp_path / "a.npz", "c" * 64)
    assert "mc_dropout_var" not in read_npz(tmp_path / "a.npz")
    compute_logits(payload, caches["val_select"], "val_select", tmp_path / "b.npz", "c" * 64,
                   override=cfg.model_copy(update={"mc_dropout_passes": 8}))
    var = read_npz(tmp_path / "b.npz")["mc_dropout_var"]
    assert var.shape == (6,) and np.all(var > 0)


def test_source_weights_and_class_balance_hold_together():
    """dataset.source_balance=equal over a 9:1 source mix, with the class-balanced
    sampler: each source gets half the draws and each class half the draws."""
    from roadwork_assets.core.data.balance import SourceBalance, source_sample_weights

    src = np.array(["big"] * 900 + ["small"] * 100)
    y = np.array(([0] * 600 + [1] * 300) + ([0] * 50 + [1] * 50))
    base = source_sample_weights(src, SourceBalance(mode="equal"))
    w = sample_weights(y, class_balanced=False, base=base)
    assert w[src == "small"].sum() == pytest.approx(0.5)
    w = sample_weights(y, class_balanced=True, base=base)
    assert w[y == 1].sum() == pytest.approx(0.5)
    draws = torch.multinomial(torch.from_numpy(w), 200_000, replacement=True,
                              generator=torch.Generator().manual_seed(0)).numpy()
    assert y[draws].mean() == pytest.approx(0.5, abs=0.01)
    # within a class the sources keep their balanced ratio: positives 300 big vs 50 small
    # at per-image weights 1/900 vs 1/100 -> small holds 50/100 / (300/900 + 50/100) = 0.6
    pos = draws[y[draws] == 1]
    assert (src[pos] == "small").mean() == pytest.approx(0.6, abs=0.01)
