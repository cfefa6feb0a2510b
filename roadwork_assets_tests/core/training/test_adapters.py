"""LoRA / DoRA through peft on timm ViTs (trainer modes lora, dora): which modules get
adapters, what trains, the merge, and a merged checkpoint that loads and exports to ONNX
with peft unimportable. Random-initialised weight files, saved by the tests in both
formats, stand in for DINOv2/DINOv3 weights."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import timm
import torch

from roadwork_assets.contracts.errors import BadInputError
from roadwork_assets.core.models.adapters import (
    adapter_targets,
    add_adapters,
    merge_adapters,
    route_qkv_through_linear,
    target_module_regex,
)
from roadwork_assets.core.models.classifier import build_classifier
from roadwork_assets.core.training.adapters import attach_adapters
from roadwork_assets.core.training.config import TrainerConfig
from roadwork_assets.core.training.trainer import fit_end_to_end

VIT = "test_vit.r160_in1k"  # timm's tiny ViT (vision_transformer.py, like DINOv2)
IMG = 32


def save_weights(path, name: str = VIT) -> str:
    """Random weights of ``name`` at its native size, as .safetensors or .pth."""
    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in
             timm.create_model(name, pretrained=False, num_classes=0).state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    return str(path)


def easy_images(n: int, size: int = IMG, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [n, 3, size, size]: an orange block (label 1) or a blue one (label 0) on noise."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 60, (n, 3, size, size)).astype(np.uint8)
    y = np.arange(n) % 2
    for i in range(n):
        s = int(rng.integers(size // 4, size // 2))
        r, c = (int(v) for v in rng.integers(0, size - s, 2))
        colour = (250, int(rng.integers(90, 150)), 0) if y[i] else (40, 80, 220)
        x[i, :, r:r + s, c:c + s] = np.array(colour, dtype=np.uint8)[:, None, None]
    return x, y.astype(np.int64)


def _cfg(mode: str, weights: str, **kw) -> TrainerConfig:
    settings = {"epochs": 2, "batch_size": 16, "lr": 3e-3, "threads": 2, "head_dropout": 0.0,
                **kw}
    return TrainerConfig(mode=mode, weights_path=weights, backbone=VIT, img_size=IMG, **settings)


def test_target_regex_selects_block_linears_never_patch_embed():
    model = build_classifier(VIT, img_size=IMG)
    regex = target_module_regex()
    names = adapter_targets(model.backbone, regex)
    n_blocks = len(model.backbone.blocks)
    assert len(names) == 4 * n_blocks
    assert {re.sub(r"blocks\.\d+", "blocks.N", n) for n in names} == {
        "blocks.N.attn.qkv", "blocks.N.attn.proj", "blocks.N.mlp.fc1", "blocks.N.mlp.fc2"}
    assert not re.fullmatch(regex, "patch_embed.proj")
    assert re.fullmatch(regex, "backbone.blocks.11.attn.proj")  # prefixed names too
    only = target_module_regex(["proj"], blocks=[0, 2])
    assert adapter_targets(model.backbone, only) == ["blocks.0.attn.proj", "blocks.2.attn.proj"]
    with pytest.raises(BadInputError, match="subset of"):
        target_module_regex(["q_proj"])


def test_adapter_modes_refuse_a_backbone_without_vit_linears():
    model = build_classifier("test_resnet.r160_in1k", img_size=IMG)
    with pytest.raises(BadInputError, match="need a timm ViT"):
        add_adapters(model, rank=4, alpha=8)


@pytest.mark.parametrize("mode,suffix", [("lora", ".safetensors"), ("dora", ".pth")])
def test_only_adapters_and_head_train_and_the_merge_reproduces_the_adapted_model(
        tmp_path, mode, suffix):
    weights = save_weights(tmp_path / f"vit{suffix}")
    cfg = _cfg(mode, weights, lora_rank=4)
    model = build_classifier(VIT, img_size=IMG, weights_path=weights)
    base = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    head = model.head.weight.detach().clone()
    attached = attach_adapters(model, cfg)
    assert attached["trainable"] < attached["total"] / 5
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in n or n.startswith("head.") for n in trainable), sorted(trainable)[:5]
    assert any("lora_magnitude_vector" in n for n in trainable) == (mode == "dora")
    adapters0 = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    x, y = easy_images(96)
    fit_end_to_end(model, cfg, x[:64], y[:64], x[64:], y[64:])
    after = {n: p.detach() for n, p in model.named_parameters()}
    for name, p in model.backbone.get_base_model().state_dict().items():
        if "lora_" not in name:  # every pretrained tensor unchanged
            assert torch.equal(p, base[name.replace(".base_layer", "")]), name
    assert any(not torch.equal(adapters0[n], after[n]) for n in adapters0)
    assert not torch.equal(head, model.head.weight)
    probe = torch.from_numpy(x[64:80]).float() / 255
    with torch.no_grad():
        adapted = model.eval()(probe)
    merge_adapters(model)
    assert type(model.backbone).__name__ == "VisionTransformer"
    assert set(model.backbone.state_dict()) == set(base)
    with torch.no_grad():
        merged = model(probe)
    assert torch.allclose(merged, adapted, atol=1e-4), float((merged - adapted).abs().max())
    assert not torch.equal(model.backbone.state_dict()["blocks.0.attn.qkv.weight"],
                           base["blocks.0.attn.qkv.weight"])


def test_dinov3_qkvb_qkv_adapter_is_used_and_merges():
    """EvaAttention with q/k/v biases uses F.linear on qkv.weight, bypassing a LoRA
    wrapper; while adapted it is routed through qkv(x) + bias, then restored."""
    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch16_dinov3_qkvb", pretrained=False, num_classes=0,
                            img_size=IMG, depth=2, embed_dim=64, num_heads=2)
    for name, p in vit.named_parameters():
        if "gamma" in name:  # layer scale starts at 1e-5: make the blocks matter
            p.data.fill_(1.0)
    from roadwork_assets.core.models.classifier import RoadworkClassifier

    model = RoadworkClassifier(vit).eval()
    x = torch.rand(2, 3, IMG, IMG)
    with torch.no_grad():
        ref = model(x)
    add_adapters(model, rank=4, alpha=8, targets=["qkv"])
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    with torch.no_grad():
        adapted = model(x)
        assert (adapted - ref).abs().max() > 1e-3  # the adapter on qkv is in the path
        route_qkv_through_linear(model.backbone, through=False)
        assert torch.allclose(model(x), ref, atol=1e-6)  # timm's own path bypasses it
        route_qkv_through_linear(model.backbone, through=True)
    merge_adapters(model)
    assert all(not m.qkv_bias_separate for m in model.modules() if hasattr(m, "q_bias"))
    with torch.no_grad():
        assert torch.allclose(model(x), adapted, atol=1e-5)


def test_merged_checkpoint_loads_and_exports_onnx_without_peft(tmp_path):
    from roadwork_assets.core.training.pipeline import train_checkpoint

    weights = save_weights(tmp_path / "vit.safetensors")
    cfg = _cfg("lora", weights, epochs=1)
    x, y = easy_images(64)
    from roadwork_assets.core.training.pipeline import weights_fingerprint

    def cache(xs, ys, split):
        return {"features": xs, "labels": ys.astype(np.int8), "kind": np.array("preprocessed_images"),
                "backbone": np.array(VIT), "img_size": np.array(IMG), "n_views": np.array(2),
                "weights_sha256": np.array(weights_fingerprint(cfg)),
                "data_version": np.array(f"d-{split}"), "assignment_version": np.array("a1")}

    dest = tmp_path / "model.pt"
    calls = []
    train_checkpoint({"train": cache(x[:48], y[:48], "train"),
                      "val_select": cache(x[48:], y[48:], "val_select")}, cfg, dest,
                     progress=lambda *c: calls.append(c))
    assert calls[0] == ("train epochs", 0, 1) and calls[-1] == ("train epochs", 1, 1)  # LoRA too
    script = textwrap.dedent(f"""
        import sys
        sys.modules["peft"] = None  # any peft import now fails
        from pathlib import Path
        import torch
        from roadwork_assets.core.training.checkpoint import load_checkpoint
        from roadwork_assets.core.training.pipeline import model_from_checkpoint
        from roadwork_assets.core.export.onnx_export import export_onnx
        payload = load_checkpoint(Path({str(dest)!r}))
        assert payload["mode"] == "lora" and payload["adapter"]["merged"], payload["adapter"]
        assert not any("lora" in k for k in payload["model_state_dict"])
        model, cfg = model_from_checkpoint(payload)
        export_onnx(model, cfg.img_size, Path({str(tmp_path / 'model.onnx')!r}))
        import onnxruntime as ort
        import numpy as np
        x = np.random.default_rng(0).random((2, 3, {IMG}, {IMG}), dtype=np.float32)
        sess = ort.InferenceSession({str(tmp_path / 'model.onnx')!r})
        z = sess.run(None, {{sess.get_inputs()[0].name: x}})[0]
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        print("gap", float(np.abs(z - ref).max()))
        assert np.abs(z - ref).max() < 1e-3
        assert "peft" not in [m for m in sys.modules if sys.modules[m] is not None]
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "gap" in proc.stdout
