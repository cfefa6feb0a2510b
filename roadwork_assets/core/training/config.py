"""Trainer configuration (pydantic): one object for both backbone modes."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import ConfigDict, Field, model_validator

from roadwork_assets.core.training.adapter_config import PRETRAINED_MODES, AdapterSettings

DEFAULT_BACKBONE = "test_resnet.r160_in1k"  # timm's 0.4M-parameter ResNet: trains on CPU
DEFAULT_FROZEN_BACKBONE = "vit_small_patch14_dinov2.lvd142m"


class TrainerConfig(AdapterSettings):
    """Every training setting, defined once: ``defs.resources.TrainerResource`` inherits
    these fields (defaults, bounds, descriptions, validators) for the Dagster launchpad.
    The adapter settings (lora_*, explora_*) come from ``AdapterSettings``."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["end_to_end", "frozen", "lora", "dora", "explora"] = Field(
        "end_to_end",
        description="end_to_end: small backbone trained from scratch (CPU default); "
        "frozen: pretrained ViT from weights_path, cached embeddings, trained head; "
        "lora / dora: peft adapters on the pretrained ViT + head, merged before saving; "
        "explora: lora from the adapted_backbone asset (continued self-supervision)",
    )
    backbone: str = DEFAULT_BACKBONE
    weights_path: str | None = Field(
        None, description="local timm weights file (frozen, lora, dora, explora modes)")
    img_size: int = Field(128, ge=16, le=1024)
    epochs: int = Field(14, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.02, ge=0)
    patience: int = Field(5, ge=1, description="epochs without val_select improvement")
    head_dropout: float = Field(0.1, ge=0, lt=1)
    n_views: int = Field(2, ge=1, le=4, description="test-time views stored per image")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(None, ge=1, description="torch CPU threads; None = torch default")
    launcher: Literal["in_process", "torchrun"] = Field(
        "in_process", description="how the checkpoint step trains: in_process (in the "
        "Dagster step) or torchrun (an external `torchrun --standalone` process launched "
        "through Dagster Pipes, DistributedDataParallel over nproc_per_node ranks; gloo on "
        "CPU, nccl on CUDA; docs/scaling.md)")
    nproc_per_node: int = Field(1, ge=1, le=64, description="launcher=torchrun: ranks "
                                "(processes; one GPU each on CUDA) on this node")
    compile: bool = Field(False, description="torch.compile the model for training, embedding "
                          "and logits (core.training.compile); for embedding it is a torch-"
                          "engine option: auto then keeps torch, onnx runs uncompiled")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune",
                          "max-autotune-no-cudagraphs"] = "default"
    compile_fullgraph: bool = Field(False, description="fail on any graph break instead of "
                                    "running the break in Python")
    compile_dynamic: bool | None = Field(None, description="None: torch decides (dynamic after "
                                         "a shape change); True/False force it")
    embed_engine: Literal["auto", "torch", "onnx"] = Field(
        "auto", description="frozen mode's embedding step (the backbone's features of every "
        "view): torch, onnx (ONNX Runtime on the CPU, refused unless its features match "
        "torch's within fp32 rounding on a probe batch), or auto (ONNX Runtime when the "
        "device is the CPU, compile is off, it matches and a short timing says it is "
        "faster; else torch). compile is a torch-engine option (core.training.embed_engine)")
    attn_impl: Literal["sdpa", "eager", "triton"] = Field(
        "sdpa", description="triton: core.models.triton_attention in timm ViT/EVA attention "
        "(CUDA; on CPU it needs TRITON_INTERPRET=1, else SDPA with a warning)")
    # a plain default, not a default_factory: Dagster's config schema (TrainerResource)
    # shows only plain defaults in the launchpad; pydantic copies it per instance
    probe_cs: list[float] = Field(
        [0.01, 0.1, 1.0, 10.0],
        description="frozen mode: inverse L2 strengths swept on val_select",
    )
    seed: int = 0
    # --- training recipe (issue 11.4): every switch off / today's behaviour by default;
    # benchmarks/bench_recipe.py measures each one on val_select
    head: Literal["linear", "evidential"] = Field(
        "linear", description="linear: two softmax logits; evidential: Dirichlet head "
        "(Sensoy et al. 2018) whose outputs are log alpha, so softmax gives alpha / S")
    evidential_loss: Literal["mse", "log"] = Field(
        "mse", description="evidential head: expected-MSE or log loss, plus annealed KL")
    evidential_anneal_epochs: int = Field(
        10, ge=1, description="evidential KL weight min(1, epoch / this)")
    focal_gamma: float = Field(0.0, ge=0, description="focal loss exponent; 0 = cross-entropy")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="target = (1-eps) onehot + eps/2")
    mixup_alpha: float = Field(0.0, ge=0, description="mixup Beta(a, a); 0 = off")
    cutmix_alpha: float = Field(0.0, ge=0, description="cutmix Beta(a, a); 0 = off "
                                "(both on: one of the two per batch, 50/50)")
    sampler: Literal["shuffle", "class_balanced"] = Field(
        "shuffle", description="class_balanced draws each class half the time (with "
        "replacement) and drops the class-weighted loss")
    hard_negative_factor: float = Field(
        1.0, ge=1, description="> 1: after each epoch, train negatives the model calls "
        "positive are drawn this many times as often in the next epoch")
    grad_accum_steps: int = Field(1, ge=1, description="micro-batches of batch_size per "
                                  "optimizer step (same gradient as one batch k x larger)")
    ema_decay: float = Field(0.0, ge=0, lt=1, description="EMA of weights; 0 = off. When on, "
                             "the EMA weights are selected on val_select and saved")
    amp: Literal["off", "auto", "bf16", "fp16"] = Field(
        "off", description="autocast: CUDA bf16 (fp16 where unsupported); CPU bf16 only if "
        "a matmul timing shows bf16 units (measured once per process, recorded in the "
        "checkpoint)")
    augment: Literal["light", "validator"] = Field(
        "light", description="light: flip/shift/brightness; validator: StreetVision L0-L3 "
        "(rotation, crop to 0.2, h+v flips, colour, down-up, noise, blur, JPEG q75), in "
        "training and in val_select scoring")
    mc_dropout_passes: int = Field(
        0, ge=0, le=64, description="logits: T passes with head dropout on; their variance "
        "of P(roadwork) is stored as an uncertainty signal (0 = off)")

    @model_validator(mode="after")
    def _frozen_needs_weights(self) -> TrainerConfig:
        if self.mode in PRETRAINED_MODES and not self.weights_path:
            raise ValueError(
                f"mode={self.mode!r} needs weights_path: a local DINOv2/DINOv3 weights file "
                "(a randomly initialised frozen ViT gives chance-level features)"
            )
        return self

    def resolved_device(self) -> torch.device:
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' requested but torch sees no CUDA device")
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def apply_threads(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
