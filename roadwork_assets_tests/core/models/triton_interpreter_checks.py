"""Checks of the Triton attention kernel that must run under ``TRITON_INTERPRET=1``.

Triton reads ``TRITON_INTERPRET`` when a kernel is defined (module import), so these
run in a fresh process (``test_triton_attention.py`` starts it) with the variable set
before anything imports triton; each check returns its largest error, and the parent
compares it with the stated tolerance. Run by hand:

    TRITON_INTERPRET=1 .venv/bin/python -m roadwork_assets_tests.core.models.triton_interpreter_checks
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.nn.functional as F

# (B, H, N, D, block_m, block_n): N=50 is ViT 7x7+CLS, 197 ViT-B/16 at 224, 17 and D=24
# exercise row/key masking inside one tile and the padded head dim
SHAPES = [(2, 3, 50, 64, 16, 16), (1, 2, 197, 64, 64, 64), (2, 2, 17, 24, 16, 32),
          (1, 1, 64, 32, 32, 16), (3, 2, 33, 40, 16, 64)]


def _qkv(shape, seed, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen).requires_grad_(requires_grad) for _ in range(3)]


def forward_errors() -> dict[str, float]:
    from roadwork_assets.core.models.triton_attention import flash_attention

    out = {}
    for i, (b, h, n, d, bm, bn) in enumerate(SHAPES):
        q, k, v = _qkv((b, h, n, d), i)
        got = flash_attention(q, k, v, block_m=bm, block_n=bn)
        out[f"B{b}H{h}N{n}D{d}/{bm}x{bn}"] = float((got - F.scaled_dot_product_attention(q, k, v))
                                               .abs().max())
    # strided q, k, v straight from a fused qkv projection (timm's layout), and a scale
    qkv = torch.randn(2, 50, 3, 2, 32).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    got = flash_attention(q, k, v, scale=0.3, block_m=16, block_n=32)
    out["strided_scale0.3"] = float((got - F.scaled_dot_product_attention(q, k, v, scale=0.3))
                                    .abs().max())
    return out


def gradient_errors() -> dict[str, float]:
    from roadwork_assets.core.models.triton_attention import flash_attention

    out = {}
    for i, (b, h, n, d, bm, bn) in enumerate(SHAPES[:3]):
        q, k, v = _qkv((b, h, n, d), 100 + i, requires_grad=True)
        g = torch.randn(b, h, n, d, generator=torch.Generator().manual_seed(i))
        got = torch.autograd.grad(flash_attention(q, k, v, block_m=bm, block_n=bn), (q, k, v), g)
        ref = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v), (q, k, v), g)
        out[f"B{b}H{h}N{n}D{d}"] = max(float((a - r).abs().max()) for a, r in zip(got, ref))
    return out


def vit_errors() -> dict[str, float]:
    """test_vit at 112 px (7x7 patches + CLS = 50 tokens, head dim 32) and a small EVA
    with rotary embeddings and register tokens: triton vs sdpa, forward and gradients."""
    from timm.models.eva import Eva

    from roadwork_assets.core.models.classifier import build_classifier, set_attention_impl

    torch.manual_seed(0)
    out = {}
    vit = build_classifier("test_vit", img_size=112)
    eva = Eva(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=0,
              use_rot_pos_emb=True, num_reg_tokens=2)
    for name, model, x in (("vit", vit, torch.rand(2, 3, 112, 112)),
                           ("eva", eva, torch.rand(2, 3, 32, 32))):
        model.eval()
        ref = model(x)
        ref_grads = torch.autograd.grad(ref.square().sum(), list(model.parameters()))
        out[f"{name}_swapped"] = float(set_attention_impl(model, "triton"))
        got = model(x)
        grads = torch.autograd.grad(got.square().sum(), list(model.parameters()))
        out[f"{name}_forward"] = float((got - ref).detach().abs().max())
        # one relative error over all parameter gradients: a per-tensor ratio blows up on
        # near-zero bias gradients (eager vs sdpa differ there by the same 1e-2 relative)
        diff = torch.cat([(a - r).flatten() for a, r in zip(grads, ref_grads)])
        norm = torch.cat([r.flatten() for r in ref_grads])
        out[f"{name}_grad_rel"] = float(diff.norm() / norm.norm())
    return out


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("set TRITON_INTERPRET=1 before running these checks")
    print(json.dumps({"forward": forward_errors(), "gradient": gradient_errors(),
                      "vit": vit_errors()}))


if __name__ == "__main__":
    main()
