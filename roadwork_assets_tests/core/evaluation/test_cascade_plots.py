"""The cascade_policy asset's plots: valid PNGs, also for infeasible alphas, a one-point
frontier and none at all."""

from __future__ import annotations

import numpy as np
from PIL import Image

from roadwork_assets.contracts.policy_schemas import CascadeAlphaPoint
from roadwork_assets.core.evaluation.cascade_plots import plot_alpha_frontier, plot_cascade_frontier

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> tuple[int, int]:
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert np.asarray(im).std() > 0  # something was drawn
        return im.size


def test_frontier_plots_of_a_fitted_cascade(fitted_policies, tmp_path):
    cascade, _ = fitted_policies
    assert len(cascade.frontier) > 1 and any(f.certified for f in cascade.frontier)
    assert any(not p.feasible for p in cascade.alpha_frontier)  # alpha 0.01: too few scenes
    out = plot_cascade_frontier(cascade, tmp_path / "plots" / "frontier.png")
    assert out == tmp_path / "plots" / "frontier.png" and _is_png(out) == (700, 650)
    assert _is_png(plot_alpha_frontier(cascade, tmp_path / "alpha.png")) == (650, 650)
    assert [p.name for p in tmp_path.iterdir()] != []  # no temporary files left behind
    assert not [p for p in (tmp_path / "plots").iterdir() if p.name.startswith(".")]


def test_single_point_all_infeasible_and_empty_frontiers_still_plot(fitted_policies, tmp_path):
    cascade, _ = fitted_policies
    one = cascade.model_copy(update={
        "frontier": cascade.frontier[-1:],
        "alpha_frontier": [CascadeAlphaPoint(alpha=0.001, feasible=False,
                                             reason="too few scenes with roadwork")]})
    _is_png(plot_cascade_frontier(one, tmp_path / "one.png"))
    _is_png(plot_alpha_frontier(one, tmp_path / "one_alpha.png"))
    empty = cascade.model_copy(update={"frontier": [], "alpha_frontier": []})
    _is_png(plot_cascade_frontier(empty, tmp_path / "empty.png"))
    _is_png(plot_alpha_frontier(empty, tmp_path / "empty_alpha.png"))
