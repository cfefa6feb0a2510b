"""StreetVision validator simulator: augmentation levels, binarisation and the reward rule."""

import io
import itertools
import json
import math
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from roadwork_assets.contracts.errors import BadInputError
from roadwork_assets.core.evaluation.validator import (
    INVALID,
    _bilinear,
    _color_contrast,
    _color_saturation,
    _gaussian_blur,
    _gaussian_noise_color,
    _jpeg_downsample,
    augment,
    binarise,
    expected_reward,
    reference_window_reward,
    simulate,
    simulate_many,
    validator_reward,
    window_rewards,
)


def _gradient_image(w: int = 96, h: int = 72) -> Image.Image:
    """R rises top -> bottom, G rises left -> right: orientation is readable after any crop."""
    rows = np.linspace(60, 255, h)[:, None] * np.ones((1, w))
    cols = np.ones((h, 1)) * np.linspace(60, 255, w)[None, :]
    arr = np.stack([rows, cols, np.full((h, w), 128.0)], axis=-1)
    return Image.fromarray(arr.round().astype(np.uint8))


@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_each_level_is_a_decoded_224_rgb_jpeg(level):
    img = _gradient_image(130, 90)
    out = augment(img, level, np.random.default_rng(level))
    assert out.size == (224, 224) and out.mode == "RGB" and out.format == "JPEG"
    # decoded from q75: saving it again at q75 changes the pixels little
    buf = io.BytesIO()
    out.save(buf, format="JPEG", quality=75)
    again = np.asarray(Image.open(buf), dtype=np.float64)
    assert np.abs(again - np.asarray(out, dtype=np.float64)).mean() < 3.0


def test_level0_is_deterministic_centre_crop():
    img = _gradient_image(130, 90)
    a = augment(img, 0, np.random.default_rng(1))
    b = augment(img, 0, np.random.default_rng(2))
    assert np.array_equal(np.asarray(a), np.asarray(b))
    # centre square of a 130x90 image keeps columns 20..110: G spans less than the full range
    g = np.asarray(a)[..., 1].astype(float)
    assert 80 < g[:, :8].mean() < 110 and 205 < g[:, -8:].mean() < 235


def _orientation(out: Image.Image) -> tuple[bool, bool]:
    a = np.asarray(out, dtype=np.float64)
    up = a[:75, :, 0].mean() > a[-75:, :, 0].mean()  # R bright at the top: upside down
    mirrored = a[:, :75, 1].mean() > a[:, -75:, 1].mean()
    return up, mirrored


def test_level1_flips_each_way_half_the_time():
    n = 300
    img = _gradient_image()
    flips = [_orientation(augment(img, 1, np.random.default_rng(s))) for s in range(n)]
    v = np.array([f[0] for f in flips])
    h = np.array([f[1] for f in flips])
    tol = 4 * np.sqrt(0.25 / n)  # 4 binomial standard errors
    assert abs(v.mean() - 0.5) < tol  # upside down: vertical flip, p = 0.5
    assert abs(h.mean() - 0.5) < tol
    assert abs((v & h).mean() - 0.25) < 4 * np.sqrt(0.25 * 0.75 / n)  # rotated 180 degrees
    # flips=False: what upstream's code does today (its flip classes never flip)
    none = [_orientation(augment(img, 1, np.random.default_rng(s), flips=False))
            for s in range(60)]
    assert not any(f[0] or f[1] for f in none)


def test_distortions_follow_upstream_arithmetic():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    f = img.astype(np.float64)
    luma = f @ np.array([0.299, 0.587, 0.114])
    # CS: chroma scaled by the parameter at constant luma, then truncated to uint8
    cs = _color_saturation(img, 0.4, rng).astype(np.float64)
    np.testing.assert_allclose(cs, luma[..., None] + 0.4 * (f - luma[..., None]), atol=1.6)
    # CC: (x * 0.85).astype(uint8)
    assert np.array_equal(_color_contrast(img, 0.85, rng), (f * 0.85).astype(np.uint8))
    # "JPEG" = down by 2 and up (cv2 INTER_LINEAR: half-pixel grid, so halving a 2x2-block
    # image samples the block centres and gives the blocks back exactly)
    blocks = np.repeat(np.repeat(img[:32, :32], 2, axis=0), 2, axis=1)
    assert np.array_equal(_bilinear(blocks, 32, 32), img[:32, :32])
    assert _jpeg_downsample(blocks, 2, rng).shape == blocks.shape
    flat = np.full((64, 64, 3), 120, dtype=np.uint8)
    assert np.array_equal(_jpeg_downsample(flat, 3, rng), flat)
    # GNC: upstream's double /255 makes the luma noise std sqrt(v) * 255 * 255 / 219
    noisy = _gaussian_noise_color(flat, 0.001, np.random.default_rng(1)).astype(np.float64)
    y_std = (noisy @ np.array([0.299, 0.587, 0.114])).std()
    assert y_std == pytest.approx(np.sqrt(0.001) * 255 * 255 / 219, rel=0.1)
    # GB: a flat image is unchanged, an impulse spreads with sigma = k / 6
    assert np.array_equal(_gaussian_blur(flat, 7, rng), flat)


def test_augment_rejects_unknown_level():
    with pytest.raises(BadInputError):
        augment(_gradient_image(), 4, np.random.default_rng(0))


def test_binarise_rounds_like_np_round_and_marks_invalid():
    got = binarise([0.0, 0.49, 0.5, 0.5000001, 1.0, np.nan, -0.1, 1.1, np.inf])
    assert got.tolist() == [0, 0, 0, 1, 1, INVALID, INVALID, INVALID, INVALID]
    assert binarise(0.5) == 0


def test_window_rewards_match_a_literal_transcription_of_upstream():
    rng = np.random.default_rng(3)
    n = 150
    labels = rng.integers(0, 2, size=(n, 100))
    skill = rng.uniform(0.3, 1.0, size=(n, 1))
    right = rng.random((n, 100)) < skill
    preds = np.where(right == (labels == 1), rng.uniform(0.5001, 1, (n, 100)), rng.uniform(0, 0.5, (n, 100)))
    preds[rng.random((n, 100)) < 0.03] = np.nan  # some invalid answers
    labels[::11] = 1  # windows with a single label class
    preds[5::13] = 0.9  # constant answers
    preds[::7, -1] = 1.3  # an out-of-range last answer scores 0
    fast = window_rewards(labels, preds)
    slow = [reference_window_reward(labels[i].tolist(), preds[i].tolist()) for i in range(n)]
    np.testing.assert_allclose(fast, slow, atol=1e-12)
    assert np.all(fast[::7] == 0.0)


def test_perfect_predictor_scores_one():
    y = np.r_[np.zeros(30), np.ones(20)]
    est = validator_reward(y, np.where(y == 1, 0.97, 0.02), n_windows=2000, rng=0)
    assert est.mean == 1.0 and est.mcc == 1.0 and est.ci_low == est.ci_high == 1.0
    assert est.expected == pytest.approx(1.0)


def test_constant_predictor_mcc_zero_reward_from_accuracy_alone():
    y = np.r_[np.zeros(40), np.ones(40)]
    est = validator_reward(y, np.full(80, 0.8), n_windows=40000, rng=1)
    assert est.mcc == 0.0
    # E[(0.5 * Bin(10, 1/2) / 10) ** 3] = 0.125 * E[K^3] / 1000, E[K^3] = 125 + 3 * 5 * 2.5
    exact = 0.125 * 162.5 / 1000
    assert est.expected == pytest.approx(exact, rel=1e-9)
    assert est.ci_low <= exact <= est.ci_high
    assert est.ci_low > (0.5 * 0.5) ** 3  # the cube of the mean is not the mean of the cube


def test_coin_flip_predictor():
    rng = np.random.default_rng(4)
    y = np.r_[np.zeros(200), np.ones(200)]
    p = rng.integers(0, 2, size=400) * 0.8 + 0.1
    est = validator_reward(y, p, n_windows=40000, rng=5)
    assert est.ci_low <= est.expected <= est.ci_high
    assert 0.25**3 < est.mean < 0.035  # near (0.25)^3 plus the clamped-MCC and cube terms
    assert expected_reward(0.5, 0.5) == pytest.approx(0.02662, abs=1e-4)


def test_known_mix_matches_closed_form():
    # 9/10 positives right, 8/10 negatives right: resampling from the pools is iid
    y = np.r_[np.zeros(10), np.ones(10)]
    p = np.r_[np.full(8, 0.1), np.full(2, 0.7), np.full(9, 0.6), np.full(1, 0.5)]
    est = validator_reward(y, p, n_windows=40000, rng=6)
    assert (est.tpr, est.tnr) == (0.9, 0.8)
    assert est.expected == pytest.approx(expected_reward(0.9, 0.8))
    assert est.ci_low <= est.expected <= est.ci_high
    # and about (0.5 * MCC + 0.5 * acc)^3 at the rates (the window noise adds a little)
    mcc = (0.9 * 0.8 - 0.2 * 0.1) / np.sqrt((0.9 + 0.2) * 1.0 * (0.8 + 0.1) * 1.0)
    assert est.mean == pytest.approx((0.5 * mcc + 0.5 * 0.85) ** 3, abs=0.02)


def test_closed_form_equals_brute_force_on_a_small_window():
    w, s, tpr, tnr = 6, 3, 0.7, 0.6
    total = 0.0
    for labels in itertools.product((0, 1), repeat=w):
        for right in itertools.product((False, True), repeat=w):
            prob = 0.5**w
            for lab, r in zip(labels, right, strict=True):
                acc = tpr if lab == 1 else tnr
                prob *= acc if r else 1 - acc
            ds = [lab if r else 1 - lab for lab, r in zip(labels, right, strict=True)]
            cells = Counter(zip(labels, ds, strict=True))
            tp, tn, fp, fn = cells[1, 1], cells[0, 0], cells[0, 1], cells[1, 0]
            denom = (tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)  # 0: one class
            mcc = max(0.0, (tp * tn - fp * fn) / math.sqrt(denom)) if denom else 0.0
            acc = sum(right[-s:]) / s
            total += prob * (0.5 * mcc + 0.5 * acc) ** 3
    assert expected_reward(tpr, tnr, window=w, short=s) == pytest.approx(total, rel=1e-9)


def test_out_of_range_answers_score_zero():
    y = np.r_[np.zeros(20), np.ones(20)]
    bad = validator_reward(y, np.full(40, 1.5), n_windows=500, rng=0)
    assert bad.mean == 0.0 and bad.invalid_rate == 1.0 and bad.expected is None
    assert window_rewards([[0] * 99 + [1]], [[0.0] * 99 + [-0.2]])[0] == 0.0
    half = validator_reward(y, np.where(np.arange(40) % 2, np.nan, np.where(y == 1, 0.9, 0.1)),
                            n_windows=4000, rng=0)
    assert 0.4 < half.mean < 0.55  # about half the challenges score 0


def test_validator_reward_rejects_one_class():
    with pytest.raises(BadInputError):
        validator_reward(np.ones(5), np.full(5, 0.9), n_windows=10)


def _coloured(label: int, i: int) -> Image.Image:
    rng = np.random.default_rng(i)
    base = np.array([200, 60, 40] if label else [40, 60, 200], dtype=np.float64)
    arr = base + rng.normal(0, 15, size=(48 + i, 64, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def test_simulate_reports_per_level_and_reward():
    labels = [0, 1] * 4
    images = [_coloured(lab, i) for i, lab in enumerate(labels)]
    seen = []

    def predict_fn(batch):
        seen.extend((im.size, im.mode, im.format) for im in batch)
        return [0.9 if np.asarray(im)[..., 0].mean() > np.asarray(im)[..., 2].mean() else 0.1
                for im in batch]

    rep = simulate(images, labels, predict_fn, seed=7, batch_size=3, n_windows=1000)
    assert set(seen) == {((224, 224), "RGB", "JPEG")} and len(seen) == 32
    assert [m.level for m in rep.per_level] == [0, 1, 2, 3]
    assert all(m.n == 8 and m.n_positive == 4 and m.mcc == 1.0 and m.accuracy == 1.0
               for m in rep.per_level)
    assert rep.reward.mean == 1.0 and rep.reward.n_positive == 16
    assert json.loads(rep.model_dump_json())["reward"]["mean"] == 1.0
    again = simulate(images, labels, predict_fn, levels=(1,), seed=7, batch_size=8, n_windows=100)
    assert again.per_level[0] == rep.per_level[1]  # per-image seeds: batch size does not matter


def test_simulate_many_shares_the_augmented_images():
    labels = [0, 1, 0, 1]
    images = [_coloured(lab, i) for i, lab in enumerate(labels)]
    calls = []

    def colour(batch):
        calls.append(len(batch))
        return [0.9 if np.asarray(im)[..., 0].mean() > np.asarray(im)[..., 2].mean() else 0.1
                for im in batch]

    reps = simulate_many(images, labels, {"colour": colour, "constant": lambda b: [0.5] * len(b)},
                         levels=(0, 3), seed=1, n_windows=2000)
    assert calls == [4, 4]
    assert reps["colour"].reward.mean == 1.0
    const = reps["constant"]
    assert all(m.mcc == 0.0 and m.tpr == 0.0 and m.tnr == 1.0 for m in const.per_level)
    assert const.reward.expected == pytest.approx(0.0203125)
    with pytest.raises(BadInputError):
        simulate_many(images, labels, {"short": lambda b: [0.1]}, levels=(0,))


def test_simulate_many_reports_progress_over_images_and_levels():
    labels = [0, 1, 0, 1, 1]
    images = [_coloured(lab, i) for i, lab in enumerate(labels)]
    heard = []
    simulate_many(images, labels, {"constant": lambda b: [0.5] * len(b)}, levels=(0, 2),
                  batch_size=2, n_windows=500,
                  progress=lambda stage, done, total: heard.append((stage, done, total)))
    assert {s for s, _, _ in heard} == {"validator simulator"}
    assert {t for _, _, t in heard} == {10}
    done = [d for _, d, _ in heard]
    assert done == sorted(done) and done[0] == 0 and done[-1] == 10
    assert 5 in done  # the second level starts after all 5 images of the first
