"""ExPLoRA: the continued self-distillation learns on a tiny run, trains what it says
(one block in full, LoRA elsewhere, merged away), and the adapted_backbone artifact is
cheap outside mode explora and refused by a checkpoint of other settings or splits."""

from __future__ import annotations

import time

import pytest
import torch

from roadwork_assets.contracts.errors import BadInputError, LeakageError
from roadwork_assets.core.models.classifier import build_classifier
from roadwork_assets.core.training.adapted_backbone import (
    adapted_state_for,
    build_adapted_backbone,
    load_adapted_backbone,
    unlabelled_images,
)
from roadwork_assets.core.training.config import TrainerConfig
from roadwork_assets.core.training.explora import dino_loss, pretrain_explora, resolve_blocks
from roadwork_assets_tests.core.training.test_adapters import IMG, VIT, easy_images, save_weights


def _cfg(weights: str, mode: str = "explora", **kw) -> TrainerConfig:
    settings = {"batch_size": 32, "threads": 2, "explora_epochs": 4, "explora_lr": 1e-3,
                "explora_prototypes": 64, "explora_teacher_momentum": 0.99, **kw}
    return TrainerConfig(mode=mode, weights_path=weights, backbone=VIT, img_size=IMG, **settings)


def _cache(n: int = 96, assignment: str = "a1") -> dict:
    import numpy as np

    x, y = easy_images(n)
    return {"features": x, "labels": y.astype(np.int8), "kind": np.array("preprocessed_images"),
            "backbone": np.array(VIT), "img_size": np.array(IMG), "n_views": np.array(2),
            "data_version": np.array("d-train"), "assignment_version": np.array(assignment)}


def test_resolve_blocks_and_loss_shape():
    assert resolve_blocks(6, [-1, 0, 5]) == [0, 5]
    with pytest.raises(BadInputError, match="has 6 blocks"):
        resolve_blocks(6, [6])
    t = [torch.randn(4, 8), torch.randn(4, 8)]
    loss, entropy = dino_loss([t[0].clone(), t[1].clone()], t, torch.zeros(8))
    assert loss >= entropy - 1e-5  # cross-entropy = entropy + KL


def test_self_distillation_closes_the_kl_and_trains_one_block_plus_lora(tmp_path):
    weights = save_weights(tmp_path / "vit.safetensors")
    cfg = _cfg(weights)
    model = build_classifier(VIT, img_size=IMG, weights_path=weights)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    x, _ = easy_images(128)
    calls = []
    result = pretrain_explora(model, x, cfg, progress=lambda *c: calls.append(c))
    epochs = cfg.explora_epochs
    assert calls == [("explora epochs", e, epochs) for e in range(epochs + 1)]
    kl = [row["ssl_kl"] for row in result.history]
    assert kl[-1] < kl[0], result.history  # the student closes on the teacher
    assert result.unfrozen_blocks == [len(model.backbone.blocks) - 1]
    assert result.n_adapted_modules == 4 * (len(model.backbone.blocks) - 1)
    assert set(result.state_dict) == set(before)  # merged: plain timm keys
    last = f"blocks.{result.unfrozen_blocks[0]}."
    changed = {k for k in before if not torch.equal(before[k], result.state_dict[k])}
    assert {k for k in before if k.startswith(last) and "ls" not in k} <= changed
    assert "blocks.0.attn.qkv.weight" in changed  # LoRA, merged
    for frozen in ("patch_embed.proj.weight", "pos_embed", "cls_token", "blocks.0.attn.qkv.bias"):
        assert frozen not in changed, frozen


def test_not_explora_writes_a_record_in_milliseconds(tmp_path):
    weights = save_weights(tmp_path / "vit.pth")
    dest = tmp_path / "backbone.pt"
    t0 = time.perf_counter()
    meta = build_adapted_backbone(_cache(), _cfg(weights, mode="lora"), dest)
    assert time.perf_counter() - t0 < 0.5
    loaded, state = load_adapted_backbone(dest)
    assert loaded == meta and not meta.used and state == {}
    with pytest.raises(BadInputError, match="holds no weights"):
        adapted_state_for(dest, _cfg(weights), "a1")


def test_adapted_backbone_is_refused_across_assignments_and_weights(tmp_path):
    weights = save_weights(tmp_path / "vit.safetensors")
    dest = tmp_path / "backbone.pt"
    meta = build_adapted_backbone(_cache(64), _cfg(weights, explora_epochs=1), dest)
    assert meta.used and meta.splits_read == ["train"] and meta.n_train_images == 64
    state, record = adapted_state_for(dest, _cfg(weights), "a1")
    assert record["objective"] == "dino_self_distillation" and len(state) > 0
    with pytest.raises(LeakageError, match="another split assignment"):
        adapted_state_for(dest, _cfg(weights), "a2")
    other = save_weights(tmp_path / "other.pth")
    with pytest.raises(BadInputError, match="weights_sha256"):
        adapted_state_for(dest, _cfg(other), "a1")
    with pytest.raises(BadInputError, match="materialize adapted_backbone"):
        adapted_state_for(None, _cfg(weights), "a1")


def test_unlabelled_folder_is_read_and_may_not_overlap_the_labelled_dataset(tmp_path):
    from PIL import Image

    pool = tmp_path / "pool" / "sub"
    pool.mkdir(parents=True)
    x, _ = easy_images(3)
    for i, img in enumerate(x):
        Image.fromarray(img.transpose(1, 2, 0)).save(pool / f"u{i}.png")
    (pool / "notes.txt").write_text("not an image")
    assert [p.name for p in unlabelled_images(tmp_path / "pool")] == ["u0.png", "u1.png", "u2.png"]
    with pytest.raises(LeakageError, match="overlaps the labelled dataset"):
        unlabelled_images(tmp_path / "pool", forbidden_roots=[tmp_path])
    weights = save_weights(tmp_path / "vit.safetensors")
    meta = build_adapted_backbone(
        _cache(32), _cfg(weights, explora_epochs=1, explora_unlabelled_dir=str(tmp_path / "pool")),
        tmp_path / "backbone.pt", forbidden_roots=[tmp_path / "labelled"])
    assert (meta.n_train_images, meta.n_unlabelled_images) == (32, 3)
