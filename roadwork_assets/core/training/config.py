"""Trainer configuration (pydantic): one object for both backbone modes."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

DEFAULT_BACKBONE = "test_resnet.r160_in1k"  # timm's 0.4M-parameter ResNet: trains on CPU
DEFAULT_FROZEN_BACKBONE = "vit_small_patch14_dinov2.lvd142m"


class TrainerConfig(BaseModel):
    """Every training setting, defined once: ``defs.resources.TrainerResource`` inherits
    these fields (defaults, bounds, descriptions, validators) for the Dagster launchpad."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["end_to_end", "frozen"] = Field(
        "end_to_end",
        description="end_to_end: small backbone trained from scratch (CPU default); "
        "frozen: pretrained ViT from weights_path, cached embeddings, trained head",
    )
    backbone: str = DEFAULT_BACKBONE
    weights_path: str | None = Field(None, description="local timm weights file (frozen mode)")
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
    compile: bool = Field(False, description="torch.compile the model for training")
    attn_impl: Literal["sdpa", "eager"] = "sdpa"
    # a plain default, not a default_factory: Dagster's config schema (TrainerResource)
    # shows only plain defaults in the launchpad; pydantic copies it per instance
    probe_cs: list[float] = Field(
        [0.01, 0.1, 1.0, 10.0],
        description="frozen mode: inverse L2 strengths swept on val_select",
    )
    seed: int = 0

    @model_validator(mode="after")
    def _frozen_needs_weights(self) -> TrainerConfig:
        if self.mode == "frozen" and not self.weights_path:
            raise ValueError(
                "mode='frozen' needs weights_path: a local DINOv2/DINOv3 weights file "
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
