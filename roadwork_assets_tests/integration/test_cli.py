"""The Dagster CLI and the `roadwork` CLI, as subprocesses, with a persistent DAGSTER_HOME."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent
SMALL = {
    "resources": {
        "dataset": {"config": {"default_n_images": 320, "default_image_size": 64}},
        "trainer": {"config": {"epochs": 1, "img_size": 32, "threads": 2}},
        # 320 images in 160 scenes: val_calib holds ~20 scenes with roadwork, ~10 in its
        # threshold part, and CRC at alpha 0.1 needs 9 of them; 0.2 needs 4
        "exit_policy": {"config": {"alpha": 0.2}},
    }
}


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("ROADWORK_EMBEDDING_SHARDS", None)  # the default: one shard per split
    env.update(ROADWORK_HOME=str(tmp_path / "home"), DAGSTER_HOME=str(tmp_path / "dagster"),
               DAGSTER_TELEMETRY_DISABLED="1")
    env.pop("ROADWORK_DATA", None)
    (tmp_path / "dagster").mkdir(exist_ok=True)
    return env


def _dagster(env, *args: str) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "dagster"), "asset", "materialize", "-m", "roadwork_assets.definitions",
           "--config-json", json.dumps(SMALL), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_definitions_validate():
    proc = subprocess.run([str(BIN / "dagster"), "definitions", "validate", "-m",
                           "roadwork_assets.definitions"], capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_dagster_cli_materializes_partitions_then_downstream(tmp_path):
    import dagster as dg

    env = _env(tmp_path)
    _dagster(env, "--select", "source_images,split_assignment")
    # split_manifest is per split, embeddings per split x shard ("<shard>|<split>"; one
    # shard by default): one Dagster run holds one partition of one partitioning
    for split in ("train", "val_select"):
        _dagster(env, "--select", "split_manifest", "--partition", split)
        _dagster(env, "--select", "embeddings", "--partition", f"0|{split}")
    _dagster(env, "--select", "checkpoint")
    with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        ckpt = instance.get_latest_materialization_event(dg.AssetKey("checkpoint"))
        assert ckpt is not None
        meta = ckpt.asset_materialization.metadata
        assert meta["splits_read"].value == ["train", "val_select"]
        assert meta["partitions_read"].value == [
            "adapted_backbone", "embeddings[0|train]", "embeddings[0|val_select]"]
        parts = instance.get_materialized_partitions(dg.AssetKey("embeddings"))
        assert parts == {"0|train", "0|val_select"}
    assert (tmp_path / "home" / "checkpoint" / "model.pt").exists()


def test_roadwork_verify_and_predict_cli(materialized_root, tmp_path):
    root, _, _ = materialized_root
    from roadwork_assets.core.artifacts import ArtifactRegistry

    bundle = ArtifactRegistry(root).latest_bundle()
    ok = subprocess.run([str(BIN / "roadwork"), "verify", str(bundle)], capture_output=True,
                        text=True, timeout=300, check=False)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["ok"] is True
    images = sorted((root / "data" / "default" / "images" / "roadwork").glob("*.jpg"))[:2]
    pred = subprocess.run([str(BIN / "roadwork"), "predict", "--bundle", str(bundle),
                           *map(str, images)], capture_output=True, text=True, timeout=300, check=False)
    assert pred.returncode == 0, pred.stderr
    lines = [json.loads(line) for line in pred.stdout.strip().splitlines()]
    assert [line["path"] for line in lines] == [str(p) for p in images]
    for line in lines:
        assert 0.0 <= line["probability"] <= 1.0
        assert line["decision"] in {"positive", "negative", "defer"}
        assert line["stage"] in {1, 2}  # 2: a cascade bundle routed it to stage 2
        # StreetVision binarises at 0.5: the emitted probability agrees with a stage-1 "negative"
        assert (line["probability"] < 0.5) == (line["decision"] == "negative")


def test_roadwork_verify_fails_on_tampered_bundle(materialized_root, tmp_path):
    import shutil

    root, _, _ = materialized_root
    from roadwork_assets.core.artifacts import ArtifactRegistry

    copy = tmp_path / "bundle"
    shutil.copytree(ArtifactRegistry(root).latest_bundle(), copy)
    policy = copy / "policy.json"
    policy.write_text(policy.read_text().replace('"alpha": 0.05', '"alpha": 0.5'))
    bad = subprocess.run([str(BIN / "roadwork"), "verify", str(copy)], capture_output=True,
                         text=True, timeout=300, check=False)
    assert bad.returncode == 2
    assert "policy: policy.json sha256 differs" in bad.stderr
