"""Artifact integrity: atomic writes survive SIGKILL, unsafe pickles are refused,
unknown schema versions are refused."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from roadwork_assets.contracts.errors import ArtifactIntegrityError
from roadwork_assets.contracts.schemas import BundleManifest, load_json_artifact
from roadwork_assets.core.artifacts import ArtifactRegistry, atomic_write_text
from roadwork_assets.core.training.checkpoint import load_checkpoint, save_checkpoint


def _save(path, epoch, n_floats):
    save_checkpoint(
        path, model_state_dict={"w": torch.full((n_floats,), float(epoch))}, epoch=epoch,
        best_metric=0.1, best_metric_name="val_select_nll", config={"img_size": 96},
        backbone_name="test_resnet.r160_in1k", mode="end_to_end", data_version="d",
        code_version="c", assignment_version="a", weights_sha256="",
    )


def test_sigkill_during_checkpoint_write_leaves_previous_version_intact(tmp_path):
    path = tmp_path / "checkpoint" / "model.pt"
    _save(path, epoch=1, n_floats=1000)
    script = textwrap.dedent(f"""
        import torch
        from roadwork_assets.core.training.checkpoint import save_checkpoint
        save_checkpoint({str(path)!r}, model_state_dict={{"w": torch.full((150_000_000,), 2.0)}},
            epoch=2, best_metric=0.0, best_metric_name="x", config={{"img_size": 96}},
            backbone_name="b", mode="end_to_end", data_version="d", code_version="c",
            assignment_version="a", weights_sha256="")
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 120
    tmp_seen = None
    while time.time() < deadline and proc.poll() is None:
        # atomic_path's temporary name: .model.pt.tmp-<pid>-<random>
        tmps = [p for p in path.parent.iterdir() if ".tmp-" in p.name]
        if tmps and tmps[0].stat().st_size > 10_000_000:  # mid-write: bytes are landing
            tmp_seen = tmps[0]
            break
        time.sleep(0.005)
    assert tmp_seen is not None, "writer finished or never started writing; cannot test kill"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    payload = load_checkpoint(path)
    assert payload["epoch"] == 1
    assert torch.equal(payload["model_state_dict"]["w"], torch.full((1000,), 1.0))


def test_failed_write_removes_temp_file_and_keeps_old_content(tmp_path):
    dest = tmp_path / "a.txt"
    atomic_write_text(dest, "old")

    class Boom(Exception):
        pass

    from roadwork_assets.core.artifacts import atomic_path

    with pytest.raises(Boom), atomic_path(dest) as tmp:
        tmp.write_text("half")
        raise Boom
    assert dest.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_checkpoint_that_would_run_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model_state_dict": {}, "payload": _RunsCode()}, path)
    with pytest.raises(ArtifactIntegrityError, match="weights_only"):
        load_checkpoint(path)
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(_RunsCode()))
    with pytest.raises(ArtifactIntegrityError, match="refusing to load"):
        load_checkpoint(raw)


def test_checkpoint_missing_keys_and_truncation_are_refused(tmp_path):
    path = tmp_path / "partial.pt"
    torch.save({"model_state_dict": {}, "epoch": 1}, path)
    with pytest.raises(ArtifactIntegrityError, match="lacks required keys"):
        load_checkpoint(path)
    good = tmp_path / "good.pt"
    _save(good, 1, 10)
    good.write_bytes(good.read_bytes()[:100])
    with pytest.raises(ArtifactIntegrityError, match="unreadable or truncated|refusing"):
        load_checkpoint(good)


def test_unknown_schema_version_is_refused_clearly(tmp_path):
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"schema_version": 99, "bundle_id": "x"}))
    with pytest.raises(ArtifactIntegrityError, match="schema_version 99 is not supported"):
        load_json_artifact(path, BundleManifest)
    path.write_text("{not json")
    with pytest.raises(ArtifactIntegrityError, match="not valid JSON"):
        load_json_artifact(path, BundleManifest)


def test_registry_names_paths_under_root_only(tmp_path):
    reg = ArtifactRegistry(tmp_path)
    paths = [reg.source_table, reg.split_assignment, reg.checkpoint, reg.test_report,
             *(reg.split_manifest(s) for s in ("train", "val_test")),
             reg.embedding_shard("val_calib", 2), reg.logits("val_select"), reg.policy("gate")]
    assert all(tmp_path in p.parents for p in paths)
    assert not any(tmp_path.iterdir())  # naming a path creates nothing
    assert reg.embedding_shard("val_calib", 2) == tmp_path / "embeddings/val_calib/shard_2.npz"
    with pytest.raises(ValueError, match="unknown split"):
        reg.logits("test")
    with pytest.raises(ValueError, match="shard must be a non-negative int"):
        reg.embedding_shard("train", -1)
