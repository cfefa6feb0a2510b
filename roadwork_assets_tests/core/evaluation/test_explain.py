"""Heatmaps that point at the evidence: Grad-CAM of a CNN trained here to find an orange
cone (a blue box is the distractor), the rollout formula on attention whose answer is
known, rollout recomputed from qkv equal to timm's own eager attention, and the order in
which failures are explained."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from roadwork_assets.contracts.errors import BadInputError
from roadwork_assets.core.evaluation.explain import (
    ExplainConfig,
    attention_rollout,
    block_attentions,
    explain_failures,
    heatmaps,
    select_failures,
)
from roadwork_assets.core.models.classifier import build_classifier

S = 64
CONE = (255, 120, 0)
BOX = (40, 60, 230)


def _scene(rng, cone_at=None, box_at=None) -> np.ndarray:
    """Grey noisy road; a 14 px orange cone and/or a 14 px blue box at (row, col)."""
    img = rng.normal(120, 12, (S, S, 3)).clip(0, 255)
    for where, color in ((cone_at, CONE), (box_at, BOX)):
        if where is not None:
            r, c = where
            img[r:r + 14, c:c + 14] = color
    return img.astype(np.uint8).transpose(2, 0, 1)


def _corner(rng) -> tuple[int, int]:
    return tuple(int(v) for v in rng.integers(0, S - 14, 2))


@pytest.fixture(scope="module")
def cone_model():
    """test_resnet trained to say roadwork iff an orange cone is in the frame (both
    classes hold a blue box half of the time, so "any object" is not the answer)."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = build_classifier("test_resnet.r160_in1k", img_size=S)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(120):
        y = rng.integers(0, 2, 32)
        x = np.stack([_scene(rng, _corner(rng) if yi else None,
                             _corner(rng) if rng.random() < 0.5 else None) for yi in y])
        loss = torch.nn.functional.cross_entropy(
            model(torch.from_numpy(x).float() / 255), torch.from_numpy(y))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    test_rng = np.random.default_rng(1)
    y = test_rng.integers(0, 2, 64)
    x = np.stack([_scene(test_rng, _corner(test_rng) if yi else None) for yi in y])
    with torch.no_grad():
        acc = (model(torch.from_numpy(x).float() / 255).argmax(1).numpy() == y).mean()
    assert acc >= 0.9, f"the fixture model did not learn the cone ({acc:.2f})"
    return model


def _region_ratio(heat: np.ndarray, r: int, c: int, pad: int = 6) -> float:
    mask = np.zeros_like(heat, dtype=bool)
    mask[max(0, r - pad):r + 14 + pad, max(0, c - pad):c + 14 + pad] = True
    return float(heat[mask].mean() / max(heat[~mask].mean(), 1e-9))


def test_grad_cam_mass_sits_on_the_cone_and_follows_it(cone_model):
    rng = np.random.default_rng(5)
    placements = [((4, 4), (44, 44)), ((44, 44), (4, 4)), ((4, 44), (44, 4)), ((44, 4), (4, 44))]
    images = np.stack([_scene(rng, cone, box) for cone, box in placements])
    maps, method = heatmaps(cone_model, images)
    assert method == "Grad-CAM" and maps.shape == (4, S, S)
    for (cone, box), heat in zip(placements, maps, strict=True):
        on_cone = _region_ratio(heat, *cone)
        on_box = _region_ratio(heat, *box)
        # per pixel, the cone's neighbourhood holds several times the heat of the rest,
        # and more than the distractor's
        assert on_cone > 4.0, (cone, on_cone)
        assert on_cone > on_box, (cone, on_cone, on_box)


def test_grad_cam_works_on_a_frozen_backbone(cone_model):
    for p in cone_model.backbone.parameters():
        p.requires_grad_(False)
    try:
        maps, _ = heatmaps(cone_model, _scene(np.random.default_rng(2), (4, 4))[None])
    finally:
        for p in cone_model.backbone.parameters():
            p.requires_grad_(True)
    assert _region_ratio(maps[0], 4, 4) > 2.0


def test_rollout_rows_sum_to_one_and_match_the_formula():
    rng = np.random.default_rng(0)
    raw = rng.random((3, 4, 5, 5))  # 3 blocks, 4 heads, 5 tokens
    attn = raw / raw.sum(-1, keepdims=True)
    r = attention_rollout(list(attn), residual=0.5)
    np.testing.assert_allclose(r.sum(axis=1), 1.0, atol=1e-12)
    hats = [0.5 * a.mean(0) + 0.5 * np.eye(5) for a in attn]
    np.testing.assert_allclose(r, hats[2] @ hats[1] @ hats[0], atol=1e-12)


def test_rollout_of_identity_attention_is_identity_and_uniform_has_closed_form():
    eye = [np.eye(6)[None].repeat(2, 0) for _ in range(4)]
    np.testing.assert_allclose(attention_rollout(eye), np.eye(6), atol=1e-12)
    # uniform U is idempotent, so (U/2 + I/2)^L = U + 2^-L (I - U)
    u = np.full((6, 6), 1 / 6)
    got = attention_rollout([u] * 3)
    np.testing.assert_allclose(got, u + 0.125 * (np.eye(6) - u), atol=1e-12)
    # residual 1: pure attention product, uniform stays uniform
    np.testing.assert_allclose(attention_rollout([u] * 3, residual=1.0), u, atol=1e-12)
    with pytest.raises(BadInputError, match="at least one block"):
        attention_rollout([])


@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
def test_attention_recomputed_from_qkv_equals_timms_eager_attention(attn_impl):
    torch.manual_seed(0)
    vit = build_classifier("test_vit", img_size=32, attn_impl=attn_impl).eval()
    images = torch.rand(2, 3, 32, 32)
    ours = block_attentions(vit, images)
    # timm's eager path: the softmax it feeds attn_drop
    from roadwork_assets.core.models.classifier import set_attention_impl
    set_attention_impl(vit, "eager")
    theirs = []
    hooks = [m.attn_drop.register_forward_hook(lambda _m, i, _o: theirs.append(i[0]))
             for m in vit.modules() if hasattr(m, "qkv")]
    with torch.no_grad():
        vit(images)
    for h in hooks:
        h.remove()
    assert len(ours) == len(theirs) > 0
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    maps, method = heatmaps(vit, (images.numpy() * 255).astype(np.uint8))
    assert method == "attention rollout" and maps.shape == (2, 32, 32)
    assert maps.min() >= 0.0 and maps.max() == pytest.approx(1.0)


def test_failures_false_negatives_first_ranked_by_confidence():
    labels = [1, 1, 0, 0, 1, 0, 1]
    decision = [0, 0, 1, 1, 1, 0, 0]
    p = [0.30, 0.05, 0.60, 0.99, 0.9, 0.1, 0.20]
    got = select_failures(labels, decision, p, top_k=10)
    assert [(f.index, f.kind) for f in got] == [
        (1, "false negative"), (6, "false negative"), (0, "false negative"),
        (3, "false positive"), (2, "false positive")]
    assert [f.index for f in select_failures(labels, decision, p, top_k=2)] == [1, 6]
    assert select_failures([0, 1], [0, 1], [0.1, 0.9], top_k=6) == []
    with pytest.raises(BadInputError, match="one entry per image"):
        select_failures([0, 1], [0], [0.1, 0.9], top_k=1)


def test_explain_failures_renders_panels_and_names_unreadable_images(cone_model, tmp_path):
    rng = np.random.default_rng(3)
    good = tmp_path / "cone.png"
    Image.fromarray(_scene(rng, (10, 30)).transpose(1, 2, 0)).save(good)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    failures = select_failures([1, 1], [0, 0], [0.2, 0.1], top_k=6)
    out = explain_failures(cone_model, [str(good), str(bad)], ["cone.png", "broken.jpg"],
                           failures, img_size=S, config=ExplainConfig(panel_size=96))
    assert [e.item_id for e in out] == ["broken.jpg", "cone.png"]  # p ascending
    assert out[0].png is None and "broken.jpg" in out[0].error
    panel = Image.open(io.BytesIO(out[1].png))
    assert panel.size == (2 * 96 + 4, 96 + 18) and out[1].method == "Grad-CAM"
    assert "false negative: cone.png" in out[1].caption
