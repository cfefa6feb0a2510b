"""Stage 2 in the whole graph (the session's tiny materialized run): ten-crop views of
the stage-1 model, one aggregator chosen on val_select and compared with the single view,
and [N, 1, 2] logits per split stamped with both checkpoints' sha256."""

from __future__ import annotations

import pytest

from roadwork_assets.contracts.multiview_schemas import load_multiview_checkpoint
from roadwork_assets.contracts.splits import SPLITS
from roadwork_assets.core.artifacts import ArtifactRegistry, file_sha256, read_npz


def test_stage2_multiview_is_fitted_compared_and_aligned(materialized_root):
    """Stage 2: ten-crop views of the stage-1 model, one aggregator chosen on val_select,
    compared with the single view; its logits are [N, 1, 2], stamped with both sha256."""
    root, _, _ = materialized_root
    reg = ArtifactRegistry(root)
    stage2 = load_multiview_checkpoint(reg.multiview_checkpoint)
    assert stage2.view_source == "ten_crop" and len(stage2.views) == 10
    rows = {r.aggregator: r for r in stage2.comparison}
    assert set(rows) == {"single_view", "mean", "max", "attention"}
    assert stage2.aggregator == min(("mean", "max", "attention"), key=lambda a: rows[a].nll)
    print("\nval_select", *(r.model_dump() for r in stage2.comparison), sep="\n")
    for split in SPLITS:
        n = len(read_npz(reg.logits(split))["logits"])
        views = read_npz(reg.multiview_views(split))
        assert views["logits"].shape == (n, 10, 2) and str(views["view_source"]) == "ten_crop"
        z = read_npz(reg.multiview_logits(split))
        assert z["logits"].shape == (n, 1, 2)
        assert str(z["checkpoint_sha256"]) == file_sha256(reg.checkpoint)
        assert str(z["multiview_checkpoint_sha256"]) == file_sha256(reg.multiview_checkpoint)


@pytest.fixture(scope="module")
def cascade_root(tmp_path_factory):
    """The tiny graph at alpha = 0.2. At the session graph's alpha (0.05) the tiny model's
    cascade legitimately serves stage 1 alone (every certified shape ties at the trivial
    reward on its 96-image fit part, and the tie goes to the least latency), which would
    leave stage 2's serving path untested; at 0.2 stage 1 routes part of val_test."""
    import dagster as dg

    from roadwork_assets.definitions import build_definitions
    from roadwork_assets.defs.runner import materialize_all
    from roadwork_assets_tests.conftest import tiny_resources

    root = tmp_path_factory.mktemp("cascade_home")
    defs = build_definitions(tiny_resources(root, alpha=0.2))
    with dg.DagsterInstance.ephemeral() as instance:
        materialize_all(defs, instance, say=lambda _m: None)
    return root


def test_cascade_end_to_end_policy_bundle_predict_and_report(cascade_root):
    """The whole cascade through the graph: the policy fitted on val_calib certifies the
    composed decision; the bundle ships both stages; `BundlePredictor` on val_test's image
    files serves what the policy decides on the graph's val_test logits, with stage 2 run
    on routed images only; the report's cascade row and routing are those decisions."""
    import json

    import numpy as np
    import pandas as pd

    from roadwork_assets.contracts.policy_schemas import parse_policy
    from roadwork_assets.core.calibration.cascade import apply_cascade
    from roadwork_assets.core.export.predictor import BundlePredictor

    reg = ArtifactRegistry(cascade_root)
    policy = parse_policy(json.loads(reg.policy("cascade").read_text()))
    assert policy.kind == "cascade" and policy.lam >= policy.lambda_certified
    assert policy.crc_bound <= policy.alpha
    assert policy.stage2_sha256 == file_sha256(reg.multiview_checkpoint)
    assert policy.latency_source == "measured"
    # measured, not asserted in order: a loaded machine can invert two medians of 15
    assert policy.latency_stage1_s > 0 and policy.latency_stage2_s > 0

    predictor = BundlePredictor.from_dir(reg.latest_bundle())
    manifest = predictor.bundle.manifest
    assert manifest.policy_kind == "cascade" and {"stage2", "stage2_onnx"} <= set(manifest.files)

    test, test2 = read_npz(reg.logits("val_test")), read_npz(reg.multiview_logits("val_test"))
    decision, served, stage = apply_cascade(policy, test["logits"], test2["logits"])
    assert set(np.unique(stage)) == {1, 2}  # both stages decide some val_test images
    frame = pd.read_parquet(reg.split_manifest("val_test")).set_index("item_id")
    uris = frame.loc[test["item_ids"].astype(str), "uri"].tolist()
    preds = predictor.predict_paths(uris)
    got = np.array([{"positive": 1, "negative": 0}[p.decision] for p in preds])
    np.testing.assert_array_equal(got, decision)
    np.testing.assert_array_equal([p.stage for p in preds], stage)
    np.testing.assert_allclose([p.probability for p in preds], served, atol=1e-5)
    assert predictor.stage2_rows == int((stage == 2).sum())  # stage 2 ran on routed only

    report = json.loads(reg.test_report.read_text())
    rows = {r["name"]: r for r in report["comparison"]}
    assert set(rows) == {"cascade_served", "stage1_served", "single_view_0.5", "stage2_0.5"}
    y = test["labels"]
    misses = int(((decision == 0) & (y == 1)).sum())
    assert rows["cascade_served"]["fnr"]["errors"] == misses
    assert report["cascade"]["routing_rate"] == (stage == 2).mean()
    sim = {r["name"] for r in report["validator"]["rows"]}
    assert sim == set(rows)
