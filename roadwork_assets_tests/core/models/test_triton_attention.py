"""The Triton attention kernel: parity with F.scaled_dot_product_attention on CPU.

Kernel checks run under ``TRITON_INTERPRET=1`` in a subprocess (triton reads the
variable when a kernel is defined; see ``triton_interpreter_checks``). Tolerance, all
fp32: 1e-5 absolute on outputs and input gradients (measured: ~1e-6), 1e-5 relative
(L2 over all parameter gradients) for whole models. The rest runs in this process
without the interpreter: the behaviour on CPU, the swap and its refusals.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from roadwork_assets.contracts.errors import BadInputError
from roadwork_assets.core.models.classifier import build_classifier, set_attention_impl

pytest.importorskip("triton")

FP32_TOL = 1e-5


@pytest.fixture(scope="module")
def interpreter_results() -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "roadwork_assets_tests.core.models.triton_interpreter_checks"],
        capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_forward_matches_sdpa_including_ragged_tiles(interpreter_results):
    errors = interpreter_results["forward"]
    assert {"B2H3N50D64/16x16", "B1H2N197D64/64x64", "B2H2N17D24/16x32"} <= set(errors)
    assert all(err < FP32_TOL for err in errors.values()), errors


def test_gradients_match_sdpa_backward(interpreter_results):
    errors = interpreter_results["gradient"]
    assert len(errors) == 3
    assert all(err < FP32_TOL for err in errors.values()), errors


def test_timm_vit_and_eva_with_triton_match_sdpa(interpreter_results):
    res = interpreter_results["vit"]
    assert res["vit_swapped"] == 6 and res["eva_swapped"] == 2  # test_vit: 6 blocks
    for name in ("vit", "eva"):
        assert res[f"{name}_forward"] < FP32_TOL, res
        assert res[f"{name}_grad_rel"] < FP32_TOL, res


def test_kernel_refuses_cpu_without_interpreter(monkeypatch):
    from roadwork_assets.core.models.triton_attention import flash_attention

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = torch.randn(1, 1, 8, 16)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1.*|.*device='cuda'"):
        flash_attention(q, q, q)


def test_swap_falls_back_to_sdpa_on_cpu_without_interpreter(monkeypatch, caplog):
    from roadwork_assets.core.models import triton_attention

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(triton_attention, "_warned_fallback", False)
    torch.manual_seed(0)
    model = build_classifier("test_vit", img_size=112).eval()
    x = torch.rand(2, 3, 112, 112)
    ref = model(x)
    set_attention_impl(model, "triton")
    with caplog.at_level(logging.WARNING):
        got = model(x)
    assert torch.allclose(got, ref, atol=FP32_TOL)
    assert "TRITON_INTERPRET=1" in caplog.text


def test_swap_keeps_state_dict_and_restores():
    from roadwork_assets.core.models.triton_attention import TritonAttention

    model = build_classifier("test_vit", img_size=112, attn_impl="triton")
    keys = list(model.state_dict())
    assert all(type(b.attn) is TritonAttention for b in model.backbone.blocks)
    assert set_attention_impl(model, "sdpa") == 6
    assert not any(isinstance(m, TritonAttention) for m in model.modules())
    assert list(model.state_dict()) == keys


def test_triton_refused_without_timm_attention():
    with pytest.raises(BadInputError, match="no timm attention modules"):
        build_classifier("test_resnet.r160_in1k", img_size=32, attn_impl="triton")


def test_bad_inputs_refused():
    from roadwork_assets.core.models.triton_attention import flash_attention

    q = torch.randn(1, 1, 8, 16)
    with pytest.raises(BadInputError, match="one shape"):
        flash_attention(q, q, torch.randn(1, 1, 9, 16))
    with pytest.raises(BadInputError, match="float32/float16/bfloat16"):
        flash_attention(q.double(), q.double(), q.double())
    with pytest.raises(BadInputError, match="power of two"):
        flash_attention(q, q, q, block_m=24)


def test_onnx_export_of_swapped_model_uses_sdpa(tmp_path):
    from roadwork_assets.core.export.onnx_export import export_onnx

    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = build_classifier("test_vit", img_size=112, attn_impl="triton").eval()
    path = export_onnx(model, 112, tmp_path / "m.onnx")
    x = torch.rand(2, 3, 112, 112)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        ref = F.softmax(model(x), dim=1)  # compared through softmax: scale-free
    assert torch.allclose(F.softmax(torch.from_numpy(got), dim=1), ref, atol=1e-4)
