"""test_report's failure-explanation metadata on a real bundle and real image files:
false negatives first (most confidently wrong first), at most top_k, panels written as
artifacts (old ones removed), an unreadable image named, a misaligned manifest refused."""

from __future__ import annotations

import re

import dagster as dg
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from roadwork_assets.core.artifacts import ArtifactRegistry
from roadwork_assets.defs.evaluation.explain_metadata import failure_explanations


@pytest.fixture(scope="module")
def loaded_bundle(tmp_path_factory):
    from roadwork_assets.core.export.bundle import build_bundle, load_bundle
    from roadwork_assets_tests.core.export.conftest import (
        fit_cascade_artifacts,
        save_tiny_checkpoint,
    )

    reg = ArtifactRegistry(tmp_path_factory.mktemp("explain_bundle"))
    save_tiny_checkpoint(reg.checkpoint)
    policy_path, stage2_path = fit_cascade_artifacts(reg, n=80)
    directory, _, _ = build_bundle(
        reg.bundles_dir, checkpoint_path=reg.checkpoint, policy_path=policy_path,
        policy_asset="cascade_policy", export_onnx_model=False, stage2_path=stage2_path)
    return load_bundle(directory, check_onnx=False)


def _case(tmp_path):
    """8 val_test images: 3 false negatives, 2 false positives, 3 right."""
    rng = np.random.default_rng(0)
    ids, uris = [], []
    for i in range(8):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(path)
        ids.append(f"img{i}.png")
        uris.append(str(path))
    (tmp_path / "img6.png").write_bytes(b"gone bad")  # an FN whose file broke since
    labels = np.array([1, 1, 0, 0, 1, 0, 1, 0])
    p = np.array([0.30, 0.05, 0.60, 0.99, 0.9, 0.1, 0.20, 0.3])
    test = {"item_ids": np.array(ids), "labels": labels}
    return pd.DataFrame({"item_id": ids, "uri": uris}), test, {"emitted": p, "calibrated": p}


def test_false_negatives_first_files_written_stale_panels_removed(loaded_bundle, tmp_path):
    manifest, test, arrays = _case(tmp_path)
    reg = ArtifactRegistry(tmp_path / "home")
    stale = reg.test_report_plot("failure_09")
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    meta = failure_explanations(dg.build_asset_context(), loaded_bundle, manifest, test,
                                arrays, reg, top_k=4)
    text = meta["failure_explanations"].value
    assert text.startswith("4 of 3 false negatives and 2 false positives")
    order = re.findall(r"\*\*\d\. (false \w+): (img\d\.png)", text)
    assert order == [("false negative", "img1.png"), ("false negative", "img6.png"),
                     ("false negative", "img0.png"), ("false positive", "img3.png")]
    assert "img6.png" in text.split("**2.")[1].split("**3.")[0] and "not shown" in text
    files = meta["failure_explanation_files"].value
    assert files == [str(reg.test_report_plot(f"failure_{r:02d}")) for r in (1, 3, 4)]
    assert all(Image.open(f).size == (324, 178) for f in files)
    assert not stale.exists()
    assert meta["failure_explanation_method"].value == "Grad-CAM"


def test_off_no_failures_and_misaligned_manifest(loaded_bundle, tmp_path):
    manifest, test, arrays = _case(tmp_path)
    reg = ArtifactRegistry(tmp_path / "home")
    ctx = dg.build_asset_context()
    off = failure_explanations(ctx, loaded_bundle, manifest, test, arrays, reg, top_k=0)
    assert "off" in off["failure_explanations"].value
    right = {"emitted": test["labels"] * 0.8 + 0.1, "calibrated": test["labels"] * 0.8 + 0.1}
    none = failure_explanations(ctx, loaded_bundle, manifest, test, right, reg, top_k=6)
    assert none["failure_explanations"].value.endswith("no failures")
    shuffled = manifest.iloc[::-1].reset_index(drop=True)
    left_out = failure_explanations(ctx, loaded_bundle, shuffled, test, arrays, reg, top_k=6)
    assert "left out" in left_out["failure_explanations"].value
