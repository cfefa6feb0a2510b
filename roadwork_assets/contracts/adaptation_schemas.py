"""The adapted_backbone artifact (ExPLoRA's continued self-supervised pre-training).

The file (``adapted_backbone/backbone.pt``, read with ``torch.load(weights_only=True)``)
is ``AdaptedBackboneMeta``'s fields plus ``backbone_state_dict``: the timm backbone with
its LoRA merged and its unfrozen blocks updated (plain timm keys), or empty when the
trainer's mode is not explora and the asset only records that it was not used.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

ADAPTED_BACKBONE_SCHEMA_VERSION = 1


class AdaptedBackboneMeta(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    schema_version: Literal[1] = 1
    used: bool = Field(description="False: trainer.mode is not explora; no weights inside")
    reason: str = Field(description="why it was (not) computed")
    mode: str = Field(description="trainer.mode when it was materialized")
    backbone_name: str
    img_size: int
    weights_sha256: str = Field(description="sha256 of the pretrained weights file it "
                                "started from ('' when not used)")
    assignment_version: str = Field(description="the split assignment whose train split it "
                                    "read; a checkpoint on another assignment refuses it")
    data_version: str
    code_version: str
    splits_read: list[str] = Field(description="split partitions whose images it saw: "
                                   "train only")
    n_train_images: int = 0
    n_unlabelled_images: int = 0
    objective: str = Field("", description="the self-supervised objective")
    settings: dict[str, Any] = Field(default_factory=dict,
                                     description="the explora_* and lora_* settings")
    unfrozen_blocks: list[int] = Field(default_factory=list,
                                       description="blocks trained in full")
    n_adapted_modules: int = 0
    trainable_params: int = 0
    history: list[dict[str, float]] = Field(default_factory=list,
                                            description="per-epoch loss and seconds")
