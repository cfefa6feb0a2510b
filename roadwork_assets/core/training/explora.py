"""ExPLoRA (Khanna et al., arXiv 2406.10973): continue the backbone's self-supervised
pre-training on unlabelled in-domain images, with one or two ViT blocks trained in full
and LoRA on every other block, then fine-tune from the result (mode ``explora``).

Objective: DINO-style self-distillation, not MAE. DINOv2 and DINOv3 were pre-trained by
self-distillation (DINO + iBOT), so continuing that objective keeps the features close to
what the weights were trained for; MAE would swap in a pixel-reconstruction objective
they never saw. Neither head ships with the public weights (DINOv2/v3 files carry the
backbone only: no DINO projection head, and there never was an MAE decoder), but a
fresh DINO head is a small MLP that trains in a few steps, while an MAE decoder is a
transformer of its own that must learn to reconstruct pixels before its gradients mean
anything — far beyond a CPU budget at tiny sizes. So: a student (backbone with LoRA +
unfrozen blocks + a fresh projection head), an EMA teacher (a copy, updated only by
EMA), two augmented global views per image (random resized crop, flip, colour jitter,
grayscale), and the DINO loss: cross-entropy from the teacher's centred, sharpened
softmax on one view to the student's softmax on the other. Local crops, iBOT's masked
patch loss and KoLeo are left out (cost; the tiny runs here cannot use them).

Only images are read: the labels of the train split are never looked at.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from roadwork_assets.contracts.errors import BadInputError
from roadwork_assets.core.data.transforms import to_float
from roadwork_assets.core.models.adapters import merge_adapters
from roadwork_assets.core.models.classifier import RoadworkClassifier
from roadwork_assets.core.progress import Progress, no_progress
from roadwork_assets.core.training.adapters import attach_adapters
from roadwork_assets.core.training.config import TrainerConfig

PROGRESS_STAGE = "explora epochs"
OBJECTIVE = "dino_self_distillation"
STUDENT_TEMP = 0.1
TEACHER_TEMP = 0.04
CENTER_MOMENTUM = 0.9
CROP_SCALE = (0.35, 1.0)


@dataclass
class ExploraResult:
    state_dict: dict[str, torch.Tensor]  # the backbone, adapters merged: plain timm keys
    unfrozen_blocks: list[int]
    n_adapted_modules: int
    trainable_params: int
    history: list[dict[str, float]] = field(default_factory=list)


class DinoHead(nn.Module):
    """DINO's projection head, small: MLP -> L2-normalised bottleneck -> cosine
    similarity to ``out_dim`` learned prototypes."""

    def __init__(self, dim: int, out_dim: int, hidden: int = 256, bottleneck: int = 64) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden),
                                 nn.GELU(), nn.Linear(hidden, bottleneck))
        self.prototypes = nn.Parameter(torch.randn(out_dim, bottleneck) * 0.02)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        z = F.normalize(self.mlp(feats), dim=-1)
        return F.linear(z, F.normalize(self.prototypes, dim=-1))


def resolve_blocks(n_blocks: int, indices: list[int]) -> list[int]:
    """Python-style block indices (-1 = last) -> sorted distinct non-negative ones."""
    out = set()
    for i in indices:
        if not -n_blocks <= i < n_blocks:
            raise BadInputError(f"trainer.explora_unfrozen_blocks has {i}, but the backbone "
                                f"has {n_blocks} blocks (valid: {-n_blocks}..{n_blocks - 1})")
        out.add(i % n_blocks)
    return sorted(out)


def random_view(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One augmented view of a float batch in [0, 1]: random resized crop (area
    CROP_SCALE, aspect 3/4..4/3) with h-flip in one affine resample, then brightness /
    contrast / saturation jitter and grayscale with p = 0.2."""
    b = x.shape[0]
    area = torch.empty(b).uniform_(*CROP_SCALE, generator=gen)
    ratio = torch.exp(torch.empty(b).uniform_(math.log(3 / 4), math.log(4 / 3), generator=gen))
    sw, sh = (area * ratio).sqrt().clamp(max=1.0), (area / ratio).sqrt().clamp(max=1.0)
    flip = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = sw * flip, sh
    theta[:, 0, 2] = (torch.rand(b, generator=gen) * 2 - 1) * (1 - sw)
    theta[:, 1, 2] = (torch.rand(b, generator=gen) * 2 - 1) * (1 - sh)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    v = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    def jitter(strength: float) -> torch.Tensor:
        return 1.0 + (torch.rand(b, 1, 1, 1, generator=gen) - 0.5) * 2 * strength

    gray = v.mean(dim=1, keepdim=True)
    v = gray + (v - gray) * jitter(0.4)  # saturation
    mean = v.mean(dim=(1, 2, 3), keepdim=True)
    v = (v - mean) * jitter(0.4) + mean * jitter(0.4)  # contrast, brightness
    to_gray = (torch.rand(b, 1, 1, 1, generator=gen) < 0.2).float()
    v = to_gray * v.mean(dim=1, keepdim=True).expand_as(v) + (1 - to_gray) * v
    return v.clamp_(0.0, 1.0)


def dino_loss(student: list[torch.Tensor], teacher: list[torch.Tensor],
              center: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, teacher entropy): the loss is the mean over ordered view pairs (i != j) of
    H(teacher_i, student_j), the teacher's centred softmax at TEACHER_TEMP against the
    student's log-softmax at STUDENT_TEMP. Cross-entropy = teacher entropy + KL; the
    entropy moves with the centre, so ``loss - entropy`` (the KL the student closes) is
    the number that shows learning."""
    total, entropy, pairs = student[0].new_zeros(()), student[0].new_zeros(()), 0
    for i, t in enumerate(teacher):
        q = F.softmax((t - center) / TEACHER_TEMP, dim=-1)
        h = (-q * torch.log(q.clamp_min(1e-12))).sum(-1).mean()
        for j, s in enumerate(student):
            if i != j:
                total = total + (-q * F.log_softmax(s / STUDENT_TEMP, dim=-1)).sum(-1).mean()
                entropy, pairs = entropy + h, pairs + 1
    return total / pairs, entropy / pairs


def prepare_student(model: RoadworkClassifier, cfg: TrainerConfig) -> dict[str, object]:
    """LoRA on every block but the unfrozen ones, those trained in full, LayerNorms
    trainable; in place. Returns the resolved unfrozen blocks and counts."""
    n_blocks = len(model.backbone.blocks)
    unfrozen = resolve_blocks(n_blocks, cfg.explora_unfrozen_blocks)
    lora_blocks = [i for i in range(n_blocks) if i not in unfrozen]
    attached = attach_adapters(model, cfg, blocks=lora_blocks) if lora_blocks else {"modules": []}
    base = model.backbone.get_base_model() if lora_blocks else model.backbone
    for p in base.parameters():
        p.requires_grad_(False)
    for name, p in base.named_parameters():
        in_unfrozen = any(name.startswith(f"blocks.{i}.") for i in unfrozen)
        if in_unfrozen or "lora_" in name or ".norm" in name or name.startswith("norm."):
            p.requires_grad_(True)
    for p in model.head.parameters():  # the classifier head plays no part here
        p.requires_grad_(False)
    trainable = sum(p.numel() for p in model.backbone.parameters() if p.requires_grad)
    return {"unfrozen": unfrozen, "n_adapted": len(attached["modules"]),
            "trainable": int(trainable)}


@torch.no_grad()
def _ema(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    for (_, t), (_, s) in zip(teacher.named_parameters(), student.named_parameters(),
                              strict=True):
        if s.requires_grad:
            t.mul_(momentum).add_(s.detach(), alpha=1 - momentum)


def pretrain_explora(model: RoadworkClassifier, images_uint8: np.ndarray, cfg: TrainerConfig,
                     log: Callable[[dict[str, float]], None] | None = None,
                     progress: Progress = no_progress) -> ExploraResult:
    """Continue self-supervised pre-training of ``model.backbone`` (pretrained weights
    loaded) on ``images_uint8`` [N, 3, S, S]; returns the merged backbone state."""
    if len(images_uint8) < 2:
        raise BadInputError(f"explora needs at least 2 unlabelled images, got {len(images_uint8)}")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    device = cfg.resolved_device()
    prepared = prepare_student(model, cfg)
    student = nn.ModuleDict({"net": model, "head": DinoHead(model.num_features,
                                                            cfg.explora_prototypes)}).to(device)
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.explora_lr, weight_decay=cfg.weight_decay)
    steps = math.ceil(len(images_uint8) / cfg.batch_size) * cfg.explora_epochs
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.explora_lr, total_steps=steps,
                                                pct_start=0.1)
    center = torch.zeros(cfg.explora_prototypes, device=device)
    history: list[dict[str, float]] = []
    progress(PROGRESS_STAGE, 0, cfg.explora_epochs)
    for epoch in range(1, cfg.explora_epochs + 1):
        student.train()
        t0, total, kl = time.perf_counter(), 0.0, 0.0
        perm = torch.randperm(len(images_uint8), generator=gen)
        for start in range(0, len(perm), cfg.batch_size):
            # only this batch's rows are read (the cache may be memory-mapped)
            rows = images_uint8[perm[start : start + cfg.batch_size].numpy()]
            batch = to_float(torch.from_numpy(np.ascontiguousarray(rows)))
            views = [random_view(batch, gen).to(device) for _ in range(2)]
            with torch.no_grad():
                t_out = [teacher["head"](teacher["net"].features(v)) for v in views]
            s_out = [student["head"](student["net"].features(v)) for v in views]
            loss, entropy = dino_loss(s_out, t_out, center)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            _ema(teacher, student, cfg.explora_teacher_momentum)
            with torch.no_grad():
                center.mul_(CENTER_MOMENTUM).add_(torch.cat(t_out).mean(0),
                                                  alpha=1 - CENTER_MOMENTUM)
            total += float(loss.detach()) * len(batch)
            kl += float(loss.detach() - entropy) * len(batch)
        if not math.isfinite(total):
            raise BadInputError(f"explora diverged at epoch {epoch}: lower trainer.explora_lr")
        row = {"epoch": epoch, "ssl_loss": total / len(images_uint8),
               "ssl_kl": kl / len(images_uint8),
               "seconds": time.perf_counter() - t0}
        history.append(row)
        progress(PROGRESS_STAGE, epoch, cfg.explora_epochs)
        if log is not None:
            log(row)
    merge_adapters(model.cpu().eval())
    state = {k: v.detach().clone() for k, v in model.backbone.state_dict().items()}
    return ExploraResult(state_dict=state, unfrozen_blocks=prepared["unfrozen"],
                         n_adapted_modules=prepared["n_adapted"],
                         trainable_params=prepared["trainable"], history=history)
