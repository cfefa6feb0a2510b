"""The optional bundle_int8 asset on the tiny materialized graph: left out of `roadwork
run`, reads val_calib only, publishes a verified INT8 bundle in bundles_int8/ without
touching the fp32 bundle, and `roadwork predict` serves it with ONNX Runtime."""

from __future__ import annotations

import json

import dagster as dg

from roadwork_assets.core.artifacts import ArtifactRegistry
from roadwork_assets.core.export.bundle import load_bundle
from roadwork_assets.defs.runner import run_stage, stages


def test_bundle_int8_is_optional_recertified_and_served(materialized_root, tmp_path, capsys):
    root, defs, results = materialized_root
    assert all("bundle_int8" not in s.assets for s in stages(defs))  # not in `roadwork run`
    assert not any(r.asset_materializations_for_node("bundle_int8") for r in results)
    reg = ArtifactRegistry(root)
    fp32_latest = reg.latest_bundle_pointer.read_text()
    assert not (root / "bundles_int8").exists()

    job = defs.resolve_implicit_global_asset_job_def()
    with dg.DagsterInstance.ephemeral() as instance:
        result = run_stage(job, instance, [dg.AssetKey("bundle_int8")], None, None)
    assert result.success
    checks = result.get_asset_check_evaluations()
    assert {c.check_name for c in checks} == {"split_reads_allowed", "int8_bundle_verifies"}
    assert all(c.passed for c in checks)
    meta = {k: v.value for k, v in result.asset_materializations_for_node(
        "bundle_int8")[0].metadata.items()}
    assert meta["precision"] == "int8-dynamic"
    assert meta["splits_read"] == ["val_calib"]  # a policy fitter: val_calib only
    assert sorted(meta["partitions_read"]) == [
        "bundle", "logits[val_calib]", "multiview_logits[val_calib]",
        "split_manifest[val_calib]"]
    assert meta["model_mb_int8"] < 0.5 * meta["model_mb_fp32"]

    # the fp32 bundle and its LATEST are untouched; the INT8 one has its own LATEST
    assert reg.latest_bundle_pointer.read_text() == fp32_latest
    int8_id = (root / "bundles_int8" / "LATEST").read_text().strip()
    bundle = load_bundle(root / "bundles_int8" / int8_id)
    assert bundle.manifest.source_bundle_id == fp32_latest.strip()
    assert bundle.policy.crc_bound <= bundle.policy.alpha

    from roadwork_assets.cli import main

    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (80, 60), (200, 120, 30)).save(image)
    code = main(["predict", "--bundle", str(root / "bundles_int8"), str(image)])
    out = capsys.readouterr()
    assert code == 0
    assert json.loads(out.out.strip().splitlines()[-1])["path"] == str(image)
    assert "int8-dynamic" in out.err and "onnx" in out.err
