"""test_report shows heatmaps of the worst val_test failures in the UI: as many as
exit_policy.explain_failures allows, false negatives first, each most confidently wrong
first, each one a real val_test failure, and each written as a PNG artifact."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from roadwork_assets.contracts.schemas import TestReport, load_json_artifact
from roadwork_assets.core.artifacts import ArtifactRegistry

CAPTION = re.compile(r"\*\*(\d+)\. (false negative|false positive): (.+?) \(label "
                     r"(roadwork|none), p=([0-9.]+)\)\*\* — (Grad-CAM|attention rollout)")


def test_report_metadata_shows_failure_heatmaps_false_negatives_first(materialized_root):
    root, _, results = materialized_root
    reg = ArtifactRegistry(root)
    report = load_json_artifact(reg.test_report, TestReport)
    meta = next(ev.materialization.metadata for r in results
                for ev in r.get_asset_materialization_events()
                if ev.asset_key.to_user_string() == "test_report")
    text = meta["failure_explanations"].value
    cm = report.confusion_matrix
    n_fn, n_fp = cm[1][0], cm[0][1]
    assert text.startswith(f"{min(6, n_fn + n_fp)} of {n_fn} false negatives and {n_fp} "
                           "false positives")
    assert n_fn + n_fp > 0, "the tiny model made no val_test error: nothing to explain"
    captions = CAPTION.findall(text)
    images = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)\)", text)
    assert len(captions) == len(images) == min(6, n_fn + n_fp)
    kinds = [c[1] for c in captions]
    assert kinds == sorted(kinds)  # "false negative" < "false positive": FN first
    assert kinds.count("false negative") == min(6, n_fn)
    for kind in ("false negative", "false positive"):
        p = [float(c[4]) for c in captions if c[1] == kind]
        assert p == sorted(p, reverse=kind == "false positive")  # most confidently wrong first
    # the default tiny backbone is a CNN
    assert {c[5] for c in captions} == {"Grad-CAM"}
    assert meta["failure_explanation_method"].value == "Grad-CAM"
    manifest = pd.read_parquet(reg.split_manifest("val_test")).set_index("item_id")
    for _, kind, item, label, _p, _m in captions:
        assert int(manifest.loc[item, "label"]) == (1 if kind == "false negative" else 0)
        assert label == ("roadwork" if kind == "false negative" else "none")
    files = meta["failure_explanation_files"].value
    assert files == [str(reg.test_report_plot(f"failure_{i:02d}")) for i in range(1, len(images) + 1)]
    for path, data in zip(files, images, strict=True):
        raw = Path(path).read_bytes()
        assert base64.b64encode(raw).decode() == data  # the UI shows the artifact itself
        panel = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))
        left, right = panel[:160, :160], panel[:160, 164:]
        assert np.abs(left.astype(int) - right.astype(int)).mean() > 5  # a heatmap is drawn
