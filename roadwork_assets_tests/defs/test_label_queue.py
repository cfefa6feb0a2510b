"""label_queue through a real Dagster run on a real bundle and an awkward pool: 20
near-identical frames of one drive plus other scenes give a top-k with at most a few of
that drive, written as Label Studio import JSON; no pool gives an empty queue; the graph
refuses a label_queue that could carry val_test."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pytest

from roadwork_assets.core.artifacts import ArtifactRegistry
from roadwork_assets.definitions import ALL_ASSETS, build_definitions
from roadwork_assets.defs.leakage_audit import audit_taint
from roadwork_assets_tests.awkward_data import encode_item, generate_awkward
from roadwork_assets_tests.conftest import tiny_resources


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """ROADWORK_HOME holding one tiny cascade bundle as LATEST."""
    from roadwork_assets.core.export.bundle import build_bundle, set_latest
    from roadwork_assets_tests.core.export.conftest import (
        fit_cascade_artifacts,
        save_tiny_checkpoint,
    )

    root = tmp_path_factory.mktemp("lq_home")
    reg = ArtifactRegistry(root)
    save_tiny_checkpoint(reg.checkpoint)
    policy_path, stage2_path = fit_cascade_artifacts(reg, n=160)
    _, manifest, _ = build_bundle(
        reg.bundles_dir, checkpoint_path=reg.checkpoint, policy_path=policy_path,
        policy_asset="cascade_policy", export_onnx_model=False, stage2_path=stage2_path)
    set_latest(reg.latest_bundle_pointer, manifest.bundle_id)
    return root


def _pool(folder: Path) -> set[str]:
    """A 20-frame burst of one drive, 40 other awkward scenes, one broken file; returns
    the burst's file paths."""
    folder.mkdir()
    burst = generate_awkward(20, seed=11, image_size=64, styles={"burst": 1.0}, burst_size=20)
    assert len({item.burst_id for item in burst}) == 1
    others = generate_awkward(40, seed=12, image_size=64,
                              styles={"street": 1, "night": 1, "grayscale": 1, "low_texture": 1})
    burst_paths = set()
    for item in burst + others:
        data, ext = encode_item(item)
        path = folder / f"{item.item_id}.{ext}"
        path.write_bytes(data)
        if item in burst:
            burst_paths.add(str(path))
    (folder / "truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    return burst_paths


def _run(root: Path, config: dict):
    defs = build_definitions(tiny_resources(root))
    job = defs.resolve_implicit_global_asset_job_def()
    with dg.DagsterInstance.ephemeral() as instance:
        result = job.execute_in_process(
            instance=instance, asset_selection=[dg.AssetKey("label_queue")],
            run_config={"ops": {"label_queue": {"config": config}}}, raise_on_error=True)
    (mat,) = result.asset_materializations_for_node("label_queue")
    checks = result.get_asset_check_evaluations()
    return mat.metadata, checks


def test_label_queue_is_diverse_and_exports_label_studio_tasks(home, tmp_path):
    burst = _pool(tmp_path / "pool")
    meta, checks = _run(home, {"pool": str(tmp_path / "pool"), "top_k": 8,
                               "url_root": str(tmp_path)})
    assert [c.passed for c in checks] == [True]
    assert meta["splits_read"].value == []
    assert meta["n_pool"].value == 61 and meta["n_unreadable"].value == 1
    assert "truncated.jpg" in meta["unreadable"].value[0]["path"]
    tasks = json.loads((ArtifactRegistry(home).root / "label_queue" / "tasks.json").read_text())
    assert len(tasks) == meta["n_queued"].value == 8
    picked = [t["data"]["roadwork_path"] for t in tasks]
    assert len(set(picked)) == 8
    assert len(burst & set(picked)) <= 2, "one drive's frames fill the queue"
    for t in tasks:
        assert t["data"]["image"].startswith("/data/local-files/?d=pool/")
        (result,) = t["predictions"][0]["result"]
        assert result["type"] == "choices" and result["value"]["choices"][0] in {"roadwork", "none"}
        assert 0.5 <= t["predictions"][0]["score"] <= 1.0
    ranks = [t["data"]["roadwork_rank"] for t in tasks]
    assert ranks == list(range(1, 9))
    config = Path(meta["label_config"].value).read_text()
    assert '<Choice value="roadwork"/>' in config
    assert meta["queue"].value.replace(" ", "").startswith("|rank|file|uncertainty|")
    # the same pool by uncertainty alone (diversity 0): the drive's frames take over
    _run(home, {"pool": str(tmp_path / "pool"), "top_k": 8, "diversity": 0.0,
                "url_root": str(tmp_path)})
    tasks = json.loads((ArtifactRegistry(home).root / "label_queue" / "tasks.json").read_text())
    assert len(burst & {t["data"]["roadwork_path"] for t in tasks}) >= 4


def test_no_pool_gives_an_empty_queue(home, monkeypatch):
    monkeypatch.delenv("ROADWORK_UNLABELLED", raising=False)
    meta, checks = _run(home, {})
    assert meta["n_queued"].value == 0 and "ROADWORK_UNLABELLED" in meta["why_empty"].value
    assert json.loads((ArtifactRegistry(home).root / "label_queue" / "tasks.json").read_text()) == []
    assert all(c.passed for c in checks)


def test_a_label_queue_reading_the_test_report_is_refused(tmp_path):
    @dg.asset(name="label_queue", ins={"test_report": dg.AssetIn()})
    def sneaky(test_report):
        return None

    assets = [a for a in ALL_ASSETS if "label_queue" not in
              {k.to_user_string() for k in a.keys}] + [sneaky]
    graph = dg.Definitions(assets=assets, resources=tiny_resources(tmp_path)).resolve_asset_graph()
    problems = [p for p in audit_taint(graph) if "'label_queue'" in p]
    assert problems and all("val_test" in p for p in problems)
