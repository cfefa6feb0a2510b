"""trainer.embed_engine: frozen features from ONNX Runtime are torch's within fp32
rounding, over a whole embeddings cache of awkward images, and a probe trained on them
decides as one trained on torch's; auto times both engines; a failed parity check falls
back (auto) or refuses (onnx) naming the gap; compile keeps auto on torch.

Real components: timm's tiny ``test_vit`` (random weights saved to a safetensors file
and read by the frozen-mode loader), the real ONNX export, onnxruntime, sklearn.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import pandas as pd
import pytest
import torch
from pydantic import ValidationError

from roadwork_assets.core.artifacts import read_npz
from roadwork_assets.core.export.onnx_export import probe_images_uint8
from roadwork_assets.core.models.classifier import build_classifier
from roadwork_assets.core.training.checkpoint import load_checkpoint
from roadwork_assets.core.training.config import TrainerConfig
from roadwork_assets.core.training.embed_engine import (
    EmbedEngineError,
    choose_embedder,
    feature_parity,
    features_key,
)
from roadwork_assets.core.training.pipeline import (
    build_model,
    compute_embeddings,
    compute_logits,
    train_checkpoint,
)
from roadwork_assets.core.training.trainer import view_embedder
from roadwork_assets_tests.awkward_data import encode_item, generate_awkward
from roadwork_assets_tests.conftest import random_backbone_weights

TINY_VIT = "test_vit.r160_in1k"  # timm's 0.3M-parameter ViT: the DINOv2 ViT family
IMG = 48
SPLITS = {"train": 64, "val_select": 32, "val_test": 32}
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def vit_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "test_vit.safetensors"
    return str(random_backbone_weights(TINY_VIT, path))


def _cfg(vit_weights: str, engine: str, **extra) -> TrainerConfig:
    # one backbone, size and thread count throughout: this process exports it once
    # (embed_engine.features_key), so the tests below share the pipelines' export
    return TrainerConfig(mode="frozen", backbone=TINY_VIT, weights_path=vit_weights,
                         img_size=IMG, batch_size=16, threads=2, probe_cs=[0.1, 1.0, 10.0],
                         embed_engine=engine, **{"n_views": 3, **extra})


@pytest.fixture(scope="module")
def vit(vit_weights):
    """The frozen classifier the pipelines embed with (read from the weights file)."""
    return build_model(_cfg(vit_weights, "torch"))


@pytest.fixture(scope="module")
def awkward_splits(tmp_path_factory) -> dict[str, pd.DataFrame]:
    """Awkward scenes (night, grayscale PNG/JPEG, low texture, bursts) as split manifests."""
    root = tmp_path_factory.mktemp("awkward")
    items = generate_awkward(sum(SPLITS.values()), seed=12, image_size=64)
    rows = []
    for item in items:
        data, ext = encode_item(item)
        path = root / f"{item.item_id}.{ext}"
        path.write_bytes(data)
        rows.append({"item_id": item.item_id, "uri": str(path), "label": item.label,
                     "group_key": item.burst_id or item.item_id})
    frame = pd.DataFrame(rows)
    out, start = {}, 0
    for split, n in SPLITS.items():
        out[split] = frame.iloc[start:start + n].reset_index(drop=True)
        assert out[split]["label"].nunique() == 2, split
        start += n
    return out


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory, vit_weights, awkward_splits):
    """Embeddings of every split, a probe on train + val_select and val_test logits, once
    with each engine."""
    out = {}
    for engine in ("torch", "onnx"):
        root = tmp_path_factory.mktemp(engine)
        cfg = _cfg(vit_weights, engine)
        summaries, caches = {}, {}
        for split, frame in awkward_splits.items():
            summaries[split] = compute_embeddings(frame, cfg, root / f"{split}.npz", split,
                                                  "dv", "a1")
            caches[split] = read_npz(root / f"{split}.npz")
        result = train_checkpoint({s: caches[s] for s in ("train", "val_select")}, cfg,
                                  root / "model.pt")
        payload = load_checkpoint(root / "model.pt")
        compute_logits(payload, caches["val_test"], "val_test", root / "logits.npz", "c" * 64)
        out[engine] = {"cfg": cfg, "summaries": summaries, "caches": caches, "result": result,
                       "logits": read_npz(root / "logits.npz")["logits"]}
    return out


def test_onnx_cache_is_torch_cache_within_fp32_rounding(pipelines, vit_weights):
    torch_run, onnx_run = pipelines["torch"], pipelines["onnx"]
    model = build_model(torch_run["cfg"])
    for split in SPLITS:
        t, o = torch_run["caches"][split], onnx_run["caches"][split]
        assert set(t) == set(o)
        for name in set(t) - {"features"}:  # labels, ids, groups, stamps: identical
            assert np.array_equal(t[name], o[name]), (split, name)
        assert t["features"].shape == o["features"].shape == (SPLITS[split], 3, 64)
        parity = feature_parity(model, t["features"], o["features"])
        # every image and view of the cache, not only the probe batch
        assert parity.passed, (split, parity.summary())
        assert parity.max_abs_diff > 0  # ONNX Runtime computed it, not a torch fallback
        meta = onnx_run["summaries"][split]["embed_engine"]
        assert meta["embed_engine"] == "onnx" and meta["embed_engine_reason"].startswith(
            "asked for onnx")
        assert 0 <= meta["embed_onnx_tolerance_ratio"] <= 1 and meta["embed_img_per_s"] > 0
        assert torch_run["summaries"][split]["embed_engine"]["embed_engine"] == "torch"


def test_probe_trained_on_onnx_features_decides_like_torch(pipelines):
    """Same C selected, same val_select metrics, same val_test decisions on every view;
    P(roadwork) within 1e-3 (measured: 1.2e-5, logits 2.3e-5; the probe's sklearn solver
    stops at a gradient tolerance of 1e-4, so more than fp32 noise separates two fits).
    A random ViT on awkward scenes is a weak probe (val_select AUROC ~0.45): the point is
    that both engines' features train the same one."""
    rt, ro = pipelines["torch"]["result"], pipelines["onnx"]["result"]
    assert rt.epoch == ro.epoch
    for k, v in rt.select_metrics.items():
        assert ro.select_metrics[k] == pytest.approx(v, abs=1e-4), k
    pt, po = (torch.softmax(torch.from_numpy(pipelines[e]["logits"]).double(), dim=-1)[..., 1]
              .numpy() for e in ("torch", "onnx"))
    assert pt.shape == (SPLITS["val_test"], 3)
    assert np.abs(po - pt).max() < 1e-3
    assert np.array_equal(po > 0.5, pt > 0.5)
    assert 0 < (pt > 0.5).mean() < 1  # both decisions occur: the comparison is not vacuous


def test_auto_times_both_engines_and_serves_the_faster(vit, vit_weights):
    model = vit
    cfg = _cfg(vit_weights, "auto", n_views=2)
    embed = choose_embedder(model, cfg)
    meta = embed.metadata()
    rates = {e: meta[f"embed_{e}_img_per_s"] for e in ("torch", "onnx")}
    assert min(rates.values()) > 0
    assert meta["embed_engine"] == max(rates, key=rates.get)
    assert f"torch {rates['torch']:.1f} img/s, onnx {rates['onnx']:.1f} img/s" in meta[
        "embed_engine_reason"]
    images = probe_images_uint8(5, IMG, seed=3)
    reference = view_embedder(model, n_views=2, device=CPU)(images)
    assert feature_parity(model, reference, embed(images)).passed
    assert embed.metadata()["embed_img_per_s"] > 0  # the calls are counted
    again = choose_embedder(model, cfg)  # the next split: parity again, timing reused
    assert again.engine == embed.engine and again.parity.passed
    assert "img/s, timed earlier in this process;" in again.reason
    assert again.metadata()["embed_torch_img_per_s"] == rates["torch"]
    empty = choose_embedder(model, cfg, n_images=0)
    assert (empty.engine, empty.reason) == ("torch", "auto: torch, no images to embed")


def test_failed_parity_falls_back_with_a_warning_or_refuses(caplog, vit, vit_weights):
    """A tolerance 1e-12 of the fp32 bound: any real gap between the engines fails it."""
    model = vit
    images = probe_images_uint8(4, IMG, seed=4)
    reference = view_embedder(model, n_views=2, device=CPU)(images)
    with caplog.at_level(logging.WARNING, logger="roadwork_assets.core.training.embed_engine"):
        auto = choose_embedder(model, _cfg(vit_weights, "auto", n_views=2),
                               tolerance_scale=1e-12)
    assert auto.engine == "torch" and auto.parity is not None and not auto.parity.passed
    assert auto.parity.max_abs_diff > 0  # a real gap, judged too large
    assert "feature gap" in caplog.text and "fp32 tolerance" in caplog.text
    assert "beyond fp32 rounding" in auto.reason
    assert np.array_equal(auto(images), reference)  # torch's own features
    with pytest.raises(EmbedEngineError, match=r"embed_engine='onnx' cannot embed: ONNX "
                       r"Runtime's features differ .*feature gap .*set "
                       r"trainer.embed_engine='torch'"):
        choose_embedder(model, _cfg(vit_weights, "onnx"), tolerance_scale=1e-12)


def test_compile_keeps_auto_on_torch_and_onnx_runs_uncompiled(vit, vit_weights):
    from torch._dynamo.utils import counters

    model = vit
    auto = choose_embedder(model, _cfg(vit_weights, "auto", compile=True))
    assert auto.engine == "torch" and "trainer.compile=True" in auto.reason
    assert auto.parity is None and auto.torch_img_per_s is None  # no export, no timing
    torch._dynamo.reset()
    counters.clear()
    onnx = choose_embedder(model, _cfg(vit_weights, "onnx", compile=True))
    onnx(probe_images_uint8(3, IMG))
    assert onnx.engine == "onnx" and "compile applies to the torch engine only" in onnx.reason
    assert onnx.parity.passed
    assert not counters["frames"]["total"]  # Dynamo never compiled a frame


def test_a_changed_backbone_is_exported_again(vit, vit_weights):
    """One export per backbone and process: other weights get their own, never the last."""
    first = copy.deepcopy(vit)
    second = copy.deepcopy(vit)
    with torch.no_grad():
        second.backbone.blocks[0].mlp.fc1.weight.mul_(1.5)
    assert features_key(first, IMG, 2) != features_key(second, IMG, 2)
    assert features_key(first, IMG, 2) == features_key(vit, IMG, 2)
    assert features_key(first, IMG, 2) != features_key(first, IMG, 1)  # ORT's threads
    cfg = _cfg(vit_weights, "onnx", n_views=1)
    images = probe_images_uint8(4, IMG, seed=5)
    first_got = choose_embedder(first, cfg)(images)
    second_got = choose_embedder(second, cfg)(images)
    for model, got in ((first, first_got), (second, second_got)):
        assert feature_parity(model, view_embedder(model, n_views=1, device=CPU)(images),
                              got).passed
    assert not feature_parity(first, first_got, second_got).passed  # the backbones differ


def test_embed_engine_is_a_trainer_setting():
    from roadwork_assets.defs.resources import TrainerResource
    from roadwork_assets.defs.settings import SettingsError, resolve_settings

    assert TrainerConfig().embed_engine == "auto"
    assert TrainerResource(embed_engine="onnx").to_config().embed_engine == "onnx"
    with pytest.raises(ValidationError, match="embed_engine"):
        TrainerConfig(embed_engine="tensorrt")
    rc = {"resources": {"trainer": {"config": {"embed_engine": "tensorrt"}}}}
    with pytest.raises(SettingsError, match=r"resources.trainer.config.embed_engine = "
                       r"'tensorrt': .*'auto', 'torch' or 'onnx'"):
        resolve_settings(rc, {})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_onnx_is_refused_on_cuda_and_auto_keeps_torch():
    from roadwork_assets.contracts.errors import BadInputError

    model = build_classifier(TINY_VIT, img_size=32).eval()
    with pytest.raises(BadInputError, match=r"runs ONNX Runtime on the CPU, but trainer.device "
                       r"resolves to cuda.*trainer.device='cpu'"):
        choose_embedder(model, TrainerConfig(img_size=32, device="cuda", embed_engine="onnx"))
    auto = choose_embedder(model, TrainerConfig(img_size=32, device="cuda"))
    assert auto.engine == "torch" and "runs on the CPU" in auto.reason


class _Unexportable(torch.nn.Module):
    """Eigenvalues of a 3x3 Gram matrix: torch computes them, ONNX has no eigvalsh (the
    exporter's ConversionError, measured with torch 2.14)."""

    num_features = 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = x.mean(1)[:, :3, :3]
        return torch.linalg.eigvalsh(g @ g.transpose(-1, -2))


def test_a_failed_export_falls_back_or_refuses_naming_it(caplog):
    from roadwork_assets.core.models.classifier import RoadworkClassifier

    model = RoadworkClassifier(_Unexportable()).eval()
    with caplog.at_level(logging.WARNING, logger="roadwork_assets.core.training.embed_engine"):
        auto = choose_embedder(model, TrainerConfig(img_size=16, n_views=1, threads=2))
    assert auto.engine == "torch" and "the ONNX export of" in auto.reason
    assert "the ONNX export of" in caplog.text
    images = probe_images_uint8(2, 16)
    assert auto(images).shape == (2, 1, 3)  # torch embeds it
    assert "\x1b[" not in auto.reason  # the exporter's terminal colours are stripped
    with pytest.raises(EmbedEngineError, match=r"cannot embed: the ONNX export of .* failed "
                       r"\(ConversionError: Failed to convert"):
        choose_embedder(model, TrainerConfig(img_size=16, n_views=1, embed_engine="onnx"))


def test_without_onnxruntime_auto_is_torch_and_onnx_is_refused(monkeypatch, vit, vit_weights):
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` fails
    auto = choose_embedder(vit, _cfg(vit_weights, "auto"))
    assert (auto.engine, auto.reason) == ("torch", "auto: torch, because onnxruntime is not "
                                                   "installed")
    with pytest.raises(EmbedEngineError, match="onnxruntime is not installed; set "
                       "trainer.embed_engine='torch'"):
        choose_embedder(vit, _cfg(vit_weights, "onnx"))
