"""The ONNX Runtime engine serves what torch serves: on real image files (JPEG, PNG, WebP
decoded as `roadwork predict` decodes them), each stage's served probability and
decision agree with torch's within the export parity tolerance (``judge_served``), and
the predictor's end-to-end probability / decision / stage agree away from a boundary.
``auto`` picks ONNX Runtime only where it can serve; ORT threads are explicit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from roadwork_assets.cli import main
from roadwork_assets.contracts.errors import RoadworkError
from roadwork_assets.core.data.images import decode_image
from roadwork_assets.core.data.transforms import to_model_array
from roadwork_assets.core.export.cascade_serving import (
    stage1_served,
    stage2_served,
    torch_stage2_logits,
)
from roadwork_assets.core.export.onnx_export import (
    available_cores,
    judge_served,
    ort_session,
    torch_probe_logits,
)
from roadwork_assets.core.export.predictor import BundlePredictor
from roadwork_assets_tests.core.export.test_cascade_cli import _images


def _arrays(paths: list[Path], size: int) -> np.ndarray:
    return np.stack([to_model_array(decode_image(p, str(p)), size) for p in paths])


def test_onnx_engine_serves_what_torch_serves_on_real_images(cascade_bundle, tmp_path):
    torch_p = BundlePredictor.from_dir(cascade_bundle.directory, engine="torch")
    onnx_p = BundlePredictor.from_dir(cascade_bundle.directory, engine="onnx")
    assert (torch_p.engine.name, onnx_p.engine.name) == ("torch", "onnx")
    paths = _images(tmp_path)
    images = _arrays(paths, torch_p.bundle.manifest.img_size)
    policy, n_views = torch_p.bundle.policy, torch_p.bundle.manifest.n_views

    z1, tol1 = torch_probe_logits(torch_p.model, images, n_views)
    z1_onnx = onnx_p.engine.view_logits(images, n_views, batch_size=4)
    stage1 = judge_served(policy, z1, z1_onnx, tol1, serve=stage1_served)
    assert stage1.passed, stage1.summary()
    z2, tol2 = torch_stage2_logits(torch_p.stage2_model, images)
    z2_onnx = onnx_p.engine.stage2_logits(images, batch_size=4)
    stage2 = judge_served(policy, z2[:, None], z2_onnx[:, None], tol2[:, None], serve=stage2_served)
    assert stage2.passed, stage2.summary()

    served_t = torch_p.predict_paths(paths)
    served_o = onnx_p.predict_paths(paths)
    near = set(stage1.near_boundary) | set(stage2.near_boundary)
    for i, (t, o) in enumerate(zip(served_t, served_o)):
        if i in near:
            continue
        assert (o.stage, o.decision) == (t.stage, t.decision), (i, t, o)
        assert abs(o.probability - t.probability) <= max(stage1.prob_tolerance,
                                                         stage2.prob_tolerance, 1e-6)
    assert {p.stage for p in served_o} <= {1, 2}


def test_auto_picks_an_engine_by_timing_and_says_why(cascade_bundle):
    auto = BundlePredictor.from_dir(cascade_bundle.directory, engine="auto")
    assert auto.engine.name in {"torch", "onnx"}
    assert auto.engine_reason.startswith(f"auto: {auto.engine.name} (stage 1 on")


def test_auto_falls_back_to_torch_and_onnx_refuses_without_checked_onnx(cascade_bundle):
    unchecked = BundlePredictor.from_dir(cascade_bundle.directory, engine="auto",
                                         check_onnx=False)
    assert unchecked.engine.name == "torch" and "not compared" in unchecked.engine_reason
    with pytest.raises(RoadworkError, match="ONNX engine cannot serve"):
        BundlePredictor.from_dir(cascade_bundle.directory, engine="onnx", check_onnx=False)


def test_ort_session_threads_are_explicit(cascade_bundle):
    session = ort_session(cascade_bundle.directory / "model.onnx", threads=1)
    options = session.get_session_options()
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (1, 1)
    assert ort_session(cascade_bundle.directory / "model.onnx").get_session_options(
    ).intra_op_num_threads == available_cores()


def test_predict_engine_flag(cascade_bundle, tmp_path, capsys):
    paths = _images(tmp_path)[:3]
    outputs = {}
    for engine in ("torch", "onnx"):
        assert main(["predict", "--engine", engine, "--bundle", str(cascade_bundle.directory),
                     *map(str, paths)]) == 0
        lines = capsys.readouterr().out.strip().splitlines()
        outputs[engine] = [json.loads(x) for x in lines if x.startswith("{")]
    assert [o["path"] for o in outputs["onnx"]] == [o["path"] for o in outputs["torch"]]
