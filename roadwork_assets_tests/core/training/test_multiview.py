"""Stage 2's pieces: ten-crop geometry and flips, the three aggregators, the artifact."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from roadwork_assets.contracts.errors import ArtifactIntegrityError
from roadwork_assets.contracts.multiview_schemas import load_multiview_checkpoint
from roadwork_assets.core.models.multiview import (
    TEN_CROP_VIEWS,
    AttentionAggregator,
    aggregate,
    crop_boxes,
    max_aggregate,
    mean_aggregate,
    ten_crop,
)
from roadwork_assets.core.training.multiview import compare


def _coords(h: int = 16, w: int = 16) -> torch.Tensor:
    """[1, 2, H, W]: channel 0 holds the row, channel 1 the column of each pixel."""
    rows = torch.arange(h, dtype=torch.float32).view(h, 1).expand(h, w)
    cols = torch.arange(w, dtype=torch.float32).view(1, w).expand(h, w)
    return torch.stack([rows, cols]).unsqueeze(0)


def test_ten_crop_count_order_and_corner_centre_geometry():
    views = ten_crop(_coords(), crop_scale=0.75, out_size=None)
    assert len(views) == 10 == len(TEN_CROP_VIEWS)
    assert TEN_CROP_VIEWS[:5] == ("top_left", "top_right", "bottom_left", "bottom_right", "centre")
    assert all(v.shape == (1, 2, 12, 12) for v in views)
    corner = {name: (int(v[0, 0, 0, 0]), int(v[0, 1, 0, 0])) for name, v in
              zip(TEN_CROP_VIEWS[:5], views[:5], strict=True)}  # (row, col) of top-left pixel
    assert corner == {"top_left": (0, 0), "top_right": (0, 4), "bottom_left": (4, 0),
                      "bottom_right": (4, 4), "centre": (2, 2)}
    assert int(views[3][0, 0, -1, -1]) == 15 and int(views[3][0, 1, -1, -1]) == 15


def test_ten_crop_second_half_is_the_mirror_of_the_first():
    views = ten_crop(torch.rand(3, 3, 20, 20), crop_scale=0.875, out_size=None)
    for plain, flipped in zip(views[:5], views[5:], strict=True):
        assert torch.equal(torch.flip(plain, dims=[3]), flipped)
    assert not torch.equal(views[0], views[5])


def test_ten_crop_resizes_back_to_the_model_input():
    views = ten_crop(torch.rand(2, 3, 64, 64), out_size=64)
    assert all(v.shape == (2, 3, 64, 64) for v in views)
    assert crop_boxes(224, 224, 0.875)[4] == (14, 14, 196, 196)  # the validator's size
    with pytest.raises(ValueError, match="crop_scale"):
        crop_boxes(10, 10, 0.0)


TOY = np.array([[[0.0, 1.0], [0.0, -2.0], [1.0, 0.0]],    # margins 1, -2, -1
                [[2.0, 0.0], [0.0, 0.5], [0.0, 3.0]]])   # margins -2, 0.5, 3


def test_mean_and_max_are_exact_on_toy_logits():
    np.testing.assert_allclose(mean_aggregate(TOY), [[1 / 3, -1 / 3], [2 / 3, 3.5 / 3]])
    np.testing.assert_array_equal(max_aggregate(TOY), [[0.0, 1.0], [0.0, 3.0]])
    np.testing.assert_array_equal(aggregate("max", TOY), max_aggregate(TOY))
    with pytest.raises(ValueError, match="unknown aggregator"):
        aggregate("median", TOY)


def _one_informative_view(n: int, seed: int, informative: int = 3, n_views: int = 10):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    m = rng.normal(0.0, 2.0, (n, n_views))  # views that see nothing: loud noise
    m[:, informative] = 2.0 * (2 * y - 1) + rng.normal(0.0, 1.0, n)
    return np.stack([-m / 2, m / 2], axis=-1), y


def test_attention_learns_to_trust_the_informative_view():
    z, y = _one_informative_view(600, seed=0)
    agg = AttentionAggregator(l2=1e-3).fit(z, y)
    w = agg.weights(z)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-9)
    assert w[:, 3].mean() > 0.5 and int(np.argmax(agg.view_bias_)) == 3
    zt, yt = _one_informative_view(600, seed=1)
    att = compare("attention", agg.aggregate(zt), yt)
    mean = compare("mean", aggregate("mean", zt), yt)
    assert att.balanced_accuracy > mean.balanced_accuracy + 0.05
    assert att.nll < mean.nll
    restored = AttentionAggregator.from_params(agg.to_params())
    np.testing.assert_allclose(restored.aggregate(zt), agg.aggregate(zt), rtol=1e-6)


def test_untrained_attention_is_the_mean():
    agg = AttentionAggregator.from_params({"u": 0.0, "r": 0.0, "view_bias": [0.0] * 3,
                                           "margin_scale": 1.0, "l2": 0.0})
    np.testing.assert_allclose(agg.aggregate(TOY), mean_aggregate(TOY), rtol=1e-6)
    with pytest.raises(ValueError, match="fitted on 3 views"):
        agg.aggregate(TOY[:, :2])


def test_compare_counts_misses_at_one_half_as_the_validator():
    logits = np.array([[0.0, 2.0], [0.0, 0.0], [0.0, -1.0], [0.0, -3.0]])  # p=0.5 -> none
    row = compare("x", logits, np.array([1, 1, 1, 0]))
    assert (row.misses, row.n_positive, row.fnr) == (2, 3, pytest.approx(2 / 3))
    assert row.balanced_accuracy == pytest.approx((1 / 3 + 1) / 2)


def test_loading_a_broken_multiview_checkpoint_is_refused(tmp_path):
    path = tmp_path / "aggregator.json"
    with pytest.raises(ArtifactIntegrityError, match="materialize `multiview_checkpoint`"):
        load_multiview_checkpoint(path)
    path.write_text('{"schema_version": 1, "aggregator": "attention"}')
    with pytest.raises(ArtifactIntegrityError, match="does not match MultiviewCheckpoint"):
        load_multiview_checkpoint(path)
    path.write_text('{"schema_version": 9}')
    with pytest.raises(ArtifactIntegrityError, match="schema_version 9"):
        load_multiview_checkpoint(path)


class _TinyBackbone(torch.nn.Module):
    """Position-sensitive features, so every crop and flip gives other logits."""

    num_features = 6

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 6, 5, stride=2)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        return h[..., : h.shape[-2] // 2, :].mean(dim=(2, 3)) + h.amax(dim=(2, 3))


def _stage1():
    from roadwork_assets.core.models.classifier import RoadworkClassifier

    model = RoadworkClassifier(_TinyBackbone()).eval()
    torch.nn.init.normal_(model.head.weight, std=2.0)
    return model


@pytest.mark.parametrize("aggregator", ["mean", "max", "attention"])
def test_stage2_network_serves_what_the_graph_pooled(aggregator):
    """MultiviewModel (bundle, ONNX, predict) against the graph's path: per-view logits
    of the ten crops through the stage-1 network, then the numpy aggregator."""
    from roadwork_assets.core.models.multiview import MultiviewModel
    from roadwork_assets.core.training.multiview import _ten_crop_logits, predict_stage2_logits

    model = _stage1()
    images = np.random.default_rng(0).integers(0, 256, (9, 3, 40, 40), dtype=np.uint8)
    views, _ = _ten_crop_logits(model, images, 0.875, 40, 4, torch.device("cpu"))
    attention = AttentionAggregator(l2=0.1).fit(views, np.arange(9) % 2)
    net = MultiviewModel(model, view_source="ten_crop", n_views=10, crop_scale=0.875,
                         input_size=40, aggregator=aggregator, attention=attention.to_params())
    served = predict_stage2_logits(net, images, batch_size=4)
    np.testing.assert_allclose(served, aggregate(aggregator, views, attention), atol=1e-5)
    assert np.ptp(views, axis=1).max() > 0.1  # the views differ: the test can tell them apart


def test_stage2_network_on_cached_views_matches_the_frozen_cache():
    """Frozen mode: stage 2 pools the make_views views the feature cache holds."""
    from roadwork_assets.core.models.multiview import MultiviewModel
    from roadwork_assets.core.training.multiview import predict_stage2_logits
    from roadwork_assets.core.training.trainer import predict_view_logits

    model = _stage1()
    images = np.random.default_rng(1).integers(0, 256, (5, 3, 32, 32), dtype=np.uint8)
    views = predict_view_logits(model, images, n_views=4, batch_size=5, device=torch.device("cpu"))
    net = MultiviewModel(model, view_source="cached_views", n_views=4, crop_scale=None,
                         input_size=32, aggregator="max")
    np.testing.assert_allclose(predict_stage2_logits(net, images), max_aggregate(views),
                               atol=1e-5)

