"""A StreetVision validator simulator: augment like the validator, score like the validator.

What the validator does (docs/domain.md; read from natixnetwork/streetvision-subnet,
``natix/utils/image_transforms.py``, ``natix/protocol.py``, ``natix/validator/forward.py``,
``natix/validator/reward.py``, ``natix/validator/miner_performance_tracker.py``):

- Each challenge draws its label 50/50 (``np.random.choice`` over the two classes), an
  image of that label, and an augmentation level 0-3 with probability 0.25 each.
- L0 (``get_base_transforms``): centre square crop (short side), ``Resize((224, 224))``
  on the PIL image (bilinear, PIL's antialias).
- L1 (``get_random_augmentations``): ``ToTensor`` of the full-size image, rotation by
  U(-20, 20) degrees (fill 0: black corners), ``RandomResizedCrop((224, 224),
  scale=(0.2, 1.0), ratio=(1, 1))`` (bilinear, antialias), horizontal flip and vertical
  flip.
- L2: L1, then the DeeperForensics distortions CS, CC, JPEG, each at an integer level
  drawn from {0, 1} (``random.randint(0, 1)``; level 0 = off). L3: L1, then CS, CC, JPEG,
  GNC, GB, each at a level drawn from {0, 1, 2}. Parameters per level (upstream
  ``get_distortion_parameter``): CS 0.4/0.3, CC 0.85/0.725, JPEG (down-sample factor) 2/3,
  GNC (noise variance) 0.001/0.002, GB (kernel) 7/9 with sigma = kernel / 6.
  Each distortion takes the float tensor to uint8 by truncation (``(x * 255).astype``),
  works in OpenCV's BGR, and comes back as x / 255.
- The tensor goes back to PIL (``ToPILImage``: ``mul(255).byte()``, truncation) and is
  saved as JPEG at PIL's default quality, 75; the miner decodes that.

Where this module departs from the upstream *code*, and why:

- **Flips.** Upstream's ``RandomHorizontalFlipWithParams`` / ``RandomVerticalFlipWithParams``
  set ``self.params = {}`` in ``__init__``, so ``forward`` always takes the branch that
  replays ``self.params.get("do_flip", False)``: as written (checked at upstream HEAD
  28a1755) the validator never flips. docs/domain.md and the classes' intent say p = 0.5
  each, and the bug can be fixed upstream any day, so ``flips=True`` (the default) flips
  with p = 0.5 each — the pessimistic reading for a model that is not flip-invariant.
  ``flips=False`` reproduces the code as it runs today.
- **Rotation interpolation.** Upstream builds ``RandomRotation(20, interpolation=BILINEAR)``
  but its ``forward`` calls ``F.rotate(img, angle)``, whose default is NEAREST: the code
  rotates with nearest-neighbour, which we follow (``rotation_interpolation`` changes it).
  docs/domain.md says bilinear; that is the constructor's argument, not what runs.
- **OpenCV.** cv2 is not a dependency here. CS and GNC use OpenCV's float YCrCb formulas
  (Y = .299R + .587G + .114B, Cr = .713(R - Y) + .5, Cb = .564(B - Y) + .5 and the inverse
  1.403 / -.714 / -.344 / 1.773) with upstream's 16-235 / 16-240 rescaling, including its
  quirks (GNC divides an already-scaled image by 255 again, so the noise std is about
  9 grey levels in Y and larger in R and B at variance 0.001). ``cv2.resize``
  INTER_LINEAR is torch's bilinear without antialias (same half-pixel grid);
  ``cv2.GaussianBlur`` is a separable float Gaussian with reflect-101 borders, rounded.
  Differences to OpenCV are within a grey level (its fixed-point paths), not bit-exact.
- **RNG.** Upstream mixes ``torch``, ``random`` and ``np.random`` global state; here one
  ``np.random.Generator`` draws everything (same distributions, other streams).

Scoring (``reward.py`` + ``MinerPerformanceTracker.get_metrics``): the last 100 answers
are kept; predictions are binarised with ``np.round`` (0.5 -> 0); MCC over the last 100 is
``max(0, mcc)``, and 0 unless both the labels and the predictions of the window hold two
classes; accuracy over the last 10; reward = (0.5 MCC + 0.5 acc) ** 3, times 0 when the
answer itself is outside [0, 1], and 0 for a missing answer (-1). A missing answer is
dropped from the windows. Simplification: here every invalid answer (NaN, < 0, > 1,
missing) is treated as missing. Upstream keeps an out-of-range answer in the window
(``np.round(1.7) = 2`` counts as wrong, ``np.round(-0.2) = 0`` as class 0) and a NaN makes
sklearn raise, zeroing that miner's rewards while it stays in the window.

Because answers to different challenges are drawn independently, the expected reward of
a predictor with class-conditional accuracies (TPR, TNR) has a closed form
(`expected_reward`): the window's confusion counts are binomial given the label count,
and given those counts the last 10 are a uniformly random 10 of the 100
(hypergeometric). `validator_reward` simulates windows and reports both.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from scipy import ndimage, stats
from sklearn.metrics import matthews_corrcoef

from roadwork_assets.contracts.errors import BadInputError
from roadwork_assets.contracts.validator_schemas import (
    LevelMetrics,
    RewardEstimate,
    ValidatorReport,
)
from roadwork_assets.core.progress import Progress, no_progress

TARGET_SIZE = 224
JPEG_QUALITY = 75  # PIL's default, what upstream's image.save(format="JPEG") uses
LEVELS = (0, 1, 2, 3)
LEVEL_PROBS = (0.25, 0.25, 0.25, 0.25)
ROTATION_DEGREES = 20.0
RRC_SCALE = (0.2, 1.0)
FLIP_P = 0.5
MCC_WINDOW = 100
ACC_WINDOW = 10
REWARD_EXPONENT = 3.0
INVALID = -1  # binarise's mark for an answer the validator scores 0

# upstream get_distortion_parameter, levels 1..2 (level 0 = not applied)
DISTORTION_PARAMS: dict[str, tuple[float, ...]] = {
    "CS": (0.4, 0.3),
    "CC": (0.85, 0.725),
    "JPEG": (2, 3),
    "GNC": (0.001, 0.002),
    "GB": (7, 9),
}
# per augmentation level: (distortion, highest level drawn), applied in this order
LEVEL_DISTORTIONS: dict[int, tuple[tuple[str, int], ...]] = {
    0: (),
    1: (),
    2: (("CS", 1), ("CC", 1), ("JPEG", 1)),
    3: (("CS", 2), ("CC", 2), ("JPEG", 2), ("GNC", 2), ("GB", 2)),
}


# ----------------------------------------------------------------- augmentation
def _rgb_to_ycrcb(img: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """OpenCV's float RGB -> YCrCb (delta 0.5), on 0-255 values as upstream feeds it."""
    f = img.astype(np.float32)
    r, g, b = f[..., 0], f[..., 1], f[..., 2]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    return y, (r - y) * 0.713 + 0.5, (b - y) * 0.564 + 0.5


def _ycrcb_to_rgb(y: np.ndarray, cr: np.ndarray, cb: np.ndarray) -> np.ndarray:
    dr, db = cr - 0.5, cb - 0.5
    return np.stack([y + 1.403 * dr, y - 0.714 * dr - 0.344 * db, y + 1.773 * db], axis=-1)


def _to_uint8_trunc(x: np.ndarray) -> np.ndarray:
    # upstream: .astype(np.uint8) (truncation); the clip only stops numpy's wrap-around
    return np.clip(x, 0, 255).astype(np.uint8)


def _scale_luma(y):
    return (y * (235 - 16) + 16) / 255.0


def _scale_chroma(c):
    return (c * (240 - 16) + 16) / 255.0


def _unscale_luma(y):
    return (y * 255.0 - 16) / (235 - 16)


def _unscale_chroma(c):
    return (c * 255.0 - 16) / (240 - 16)


def _color_saturation(img: np.ndarray, param: float, rng: np.random.Generator) -> np.ndarray:
    y, cr, cb = _rgb_to_ycrcb(img)
    cr = _unscale_chroma(0.5 + (_scale_chroma(cr) - 0.5) * param)
    cb = _unscale_chroma(0.5 + (_scale_chroma(cb) - 0.5) * param)
    return _to_uint8_trunc(_ycrcb_to_rgb(_unscale_luma(_scale_luma(y)), cr, cb))


def _color_contrast(img: np.ndarray, param: float, rng: np.random.Generator) -> np.ndarray:
    return _to_uint8_trunc(img.astype(np.float32) * np.float32(param))


def _bilinear(img: np.ndarray, h: int, w: int) -> np.ndarray:
    """cv2.resize INTER_LINEAR on uint8: half-pixel grid, no antialias, rounded."""
    t = torch.from_numpy(img.astype(np.float32)).permute(2, 0, 1)[None]
    out = torch.nn.functional.interpolate(t, size=(h, w), mode="bilinear",
                                          align_corners=False, antialias=False)
    return np.clip(np.rint(out[0].permute(1, 2, 0).numpy()), 0, 255).astype(np.uint8)


def _jpeg_downsample(img: np.ndarray, param: float, rng: np.random.Generator) -> np.ndarray:
    h, w = img.shape[:2]
    k = int(param)
    return _bilinear(_bilinear(img, h // k, w // k), h, w)


def _gaussian_noise_color(img: np.ndarray, param: float, rng: np.random.Generator) -> np.ndarray:
    y, cr, cb = _rgb_to_ycrcb(img)
    # upstream: bgr2ycbcr(img) / 255, + sqrt(param) * randn, * 255, ycbcr2bgr
    chans = [_scale_luma(y) / 255.0, _scale_chroma(cb) / 255.0, _scale_chroma(cr) / 255.0]
    sd = math.sqrt(param)
    noisy = [(c + sd * rng.standard_normal(c.shape)) * 255.0 for c in chans]
    y2, cb2, cr2 = _unscale_luma(noisy[0]), _unscale_chroma(noisy[1]), _unscale_chroma(noisy[2])
    return _to_uint8_trunc(_ycrcb_to_rgb(y2, cr2, cb2))


@lru_cache(maxsize=8)
def _gaussian_kernel(ksize: int) -> np.ndarray:
    sigma = ksize / 6.0  # upstream: cv2.GaussianBlur(img, (k, k), k * 1.0 / 6)
    x = np.arange(ksize) - (ksize - 1) / 2.0
    k = np.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


def _gaussian_blur(img: np.ndarray, param: float, rng: np.random.Generator) -> np.ndarray:
    k = _gaussian_kernel(int(param))
    f = img.astype(np.float64)
    f = ndimage.convolve1d(f, k, axis=0, mode="mirror")  # mirror = cv2 BORDER_REFLECT_101
    f = ndimage.convolve1d(f, k, axis=1, mode="mirror")
    return np.clip(np.rint(f), 0, 255).astype(np.uint8)


_DISTORTION_FNS: dict[str, Callable[[np.ndarray, float, np.random.Generator], np.ndarray]] = {
    "CS": _color_saturation,
    "CC": _color_contrast,
    "JPEG": _jpeg_downsample,
    "GNC": _gaussian_noise_color,
    "GB": _gaussian_blur,
}


def _rrc_params(height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """torchvision RandomResizedCrop.get_params with ratio (1, 1): (top, left, h, w)."""
    area = height * width
    for _ in range(10):
        target = area * rng.uniform(*RRC_SCALE)
        side = int(round(math.sqrt(target)))
        if 0 < side <= width and 0 < side <= height:
            return (int(rng.integers(0, height - side + 1)),
                    int(rng.integers(0, width - side + 1)), side, side)
    side = min(height, width)  # fallback: centre crop at ratio 1
    return (height - side) // 2, (width - side) // 2, side, side


def _to_jpeg_roundtrip(img: Image.Image) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    buf.seek(0)
    out = Image.open(buf)
    out.load()  # an RGB JPEG decodes as RGB; keep it (and its .format == "JPEG")
    return out if out.mode == "RGB" else out.convert("RGB")


def augment(
    img: Image.Image,
    level: int,
    rng: np.random.Generator,
    *,
    flips: bool = True,
    rotation_interpolation: TF.InterpolationMode = TF.InterpolationMode.NEAREST,
) -> Image.Image:
    """One validator challenge image: augmentation ``level`` (0-3), then JPEG q75 and back.

    Returns a decoded 224x224 RGB PIL image, what a miner receives. L0 is deterministic.
    See the module docstring for what matches upstream and what is a choice (``flips``,
    ``rotation_interpolation``). Cost: L1-L3 rotate the full-size image as upstream does
    (about 0.1-0.3 s for a 12 MP photo on one CPU core).
    """
    if level not in LEVELS:
        raise BadInputError(f"augmentation level must be one of {LEVELS}, got {level!r}")
    img = img.convert("RGB")
    size = [TARGET_SIZE, TARGET_SIZE]
    if level == 0:
        side = min(img.size)
        out = TF.resize(TF.center_crop(img, [side, side]), size,
                        interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        return _to_jpeg_roundtrip(out)

    t = TF.to_tensor(img)
    angle = float(rng.uniform(-ROTATION_DEGREES, ROTATION_DEGREES))
    t = TF.rotate(t, angle, interpolation=rotation_interpolation)
    top, left, h, w = _rrc_params(t.shape[-2], t.shape[-1], rng)
    t = TF.resized_crop(t, top, left, h, w, size,
                        interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    hflip, vflip = rng.random() < FLIP_P, rng.random() < FLIP_P  # drawn either way
    if flips and hflip:
        t = TF.hflip(t)
    if flips and vflip:
        t = TF.vflip(t)
    for name, max_level in LEVEL_DISTORTIONS[level]:
        dlevel = int(rng.integers(0, max_level + 1))
        if dlevel == 0:
            continue
        arr = (t.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        arr = _DISTORTION_FNS[name](arr, DISTORTION_PARAMS[name][dlevel - 1], rng)
        t = torch.from_numpy(arr.astype(np.float32) / 255.0).permute(2, 0, 1)
    return _to_jpeg_roundtrip(TF.to_pil_image(t.clamp(0, 1)))


# --------------------------------------------------------------------- scoring
def binarise(p) -> np.ndarray:
    """Validator binarisation, ``np.round`` (round half to even: 0.5 -> 0, 0.5000001 -> 1).

    Returns int64 decisions of ``p``'s shape: 0 / 1, and ``INVALID`` (-1) where the answer
    is NaN / inf, < 0 or > 1 (upstream scores those 0).
    """
    p = np.asarray(p, dtype=np.float64)
    valid = np.isfinite(p) & (p >= 0.0) & (p <= 1.0)
    decision = np.full(p.shape, INVALID, dtype=np.int64)
    decision[valid] = np.round(p[valid]).astype(np.int64)
    return decision


def _binarise(p) -> tuple[np.ndarray, np.ndarray]:
    d = binarise(p)
    return d, d != INVALID


def _window_mcc(y: np.ndarray, d: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Per row: max(0, MCC) over valid entries; 0 unless labels and decisions both hold
    two classes (upstream's guard)."""
    v = valid.astype(np.float64)
    tp = np.sum(v * (y == 1) * (d == 1), axis=-1)
    tn = np.sum(v * (y == 0) * (d == 0), axis=-1)
    fp = np.sum(v * (y == 0) * (d == 1), axis=-1)
    fn = np.sum(v * (y == 1) * (d == 0), axis=-1)
    return _mcc_from_counts(tp, tn, fp, fn)


def _mcc_from_counts(tp, tn, fp, fn) -> np.ndarray:
    tp, tn, fp, fn = (np.asarray(a, dtype=np.float64) for a in (tp, tn, fp, fn))
    denom = (tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)
    with np.errstate(invalid="ignore", divide="ignore"):
        mcc = (tp * tn - fp * fn) / np.sqrt(denom)
    # denom == 0 exactly when labels or decisions hold one class -> 0
    return np.where(denom > 0, np.maximum(mcc, 0.0), 0.0)


def _window_accuracy(y: np.ndarray, d: np.ndarray, valid: np.ndarray) -> np.ndarray:
    n = valid.sum(axis=-1)
    hits = np.sum(valid & (y == d), axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, hits / np.maximum(n, 1), 0.0)


def window_rewards(labels: np.ndarray, predictions: np.ndarray) -> np.ndarray:
    """Reward of the last challenge of each row: rows are the last ``MCC_WINDOW`` challenges
    (oldest first), ``labels`` 0/1 and raw ``predictions``. Vectorised upstream rule."""
    y = np.atleast_2d(np.asarray(labels)).astype(np.int64)
    d, valid = _binarise(np.atleast_2d(predictions))
    if y.shape != d.shape:
        raise BadInputError(f"labels {y.shape} and predictions {d.shape} differ in shape")
    mcc = _window_mcc(y, d, valid)
    acc = _window_accuracy(y[:, -ACC_WINDOW:], d[:, -ACC_WINDOW:], valid[:, -ACC_WINDOW:])
    return np.where(valid[:, -1], (0.5 * mcc + 0.5 * acc) ** REWARD_EXPONENT, 0.0)


def reference_window_reward(labels: Sequence[int], predictions: Sequence[float]) -> float:
    """Literal (slow) transcription of upstream's tracker + reward for one window, sklearn
    MCC; invalid answers handled as missing. For tests of `window_rewards`."""
    last = float(predictions[-1])
    if not (0.0 <= last <= 1.0):
        return 0.0

    def metrics(n: int) -> tuple[float, float]:
        keep = [(y, p) for y, p in zip(labels[-n:], predictions[-n:], strict=True)
                if np.isfinite(p) and 0.0 <= p <= 1.0]
        if not keep:
            return 0.0, 0.0
        ys = np.array([k[0] for k in keep])
        ds = np.round(np.array([k[1] for k in keep]))
        acc = float(np.mean(ys == ds))
        mcc = (max(0.0, float(matthews_corrcoef(ys, ds)))
               if len(np.unique(ys)) > 1 and len(np.unique(ds)) > 1 else 0.0)
        return mcc, acc

    mcc100, _ = metrics(MCC_WINDOW)
    _, acc10 = metrics(ACC_WINDOW)
    return (0.5 * mcc100 + 0.5 * acc10) ** REWARD_EXPONENT


@lru_cache(maxsize=4)
def _closed_form_tables(window: int, short: int):
    """States (n1, c1, c0) of a window and, per state, reward for each short-window hit count."""
    n1, c1, c0 = [], [], []
    for a in range(window + 1):
        g1, g0 = np.meshgrid(np.arange(a + 1), np.arange(window - a + 1), indexing="ij")
        n1.append(np.full(g1.size, a))
        c1.append(g1.ravel())
        c0.append(g0.ravel())
    n1, c1, c0 = (np.concatenate(x) for x in (n1, c1, c0))
    n0 = window - n1
    mcc = _mcc_from_counts(c1, c0, n0 - c0, n1 - c1)
    s = np.arange(short + 1)
    # hits in the last `short` given c = c1 + c0 hits among `window`: hypergeometric
    hyper = stats.hypergeom.pmf(s[None, :], window, (c1 + c0)[:, None], short)
    value = (0.5 * mcc[:, None] + 0.5 * s[None, :] / short) ** REWARD_EXPONENT
    return n1, c1, c0, np.sum(hyper * value, axis=1)


def expected_reward(tpr: float, tnr: float, *, window: int = MCC_WINDOW,
                    short: int = ACC_WINDOW) -> float:
    """Exact steady-state E[reward per challenge] for a predictor whose answers are
    independent across challenges, correct with probability ``tpr`` on roadwork and
    ``tnr`` on none, labels 50/50, every answer valid.

    E.g. perfect: 1; constant: E[(0.5 * Bin(10, .5) / 10) ** 3] = 0.0203125 (not
    (0.5 * 0.5) ** 3 = 0.0156: the cube of a random accuracy is larger on average).
    """
    for name, v in (("tpr", tpr), ("tnr", tnr)):
        if not 0.0 <= v <= 1.0:
            raise BadInputError(f"{name} must be in [0, 1], got {v}")
    n1, c1, c0, value = _closed_form_tables(window, short)
    n0 = window - n1
    prob = (stats.binom.pmf(n1, window, 0.5) * stats.binom.pmf(c1, n1, tpr)
            * stats.binom.pmf(c0, n0, tnr))
    return float(np.sum(prob * value))


# -------------------------------------------------------------------- reports
# The report models (RewardEstimate, LevelMetrics, ValidatorReport) live in
# contracts.validator_schemas: the test report artifact embeds them.


def _rates(y: np.ndarray, d: np.ndarray, valid: np.ndarray) -> tuple[float, float]:
    pos, neg = y == 1, y == 0
    tpr = float(np.sum(pos & valid & (d == 1)) / max(pos.sum(), 1))
    tnr = float(np.sum(neg & valid & (d == 0)) / max(neg.sum(), 1))
    return tpr, tnr


def validator_reward(labels, predictions, *, n_windows: int = 20000,
                     rng: np.random.Generator | int | None = 0) -> RewardEstimate:
    """Simulate the validator's challenge stream on a pool of (label, prediction) answers.

    Each window: 100 labels drawn 50/50, each answered by a prediction drawn with
    replacement from that class's pool; the reward of the window's last challenge follows
    upstream's rule (module docstring). The mean over ``n_windows`` independent windows
    estimates the steady-state expected reward; ``expected`` is its closed form.
    """
    y = np.asarray(labels).ravel()
    p = np.asarray(predictions, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise BadInputError(f"{y.size} labels for {p.size} predictions")
    if not np.isin(y, (0, 1)).all():
        raise BadInputError("labels must be 0 (none) or 1 (roadwork)")
    y = y.astype(np.int64)
    pools = [p[y == 0], p[y == 1]]
    if not pools[0].size or not pools[1].size:
        raise BadInputError("validator_reward needs answers for both classes")
    if n_windows < 2:
        raise BadInputError(f"n_windows must be >= 2, got {n_windows}")
    rng = np.random.default_rng(rng)
    rewards = np.empty(n_windows)
    chunk = 4096
    for start in range(0, n_windows, chunk):
        m = min(chunk, n_windows - start)
        lab = rng.integers(0, 2, size=(m, MCC_WINDOW))
        idx0 = rng.integers(0, pools[0].size, size=(m, MCC_WINDOW))
        idx1 = rng.integers(0, pools[1].size, size=(m, MCC_WINDOW))
        pred = np.where(lab == 1, pools[1][idx1], pools[0][idx0])
        rewards[start:start + m] = window_rewards(lab, pred)
    mean = float(rewards.mean())
    half = 1.959963984540054 * float(rewards.std(ddof=1)) / math.sqrt(n_windows)
    d, valid = _binarise(p)
    tpr, tnr = _rates(y, d, valid)
    pooled_mcc = float(_window_mcc(y[None], d[None], valid[None])[0])
    return RewardEstimate(
        mean=mean, ci_low=max(0.0, mean - half), ci_high=min(1.0, mean + half),
        n_windows=n_windows, expected=expected_reward(tpr, tnr) if valid.all() else None,
        mcc=pooled_mcc, accuracy=0.5 * (tpr + tnr), tpr=tpr, tnr=tnr,
        invalid_rate=float(1.0 - valid.mean()),
        n_positive=int(pools[1].size), n_negative=int(pools[0].size),
    )


def _level_metrics(level: int, y: np.ndarray, p: np.ndarray) -> LevelMetrics:
    d, valid = _binarise(p)
    tpr, tnr = _rates(y, d, valid)
    dd = np.where(valid, d, 1 - y)  # an invalid answer counts as wrong
    one_class = np.unique(y).size < 2 or np.unique(dd).size < 2
    mcc = 0.0 if one_class else float(matthews_corrcoef(y, dd))
    return LevelMetrics(
        level=level, n=int(y.size), n_positive=int(np.sum(y == 1)),
        n_negative=int(np.sum(y == 0)), n_invalid=int(np.sum(~valid)), mcc=mcc,
        accuracy=float(np.mean(dd == y)), balanced_accuracy=0.5 * (tpr + tnr),
        tpr=tpr, tnr=tnr)


def simulate_many(
    images: Sequence[Image.Image],
    labels,
    predict_fns: Mapping[str, Callable[[list[Image.Image]], Sequence[float] | np.ndarray]],
    *,
    levels: Sequence[int] = LEVELS,
    seed: int = 0,
    flips: bool = True,
    batch_size: int = 64,
    n_windows: int = 20000,
    progress: Progress = no_progress,
) -> dict[str, ValidatorReport]:
    """`simulate` for several predictors on the same augmented images (augmented once);
    ``progress`` hears ``("validator simulator", images done, images x levels)``."""
    y = np.asarray(labels).ravel()
    if len(images) != y.size:
        raise BadInputError(f"{len(images)} images for {y.size} labels")
    if not np.isin(y, (0, 1)).all():
        raise BadInputError("labels must be 0 (none) or 1 (roadwork)")
    if not predict_fns:
        raise BadInputError("predict_fns is empty")
    y = y.astype(np.int64)
    levels = list(levels)
    if not levels or any(lv not in LEVELS for lv in levels):
        raise BadInputError(f"levels must be a non-empty subset of {LEVELS}, got {levels}")
    probs = {name: np.empty((len(levels), y.size)) for name in predict_fns}
    total = len(levels) * y.size
    for k, lv in enumerate(levels):
        for start in range(0, y.size, batch_size):
            progress("validator simulator", k * y.size + start, total)
            stop = min(start + batch_size, y.size)
            batch = [augment(images[i], lv, np.random.default_rng([seed, lv, i]), flips=flips)
                     for i in range(start, stop)]
            for name, fn in predict_fns.items():
                out = np.asarray(fn(batch), dtype=np.float64).ravel()
                if out.size != stop - start:
                    raise BadInputError(f"predict_fn {name!r} returned {out.size} values for "
                                        f"{stop - start} images")
                probs[name][k, start:stop] = out
    progress("validator simulator", total, total)
    reports = {}
    for name, p in probs.items():
        reward = validator_reward(np.tile(y, len(levels)), p.ravel(), n_windows=n_windows,
                                  rng=np.random.default_rng([seed, 99]))
        reports[name] = ValidatorReport(
            seed=seed, levels=levels, flips=flips, n_images=int(y.size),
            per_level=[_level_metrics(lv, y, p[k]) for k, lv in enumerate(levels)],
            reward=reward)
    return reports


def simulate(
    images: Sequence[Image.Image],
    labels,
    predict_fn: Callable[[list[Image.Image]], Sequence[float] | np.ndarray],
    *,
    levels: Sequence[int] = LEVELS,
    seed: int = 0,
    flips: bool = True,
    batch_size: int = 64,
    n_windows: int = 20000,
) -> ValidatorReport:
    """Augment every image once at every level, ask ``predict_fn`` (a list of decoded
    224x224 JPEG PIL images -> one probability each), and report per-level MCC/accuracy
    and the reward with levels drawn uniformly from ``levels`` (0.25 each for all four,
    as the validator does): every (image, level) answer enters its class's pool once.

    Deterministic for a given ``seed``: image i at level L uses its own generator seeded
    by (seed, L, i), so results depend on neither ``batch_size`` nor the other levels.
    """
    return simulate_many(images, labels, {"model": predict_fn}, levels=levels, seed=seed,
                         flips=flips, batch_size=batch_size, n_windows=n_windows)["model"]
