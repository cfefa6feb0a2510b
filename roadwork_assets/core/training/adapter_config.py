"""Adapter settings (LoRA / DoRA through peft, and ExPLoRA's continued pre-training).

``TrainerConfig`` inherits these fields, so they reach the Dagster launchpad and
``--config-json`` like every other trainer setting; they live here, beside the concept
they configure, so the trainer's own settings stay readable.
"""

from __future__ import annotations

from pydantic import BaseModel, Field, field_validator

# modes that fine-tune a pretrained ViT through adapters (core.models.adapters)
ADAPTER_MODES: tuple[str, ...] = ("lora", "dora", "explora")
# modes that read a local pretrained weights file (ROADWORK_WEIGHTS / weights_path)
PRETRAINED_MODES: tuple[str, ...] = ("frozen", *ADAPTER_MODES)
# the timm ViT linears an adapter may wrap (blocks.N.attn.qkv, ...); patch_embed.proj,
# a Conv2d, is never one of them (see core.models.adapters.target_module_regex)
LORA_TARGETS: tuple[str, ...] = ("qkv", "proj", "fc1", "fc2")


class AdapterSettings(BaseModel):
    """LoRA / DoRA / ExPLoRA settings (read only when ``mode`` is one of ADAPTER_MODES)."""

    lora_rank: int = Field(8, ge=1, le=512, description="lora/dora/explora: adapter rank r")
    lora_alpha: float = Field(16.0, gt=0, description="lora/dora/explora: scaling alpha "
                              "(the update is alpha / r * B A)")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter input")
    lora_targets: list[str] = Field(
        list(LORA_TARGETS), description="ViT linears that get adapters, of qkv (attn.qkv), "
        "proj (attn.proj, never patch_embed.proj), fc1, fc2 (mlp)")
    explora_epochs: int = Field(2, ge=1, description="explora: epochs of continued DINO-style "
                                "self-distillation on unlabelled train(-side) images")
    explora_lr: float = Field(5e-4, gt=0, description="explora: AdamW learning rate of the "
                              "self-supervised phase")
    explora_unfrozen_blocks: list[int] = Field(
        [-1], description="explora: ViT blocks trained in full (Python indices, -1 = last); "
        "every other block gets LoRA on lora_targets")
    explora_prototypes: int = Field(256, ge=8, le=65536, description="explora: output "
                                    "dimension (prototypes) of the fresh DINO projection head")
    explora_teacher_momentum: float = Field(0.996, ge=0, lt=1, description="explora: EMA "
                                            "momentum of the teacher")
    explora_unlabelled_dir: str | None = Field(
        None, description="explora: a folder of extra unlabelled in-domain images (searched "
        "recursively); it must hold no val_select / val_calib / val_test image")

    @field_validator("lora_targets")
    @classmethod
    def _known_targets(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - set(LORA_TARGETS))
        if unknown or not value:
            raise ValueError(f"lora_targets must be a non-empty subset of {list(LORA_TARGETS)}; "
                             f"got {value}")
        return sorted(set(value), key=LORA_TARGETS.index)

    def adapter_record(self, mode: str) -> dict[str, object]:
        """The adapter settings a checkpoint / bundle records for ``mode`` (lora, dora,
        explora); the caller adds what training measured."""
        return {"kind": "dora" if mode == "dora" else "lora", "rank": self.lora_rank,
                "alpha": self.lora_alpha, "dropout": self.lora_dropout,
                "targets": list(self.lora_targets), "merged": True}
