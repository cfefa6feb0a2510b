"""Training-recipe pieces the end-to-end loop switches on from ``TrainerConfig``.

Each piece is a small function or class that can be tested alone:

- ``recipe_loss``: one loss for every target shape. Soft targets t [B, 2] (one-hot,
  label-smoothed or mixed), class weights w, focal exponent gamma:
  ``sum_i sum_j t_ij w_j (1 - p_ij)^gamma (-log p_ij) / sum_i sum_j t_ij w_j``.
  With one-hot targets and gamma 0 this is exactly ``F.cross_entropy(weight=w)`` (the
  loss the trainer used before the recipe existed), so "all switches off" trains as
  before. The loss returns (sum, normaliser) so gradient accumulation can divide k
  micro-batches by the big batch's normaliser and reproduce its gradient exactly.
- ``evidential_loss``: Sensoy et al. (2018) for a Dirichlet head.
- ``mix_batch``: mixup (Zhang et al. 2018) or cutmix (Yun et al. 2019) of a batch and
  its soft targets with lambda ~ Beta(alpha, alpha); cutmix's lambda is corrected to
  the pasted box's area, as in the paper.
- ``sample_weights`` / ``epoch_indices``: class-balanced sampling and hard-negative
  oversampling (train false positives of the previous epoch drawn ``factor`` times as
  often), with replacement; plain shuffling when every weight is equal.
- ``WeightEMA``: exponential moving average of parameters (buffers copied).
- ``resolve_amp``: autocast dtype. CUDA: bf16 where supported, else fp16 (with a
  GradScaler). CPU: bf16 only if a short matmul timing says it is faster here — some
  CPUs have no bf16 units and run it hundreds of times slower; measured once per process.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# ------------------------------------------------------------------------ losses


def soft_targets(labels: torch.Tensor, smoothing: float = 0.0, n_classes: int = 2) -> torch.Tensor:
    """One-hot targets, label-smoothed: (1 - eps) * onehot + eps / K."""
    t = F.one_hot(labels.long(), n_classes).float()
    if smoothing > 0:
        t = t * (1.0 - smoothing) + smoothing / n_classes
    return t


def recipe_loss(logits: torch.Tensor, targets: torch.Tensor, class_weights: torch.Tensor,
                gamma: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of weighted focal/CE terms, normaliser); loss = sum / normaliser."""
    logp = F.log_softmax(logits.float(), dim=1)
    tw = targets * class_weights.view(1, -1)
    terms = -logp
    if gamma > 0:
        terms = terms * (1.0 - logp.exp()).pow(gamma)
    return (tw * terms).sum(), tw.sum()


def evidential_alpha(logits: torch.Tensor) -> torch.Tensor:
    """Dirichlet concentration from the evidential head's outputs (log alpha)."""
    return logits.float().exp()


def _kl_to_uniform_dirichlet(alpha: torch.Tensor) -> torch.Tensor:
    """KL(Dir(alpha) || Dir(1)) per row (Sensoy et al. eq. 5 with beta = 1)."""
    k = alpha.shape[1]
    s = alpha.sum(dim=1)
    return (torch.lgamma(s) - math.lgamma(k) - torch.lgamma(alpha).sum(dim=1)
            + ((alpha - 1) * (torch.digamma(alpha) - torch.digamma(s)[:, None])).sum(dim=1))


def evidential_loss(logits: torch.Tensor, targets: torch.Tensor, *, epoch: int,
                    anneal_epochs: int = 10, kind: str = "mse") -> torch.Tensor:
    """Sensoy et al. (2018) per-sample loss [B] for head outputs ``logits = log alpha``.

    mse (eq. 5): sum_j (y_j - p_j)^2 + p_j (1 - p_j) / (S + 1), p = alpha / S;
    log (eq. 3): sum_j y_j (log S - log alpha_j). Plus lambda_t KL(Dir(alpha~) || Dir(1)),
    alpha~ = y + (1 - y) alpha (the misleading evidence only), lambda_t = min(1, t / T).
    """
    alpha = evidential_alpha(logits)
    s = alpha.sum(dim=1, keepdim=True)
    if kind == "mse":
        p = alpha / s
        data = ((targets - p) ** 2 + p * (1 - p) / (s + 1)).sum(dim=1)
    elif kind == "log":
        data = (targets * (torch.log(s) - torch.log(alpha))).sum(dim=1)
    else:
        raise ValueError(f"evidential loss kind must be 'mse' or 'log', got {kind!r}")
    lam = min(1.0, epoch / max(anneal_epochs, 1))
    alpha_tilde = targets + (1 - targets) * alpha
    return data + lam * _kl_to_uniform_dirichlet(alpha_tilde)


def evidential_uncertainty(logits: np.ndarray) -> np.ndarray:
    """u = K / S in (0, 1] from head outputs log alpha [..., K] (alpha >= 1 => S >= K)."""
    z = np.asarray(logits, dtype=np.float64)
    return z.shape[-1] / np.exp(z).sum(axis=-1)


# ------------------------------------------------------------------------- mixing


def _cut_box(h: int, w: int, lam: float, gen: torch.Generator) -> tuple[int, int, int, int]:
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = (int(v) for v in torch.randint(0, h, (1,), generator=gen).tolist()
              + torch.randint(0, w, (1,), generator=gen).tolist())
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    return y0, y1, x0, x1


def mix_batch(x: torch.Tensor, t: torch.Tensor, *, mixup_alpha: float, cutmix_alpha: float,
              gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(mixed images, mixed targets, lambda): pairs each row with a permuted partner.

    With both alphas > 0, mixup or cutmix is chosen with probability 1/2 per batch.
    Returns the inputs unchanged and lambda 1 when both alphas are 0.
    """
    use_cut = cutmix_alpha > 0 and (mixup_alpha <= 0 or torch.rand(1, generator=gen).item() < 0.5)
    alpha = cutmix_alpha if use_cut else mixup_alpha
    if alpha <= 0:
        return x, t, 1.0
    # Beta(a, a) from a numpy stream seeded by the torch generator (torch's Beta takes none)
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    perm = torch.randperm(x.shape[0], generator=gen)
    if use_cut:
        y0, y1, x0, x1 = _cut_box(x.shape[2], x.shape[3], lam, gen)
        x = x.clone()
        x[:, :, y0:y1, x0:x1] = x[perm][:, :, y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (x.shape[2] * x.shape[3])
    else:
        x = lam * x + (1.0 - lam) * x[perm]
    return x, lam * t + (1.0 - lam) * t[perm], lam


# ----------------------------------------------------------------------- sampling


def sample_weights(labels: np.ndarray, *, class_balanced: bool,
                   hard_negatives: np.ndarray | None = None,
                   hard_negative_factor: float = 1.0,
                   base: np.ndarray | None = None) -> np.ndarray:
    """Per-example draw weights (sum 1). Class-balanced: each class gets half the mass.
    Hard negatives (a boolean mask of train false positives) get ``factor`` x weight.
    ``base``: per-example weights to start from (source balance, core.data.balance);
    class balance then uses each class's base mass, so both hold at once."""
    y = np.asarray(labels).astype(np.int64)
    w = np.ones(y.size, dtype=np.float64) if base is None else np.asarray(base, np.float64)
    if class_balanced:
        mass = np.bincount(y, weights=w, minlength=2)
        w = w / np.maximum(mass[y], 1e-12)
    if hard_negatives is not None and hard_negative_factor != 1.0:
        w = np.where(np.asarray(hard_negatives, bool) & (y == 0), w * hard_negative_factor, w)
    return w / w.sum()


def epoch_indices(weights: np.ndarray, gen: torch.Generator) -> torch.Tensor:
    """One epoch's order: a permutation when weights are uniform (today's behaviour),
    otherwise len(weights) draws with replacement."""
    n = len(weights)
    if np.allclose(weights, 1.0 / n):
        return torch.randperm(n, generator=gen)
    return torch.multinomial(torch.from_numpy(weights), n, replacement=True, generator=gen)


# ---------------------------------------------------------------------------- EMA


class WeightEMA:
    """ema <- decay * ema + (1 - decay) * param after each optimizer step; buffers
    (BatchNorm statistics) are copied, not averaged."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.model = _clone_module(model)
        self.steps = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for e, p in zip(self.model.parameters(), model.parameters(), strict=True):
            e.mul_(self.decay).add_(p.detach(), alpha=1.0 - self.decay)
        for e, b in zip(self.model.buffers(), model.buffers(), strict=True):
            e.copy_(b)
        self.steps += 1


def _clone_module(model: nn.Module) -> nn.Module:
    import copy

    clone = copy.deepcopy(model)
    for p in clone.parameters():
        p.requires_grad_(False)
    return clone.eval()


# ---------------------------------------------------------------------------- AMP


@dataclass(frozen=True)
class AmpDecision:
    dtype: str  # "float32", "bfloat16" or "float16"
    reason: str
    fp32_seconds: float | None = None
    bf16_seconds: float | None = None

    @property
    def enabled(self) -> bool:
        return self.dtype != "float32"

    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def autocast(self, device: torch.device):
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.torch_dtype())


def _time_matmul(dtype: torch.dtype, n: int, repeats: int) -> float:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(dtype)
    b = torch.randn(n, n, generator=gen).to(dtype)
    a @ b  # warm-up (kernel selection, page faults)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return best


@functools.lru_cache(maxsize=1)
def measure_cpu_bf16(n: int = 256, repeats: int = 5, speedup: float = 1.2) -> AmpDecision:
    """bf16 on this CPU iff an n x n matmul in bf16 is ``speedup`` x faster than fp32.

    A CPU without bf16 units emulates it (hundreds of times slower): a first probe at
    n = 64 stops before the full timing can take long.
    """
    if _time_matmul(torch.bfloat16, 64, 1) > 50 * _time_matmul(torch.float32, 64, 1) + 1e-3:
        return AmpDecision("float32", "cpu bf16 matmul >50x slower than fp32 at n=64 (no bf16 units)")
    t32 = _time_matmul(torch.float32, n, repeats)
    t16 = _time_matmul(torch.bfloat16, n, repeats)
    use = t16 * speedup < t32
    verdict = "faster" if use else "not faster"
    return AmpDecision("bfloat16" if use else "float32",
                       f"cpu bf16 matmul {verdict}: {t32 / t16:.2f}x fp32 at n={n}", t32, t16)


def resolve_amp(amp: str, device: torch.device) -> AmpDecision:
    """``amp`` in {off, auto, bf16, fp16} -> the dtype the trainer autocasts to.

    CPU never gets fp16 and gets bf16 only where ``measure_cpu_bf16`` says it is faster
    (also when bf16 is asked for explicitly: the CPUs here differ by 1000x).
    """
    if amp == "off":
        return AmpDecision("float32", "amp off")
    if device.type == "cuda":
        if amp == "fp16":
            return AmpDecision("float16", "cuda fp16 (GradScaler)")
        if torch.cuda.is_bf16_supported():
            return AmpDecision("bfloat16", "cuda bf16 supported")
        return AmpDecision("float16", "cuda without bf16: fp16 (GradScaler)")
    if amp == "fp16":
        return AmpDecision("float32", "fp16 autocast is CUDA-only here; cpu trains in fp32")
    return measure_cpu_bf16()
