"""torch.compile through core.training.compile: outputs match eager on CPU.

Inductor on CPU needs a C compiler; without one the compiling tests skip with the reason.
Tolerance: 1e-4 absolute on logits/features (inductor fuses and reorders float32 ops).
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from roadwork_assets.core.models.classifier import RoadworkClassifier, build_classifier
from roadwork_assets.core.training.compile import CompileSettings, compiled, graph_break_report
from roadwork_assets.core.training.config import TrainerConfig
from roadwork_assets.core.training.trainer import embed_views, head_view_logits, predict_view_logits

TOL = 1e-4
needs_compiler = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None,
    reason="torch.compile's CPU backend (inductor) needs a C compiler (cc/gcc); none on PATH")


class _TinyBackbone(torch.nn.Module):
    """conv -> BN -> ReLU -> pool: a few ops, so inductor compiles in seconds."""

    num_features = 8

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _tiny_model() -> RoadworkClassifier:
    torch.manual_seed(0)
    return RoadworkClassifier(_TinyBackbone()).eval()


def test_settings_come_from_trainer_config():
    cfg = TrainerConfig(compile=True, compile_mode="max-autotune", compile_fullgraph=True,
                        compile_dynamic=False)
    assert CompileSettings.from_config(cfg) == CompileSettings(True, "max-autotune", True, False)
    model = _tiny_model()
    assert compiled(model, TrainerConfig()) is model  # compile off: the model itself
    assert compiled(model, None) is model


def test_default_model_has_no_graph_breaks():
    model = build_classifier("test_resnet.r160_in1k", img_size=32).eval()
    report = graph_break_report(model, torch.rand(2, 3, 32, 32))
    assert report["graph_breaks"] == 0 and report["graphs"] == 1, report


@needs_compiler
def test_compiled_inference_paths_match_eager():
    torch._dynamo.reset()
    model = _tiny_model()
    images = np.random.default_rng(0).integers(0, 256, (8, 3, 32, 32), dtype=np.uint8)
    cfg = TrainerConfig(compile=True, compile_fullgraph=True)
    cpu = torch.device("cpu")
    ref = predict_view_logits(model, images, n_views=1, batch_size=4, device=cpu)
    got = predict_view_logits(model, images, n_views=1, batch_size=4, device=cpu,
                              compile_settings=cfg)
    np.testing.assert_allclose(got, ref, atol=TOL)
    feats = embed_views(model, images, n_views=1, batch_size=8, device=cpu, compile_settings=cfg)
    np.testing.assert_allclose(
        feats, embed_views(model, images, n_views=1, batch_size=8, device=cpu), atol=TOL)
    np.testing.assert_allclose(head_view_logits(model, feats, compile_settings=cfg),
                               head_view_logits(model, feats), atol=TOL)


@needs_compiler
def test_compiled_training_step_matches_eager():
    torch._dynamo.reset()
    x = torch.rand(4, 3, 32, 32)
    y = torch.tensor([0, 1, 1, 0])
    grads = []
    for settings in (None, CompileSettings(enabled=True, fullgraph=True)):
        model = _tiny_model().train()
        loss = torch.nn.functional.cross_entropy(compiled(model, settings)(x), y)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[1], grads[0], atol=TOL)
