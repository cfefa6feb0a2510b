"""Backbone modes: production (frozen DINOv2 ViT from a local weights file, through the
real loading code) and the attention-implementation switch."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from roadwork_assets.contracts.errors import BadInputError
from roadwork_assets.core.artifacts import read_npz
from roadwork_assets.core.models.classifier import create_backbone, set_attention_impl
from roadwork_assets.core.training.checkpoint import load_checkpoint
from roadwork_assets.core.training.config import TrainerConfig
from roadwork_assets.core.training.pipeline import (
    compute_embeddings,
    compute_logits,
    model_from_checkpoint,
    train_checkpoint,
)
from roadwork_assets_tests.conftest import random_backbone_weights

DINO = "vit_small_patch14_dinov2.lvd142m"


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """A DINOv2 ViT-S/14 state dict at its native 518 px, saved the way users get it."""
    path = tmp_path_factory.mktemp("weights") / "dinov2_vits14.safetensors"
    return random_backbone_weights(DINO, path)


def _images(tmp_path, n=24):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        label = i % 2
        arr = rng.integers(0, 60, (70, 70, 3), dtype=np.uint8)
        if label:  # a bright orange square: separable even with random features
            arr[20:50, 20:50] = (255, 120, 0)
        path = tmp_path / f"img{i}.png"
        Image.fromarray(arr).save(path)
        rows.append({"item_id": f"img{i}", "uri": str(path), "label": label})
    return pd.DataFrame(rows)


def test_frozen_dinov2_loads_local_weights_and_never_updates_them(tmp_path, weights_file):
    from safetensors.torch import load_file

    # embed_engine=torch: the end of this test compares the cache with torch's own forward
    # at 1e-4; ONNX Runtime's features are checked in test_embed_engine.py
    cfg = TrainerConfig(mode="frozen", backbone=DINO, weights_path=str(weights_file),
                        img_size=56, n_views=2, batch_size=8, threads=2, probe_cs=[0.1, 1.0],
                        embed_engine="torch")
    frame = _images(tmp_path)
    caches = {}
    for split, part in (("train", frame.iloc[:16]), ("val_select", frame.iloc[16:])):
        dest = tmp_path / f"emb_{split}.npz"
        summary = compute_embeddings(part.reset_index(drop=True), cfg, dest, split,
                                     "dv-" + split, assignment_version="a1")
        assert summary["kind"] == "backbone_features"
        assert summary["shape"] == [len(part), 2, 384]
        caches[split] = read_npz(dest)
    ckpt = tmp_path / "model.pt"
    calls = []
    result = train_checkpoint(caches, cfg, ckpt, progress=lambda *c: calls.append(c))
    assert calls == [("probe C sweep", i, 2) for i in range(3)]  # probe_cs=[0.1, 1.0]
    payload = load_checkpoint(ckpt)
    assert payload["mode"] == "frozen" and payload["backbone_name"] == DINO
    # the backbone in the checkpoint is exactly the file's weights (pos_embed resampled
    # from 37x37 to 4x4 patches by timm's DINOv2 filter, everything else identical)
    original = load_file(str(weights_file))
    state = payload["model_state_dict"]
    for key in ("blocks.0.attn.qkv.weight", "blocks.11.mlp.fc2.bias", "norm.weight"):
        assert torch.equal(state[f"backbone.{key}"], original[key])
    assert state["backbone.pos_embed"].shape[1] == 1 + 4 * 4
    assert result.select_metrics["auroc"] > 0.9
    logits_path = tmp_path / "logits.npz"
    compute_logits(payload, caches["val_select"], "val_select", logits_path,
                   checkpoint_sha256="c" * 64)
    z = read_npz(logits_path)["logits"]
    assert z.shape == (8, 2, 2) and np.isfinite(z).all()
    # the exported model (backbone + head) on images reproduces the cached-feature logits
    model, _ = model_from_checkpoint(payload)
    from roadwork_assets.core.data.transforms import load_model_arrays, to_float

    imgs = load_model_arrays(frame.iloc[16:]["uri"].tolist(), frame.iloc[16:]["item_id"].tolist(), 56)
    with torch.no_grad():
        direct = model(to_float(torch.from_numpy(imgs))).numpy()
    np.testing.assert_allclose(direct, z[:, 0], atol=1e-4)


def test_stale_caches_and_changed_splits_are_refused(tmp_path, weights_file):
    """A cache made with other settings, or a split assignment that changed since the
    checkpoint was trained (val_test could now hold training images), is refused."""
    from roadwork_assets.contracts.errors import LeakageError

    frame = _images(tmp_path, n=8)
    cfg = TrainerConfig(img_size=32, epochs=1, threads=2)
    caches = {}
    for split, assignment in (("train", "a1"), ("val_select", "a1"), ("val_test", "a2")):
        dest = tmp_path / f"{split}.npz"
        compute_embeddings(frame, cfg, dest, split, "dv", assignment_version=assignment)
        caches[split] = read_npz(dest)
    ckpt = tmp_path / "model.pt"
    train_checkpoint({k: caches[k] for k in ("train", "val_select")}, cfg, ckpt)
    payload = load_checkpoint(ckpt)
    with pytest.raises(LeakageError, match="different split assignment"):
        compute_logits(payload, caches["val_test"], "val_test", tmp_path / "l.npz", "c" * 64)
    with pytest.raises(BadInputError, match="img_size: cache '32' vs trainer '48'"):
        train_checkpoint({k: caches[k] for k in ("train", "val_select")},
                         TrainerConfig(img_size=48, epochs=1), tmp_path / "m2.pt")
    mixed = {"train": caches["train"], "val_select": caches["val_test"]}
    with pytest.raises(LeakageError, match="different split"):
        train_checkpoint(mixed, cfg, tmp_path / "m3.pt")


def test_missing_or_mismatched_weights_are_clear_errors(tmp_path, weights_file):
    with pytest.raises(BadInputError, match="does not exist"):
        create_backbone(DINO, img_size=56, weights_path=tmp_path / "nope.safetensors")
    with pytest.raises(BadInputError, match="does not fit timm model"):
        create_backbone("vit_base_patch14_dinov2.lvd142m", img_size=56, weights_path=weights_file)
    with pytest.raises(ValueError, match="needs weights_path"):
        TrainerConfig(mode="frozen", backbone=DINO)


def test_attention_switch_gives_the_same_outputs():
    torch.manual_seed(0)
    model = create_backbone(DINO, img_size=56).eval()
    x = torch.rand(2, 3, 56, 56)
    assert set_attention_impl(model, "eager") == 12
    with torch.no_grad():
        eager = model(x)
    set_attention_impl(model, "sdpa")
    with torch.no_grad():
        fused = model(x)
    torch.testing.assert_close(eager, fused, atol=1e-4, rtol=1e-4)
    with pytest.raises(BadInputError, match="attn_impl"):
        set_attention_impl(model, "flash")


def test_diverged_training_names_the_epoch_and_the_fix(tmp_path):
    frame = _images(tmp_path, n=8)
    cfg = TrainerConfig(img_size=32, epochs=3, threads=2, lr=1e12)
    caches = {}
    for split in ("train", "val_select"):
        compute_embeddings(frame, cfg, tmp_path / f"{split}.npz", split, "dv", "a1")
        caches[split] = read_npz(tmp_path / f"{split}.npz")
    with pytest.raises(BadInputError, match=r"training diverged at epoch \d .*lower trainer.lr"):
        train_checkpoint(caches, cfg, tmp_path / "model.pt")
    assert not (tmp_path / "model.pt").exists()
