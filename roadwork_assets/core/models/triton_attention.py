"""A flash-attention-style forward kernel in Triton, and its swap into timm attention.

Forward: one program per (BLOCK_M queries, batch x head). It walks the keys in tiles
of BLOCK_N with the online softmax (running max ``m``, running sum ``l``, rescaled
accumulator), all in float32 whatever the input dtype; the [N, N] score matrix never
exists in memory. Inputs are ``[B, H, N, D]`` like ``F.scaled_dot_product_attention``
(no mask, no dropout, ``scale = 1/sqrt(D)`` by default). ``N`` need not be a multiple
of the tile (out-of-range keys are masked to -inf, out-of-range rows are not stored),
and any head dim 1..256 works: ``D`` is padded to the next power of two (>= 16, what
``tl.dot`` needs) with masked loads. fp32 everywhere (fp32 ``tl.dot`` in IEEE
precision, not TF32, so it can be compared with SDPA at 1e-5); fp16/bf16 on a GPU.

Backward: *recomputation*, not a Triton kernel. ``flash_attention`` is a
``torch.library.triton_op`` whose registered autograd formula recomputes the softmax
from the saved q, k, v in float32 torch ops (P = softmax(q k^T s); dV = P^T dO;
dP = dO V^T; dS = P (dP - rowsum(dO * O)); dQ = s dS K; dK = s dS^T Q). That costs an
[N, N] matrix per head in the backward (fine for ViT sequence lengths, 257 at 224 px
with patch 14) and stays traceable by ``torch.compile``.

Measured (``benchmarks/bench_attention.py`` on an NVIDIA H200, B=32, N=257, D=64):
the kernel is correct but slower than PyTorch's SDPA (flash / cuDNN kernels): forward
about 2-3.5x SDPA's time in fp16/bf16 (0.09-0.17 ms vs 0.03-0.05 ms per call) and
3.4x in fp32 (IEEE dot products), forward+backward 4-7x (the recomputation backward).
Inside a compiled ViT-B/14 at batch 32 (bf16 autocast) inference is level with SDPA
(4.90 vs 4.89 ms) and a training step 9% slower (27.3 vs 25.0 ms). Keep ``sdpa`` as
the default; ``triton`` is here to own the kernel (and to change it), not for speed.

Where it runs:
- CUDA tensors: the compiled kernel.
- CPU tensors with ``TRITON_INTERPRET=1`` set *before triton is imported*: Triton's
  interpreter (slow; the tests use it at small shapes).
- CPU tensors otherwise: ``flash_attention`` raises ``RuntimeError`` naming both ways
  out. The timm swap (``attn_impl="triton"``) instead falls back to SDPA with one
  logged warning, because a checkpoint trained on a GPU with the kernel must still
  serve, export and be evaluated on CPU; the attention it computes is the same. During
  ONNX export the swap always uses SDPA (ONNX has no Triton op).
"""

from __future__ import annotations

import logging
import math
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from timm.layers import Attention, apply_rot_embed_cat
from timm.models.eva import EvaAttention
from torch import nn
from torch.library import triton_op, wrap_triton

from roadwork_assets.contracts.errors import BadInputError

log = logging.getLogger(__name__)

DEFAULT_BLOCK_M = 64
DEFAULT_BLOCK_N = 64
MAX_HEAD_DIM = 256


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def kernel_can_run(device: torch.device) -> bool:
    return device.type == "cuda" or (device.type == "cpu" and interpreter_enabled())


@triton.jit
def _flash_fwd_kernel(Q, K, V, Out, sm_scale, stride_b, stride_h, stride_n, H, N, D,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                      PRECISION: tl.constexpr):
    # q, k, v share strides (last dim contiguous); Out is laid out [B, N, H, D] contiguous
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    base = b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < D
    q_mask = (offs_m[:, None] < N) & d_ok
    q = tl.load(Q + base + offs_m[:, None] * stride_n + offs_d[None, :], mask=q_mask, other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # exp(x) = exp2(x * log2(e)); float32 on purpose: under torch.compile inductor passes
    # the scale as a float64 scalar, which would make the loop-carried m_i float64
    qk_scale = tl.cast(sm_scale, tl.float32) * 1.4426950408889634
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + offs_n
        kv_mask = (cols[:, None] < N) & d_ok
        kv_offs = base + cols[:, None] * stride_n + offs_d[None, :]
        k = tl.load(K + kv_offs, mask=kv_mask, other=0.0)
        v = tl.load(V + kv_offs, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where(cols[None, :] < N, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    acc = acc / l_i[:, None]
    o_offs = ((b.to(tl.int64) * N + offs_m[:, None]) * H + h) * D + offs_d[None, :]
    tl.store(Out + o_offs, acc.to(Out.dtype.element_ty), mask=q_mask)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise BadInputError(
            f"flash_attention takes q, k, v of one shape [B, H, N, D]; got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not q.dtype == k.dtype == v.dtype or q.dtype not in (torch.float32, torch.float16,
                                                             torch.bfloat16):
        raise BadInputError(f"flash_attention takes float32/float16/bfloat16, got {q.dtype}")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise BadInputError(f"head dim {q.shape[-1]} > {MAX_HEAD_DIM} is not supported")
    if not kernel_can_run(q.device):
        raise RuntimeError(
            f"the Triton attention kernel cannot run on {q.device}: use device='cuda', or set "
            "TRITON_INTERPRET=1 before triton is imported to run Triton's CPU interpreter "
            "(slow, for tests)")


@triton_op("roadwork::flash_attention_fwd", mutates_args={})
def _flash_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
               block_m: int, block_n: int) -> torch.Tensor:
    b, h, n, d = q.shape
    if not (q.stride() == k.stride() == v.stride()) or q.stride(-1) != 1:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    # written as [B, N, H, D]: timm's next step (transpose(1, 2).reshape) is then free
    out = torch.empty((b, n, h, d), device=q.device, dtype=q.dtype)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    block_d = max(16, triton.next_power_of_2(d))
    grid = (triton.cdiv(n, block_m), b * h)
    wrap_triton(_flash_fwd_kernel)[grid](
        q, k, v, out, scale, q.stride(0), q.stride(1), q.stride(2), h, n, d,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, PRECISION=precision)
    return out.transpose(1, 2)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, scale, _, _ = inputs
    ctx.save_for_backward(q, k, v, output)
    ctx.scale = scale


def _backward(ctx, grad_out: torch.Tensor):
    """Recompute P in float32 from the saved q, k, v (see the module docstring)."""
    q, k, v, out = (t.float() for t in ctx.saved_tensors)
    g = grad_out.float()
    p = torch.softmax((q @ k.transpose(-2, -1)) * ctx.scale, dim=-1)
    dv = p.transpose(-2, -1) @ g
    dp = g @ v.transpose(-2, -1)
    ds = p * (dp - (g * out).sum(dim=-1, keepdim=True))
    dq = (ds @ k) * ctx.scale
    dk = (ds.transpose(-2, -1) @ q) * ctx.scale
    dtype = ctx.saved_tensors[0].dtype
    return dq.to(dtype), dk.to(dtype), dv.to(dtype), None, None, None


_flash_fwd.register_autograd(_backward, setup_context=_setup_context)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                    scale: float | None = None, block_m: int = DEFAULT_BLOCK_M,
                    block_n: int = DEFAULT_BLOCK_N) -> torch.Tensor:
    """softmax(q k^T * scale) v for [B, H, N, D] tensors, by the Triton kernel.

    Same contract as ``F.scaled_dot_product_attention(q, k, v)`` without mask or
    dropout; returns [B, H, N, D] (a transposed view of a [B, N, H, D] buffer).
    Raises ``RuntimeError`` where the kernel cannot run (CPU without the interpreter).
    """
    for name, block in (("block_m", block_m), ("block_n", block_n)):
        if block < 16 or block & (block - 1):
            raise BadInputError(f"{name} must be a power of two >= 16, got {block}")
    _check_inputs(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _flash_fwd(q, k, v, scale, block_m, block_n)


_warned_fallback = False


def _attend(module: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The swapped attention core: the kernel, or SDPA where the kernel cannot serve."""
    global _warned_fallback
    dropout = module.attn_drop.p if module.training else 0.0
    if dropout > 0:
        raise BadInputError("attn_impl='triton' has no attention dropout: set attn_drop_rate=0")
    if torch.onnx.is_in_onnx_export() or not kernel_can_run(q.device):
        if not torch.onnx.is_in_onnx_export() and not _warned_fallback:
            log.warning("attn_impl='triton' on %s without TRITON_INTERPRET=1: the Triton kernel "
                        "cannot run here, using F.scaled_dot_product_attention", q.device)
            _warned_fallback = True
        return F.scaled_dot_product_attention(q, k, v, scale=module.scale)
    return flash_attention(q, k, v, scale=module.scale)


# --- the swap into timm ----------------------------------------------------------------
# A swapped module keeps its parameters and state-dict keys; only its class changes, to a
# subclass whose forward computes q, k, v exactly as timm does and calls ``_attend``.
# ``restore_timm_attention`` sets the class back.


def _finish(module: nn.Module, x: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    b, _, n, _ = x.shape
    x = module.norm(x.transpose(1, 2).reshape(b, n, -1))
    if gate is not None:
        x = x * gate
    return module.proj_drop(module.proj(x))


def _no_mask(attn_mask, is_causal) -> None:
    if attn_mask is not None or is_causal:
        raise BadInputError("attn_impl='triton' supports unmasked, non-causal attention only")


class TritonAttention(Attention):
    """timm ``Attention`` (ViT, DINOv2) with the Triton kernel as its attention core."""

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        _no_mask(attn_mask, is_causal)
        b, n, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        return _finish(self, _attend(self, q, k, v), gate)


class TritonEvaAttention(EvaAttention):
    """timm ``EvaAttention`` (EVA, DINOv3 ViTs) with the Triton kernel as its attention core."""

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        _no_mask(attn_mask, is_causal)
        b, n, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        if self.qkv is not None:
            if self.q_bias is None:
                qkv = self.qkv(x)
            else:
                bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
                qkv = self.qkv(x) + bias if self.qkv_bias_separate else F.linear(
                    x, weight=self.qkv.weight, bias=bias)
            q, k, v = qkv.reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q, k, v = (proj(x).reshape(b, n, self.num_heads, -1).transpose(1, 2)
                       for proj in (self.q_proj, self.k_proj, self.v_proj))
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            npt, half = self.num_prefix_tokens, getattr(self, "rotate_half", False)
            q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope, half=half)],
                          dim=2).type_as(v)
            k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, half=half)],
                          dim=2).type_as(v)
        return _finish(self, _attend(self, q, k, v), gate)


_SWAPS: dict[type, type] = {Attention: TritonAttention, EvaAttention: TritonEvaAttention}
_ORIGINALS: dict[type, type] = {new: old for old, new in _SWAPS.items()}


def use_triton_attention(model: nn.Module) -> int:
    """Swap every timm ``Attention`` / ``EvaAttention`` in ``model`` to the Triton kernel.

    Returns the number of modules swapped. Refuses a model with other attention
    modules (their forward is not reproduced here) or with none at all (a CNN).
    """
    targets, unknown = [], set()
    for module in model.modules():
        if type(module) in _SWAPS or type(module) in _ORIGINALS:
            targets.append(module)
        elif hasattr(module, "fused_attn"):
            unknown.add(type(module).__name__)
    if unknown:
        raise BadInputError(
            f"attn_impl='triton' swaps timm Attention (ViT/DINOv2) and EvaAttention (EVA/DINOv3) "
            f"only; this backbone has {sorted(unknown)}: use attn_impl='sdpa'")
    if not targets:
        raise BadInputError(
            f"attn_impl='triton' needs a timm ViT/EVA backbone; {type(model).__name__} has no "
            "timm attention modules: use attn_impl='sdpa'")
    for module in targets:
        module.__class__ = _SWAPS.get(type(module), type(module))
    return len(targets)


def restore_timm_attention(model: nn.Module) -> int:
    """Undo ``use_triton_attention``; returns how many modules were restored."""
    n = 0
    for module in model.modules():
        if type(module) in _ORIGINALS:
            module.__class__ = _ORIGINALS[type(module)]
            n += 1
    return n
