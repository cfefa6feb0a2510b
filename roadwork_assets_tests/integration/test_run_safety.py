"""`roadwork run` refuses bad settings and environments before touching anything, holds
one lock per ROADWORK_HOME, and cleans up after runs that were killed."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
TINY = {"resources": {
    "dataset": {"config": {"default_n_images": 160, "default_image_size": 32}},
    "trainer": {"config": {"epochs": 1, "img_size": 32, "threads": 1}},
    "exit_policy": {"config": {"alpha": 0.2}},
}}


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def homes(tmp_path, monkeypatch):
    """A ROADWORK_HOME that already holds artifacts, and a DAGSTER_HOME."""
    home = tmp_path / "home"
    for rel in ("source_images/images.parquet", "split_assignment/assignment.parquet",
                "bundles/LATEST", "test_report/report.json"):
        (home / rel).parent.mkdir(parents=True, exist_ok=True)
        (home / rel).write_bytes(os.urandom(64))
    monkeypatch.setenv("ROADWORK_HOME", str(home))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    monkeypatch.delenv("ROADWORK_DATA", raising=False)
    monkeypatch.delenv("ROADWORK_WEIGHTS", raising=False)
    return home, tmp_path / "dagster"


def _one_error_line(capfd) -> str:
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("roadwork run: error: "), err
    return lines[0]


@pytest.mark.parametrize("config_json, env, needle", [
    ('{"resources": {"trainr": {"config": {"epochs": 1}}}}', {}, "unknown resource 'trainr'"),
    ('{"resources": {"trainer": {"config": {"epochz": 1}}}}', {}, "['epochz']"),
    ('{"resources": {"trainer": {"config": {"epochs": -3}}}}', {}, "config.epochs = -3"),
    ("{'resources': {}}", {}, "--config-json is not valid JSON"),
    ('{"resources": {"dataset": {"config": {"default_n_images": 160}}}}',
     {"ROADWORK_DATA": "/nonexistent/my.csv"}, "ROADWORK_DATA (dataset.spec)"),
    ("{}", {"ROADWORK_WEIGHTS": "/nonexistent/w.pt"}, "ROADWORK_WEIGHTS (trainer.weights_path)"),
])
def test_refused_run_leaves_every_artifact_byte_identical(homes, monkeypatch, capfd,
                                                          config_json, env, needle):
    from roadwork_assets import cli

    home, dagster_home = homes
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    before = tree_digest(home)
    assert cli.main(["run", "--config-json", config_json]) == 2
    assert needle in _one_error_line(capfd)
    assert tree_digest(home) == before
    assert not dagster_home.exists()  # refused before the instance was even created


@pytest.mark.parametrize("which", ["ROADWORK_HOME", "DAGSTER_HOME"])
def test_home_that_is_a_file_is_one_line(homes, tmp_path, monkeypatch, capfd, which):
    from roadwork_assets import cli

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(which, str(blocker))
    assert cli.main(["run", "--config-json", json.dumps(TINY)]) == 2
    assert f"{which}={blocker} is a file, not a folder" in _one_error_line(capfd)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through mode 0500")
def test_read_only_home_is_one_line(homes, capfd):
    from roadwork_assets import cli

    home, _ = homes
    home.chmod(0o500)
    try:
        assert cli.main(["run", "--config-json", json.dumps(TINY)]) == 2
        assert "ROADWORK_HOME=" in _one_error_line(capfd)
    finally:
        home.chmod(0o755)


def test_full_disk_is_one_line_and_keeps_the_last_artifacts(homes, monkeypatch, capfd):
    from roadwork_assets import cli, definitions
    from roadwork_assets.defs.data import assets as data_assets

    home, _ = homes

    def no_space(dest, *_a, **_k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dest))

    monkeypatch.setattr(data_assets, "atomic_write_parquet", no_space)
    monkeypatch.setattr(definitions, "defs", definitions.build_definitions())  # this home
    before = {k: v for k, v in tree_digest(home).items() if not k.startswith("data/")}
    code = cli.main(["run", "--config-json", json.dumps(TINY)])
    line = _one_error_line(capfd)
    assert code == 3
    assert "No space left on device" in line and "free disk space" in line
    after = tree_digest(home)
    assert all(after[k] == v for k, v in before.items())


def test_killed_runs_are_marked_failed_and_their_staging_collected(tmp_path):
    import dagster as dg
    from dagster._core.storage.dagster_run import DagsterRun

    from roadwork_assets.core.artifacts import collect_dead_leftovers
    from roadwork_assets.defs.runner import (
        HOST_TAG,
        PID_TAG,
        STAGE_TAG,
        fail_abandoned_runs,
    )

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    dead = proc.pid
    staging = tmp_path / "bundles" / f".staging-{dead}-k1ll"
    staging.mkdir(parents=True)
    (staging / "model.pt").write_bytes(b"a model copy")
    import socket

    def run(tags):
        return DagsterRun(job_name="__ASSET_JOB", run_id=str(uuid.uuid4()),
                          status=dg.DagsterRunStatus.STARTED, tags=tags)

    host = socket.gethostname()
    killed = run({STAGE_TAG: "3", PID_TAG: str(dead), HOST_TAG: host})
    alive = run({STAGE_TAG: "3", PID_TAG: str(os.getppid()), HOST_TAG: host})
    foreign = run({"dagster/from_ui": "true"})  # e.g. `dagster dev`: not ours to judge
    with dg.DagsterInstance.ephemeral() as instance:
        for r in (killed, alive, foreign):
            instance.add_run(r)
        assert fail_abandoned_runs(instance) == [killed.run_id]
        status = {r.run_id: instance.get_run_by_id(r.run_id).status
                  for r in (killed, alive, foreign)}
    assert status == {killed.run_id: dg.DagsterRunStatus.FAILURE,
                      alive.run_id: dg.DagsterRunStatus.STARTED,
                      foreign.run_id: dg.DagsterRunStatus.STARTED}
    assert collect_dead_leftovers(tmp_path) == [staging] and not staging.exists()


def _run_cli(env, *args) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "roadwork"), "run", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_concurrent_runs_on_one_home_run_one_at_a_time(tmp_path):
    """A holds the home; B (no --wait) is refused naming A; C (--wait) runs after A.
    Each finished run printed the bundle it made, and LATEST verifies."""
    env = dict(os.environ, ROADWORK_HOME=str(tmp_path / "home"),
               DAGSTER_HOME=str(tmp_path / "dagster"), DAGSTER_TELEMETRY_DISABLED="1")
    env.pop("ROADWORK_DATA", None)
    env.pop("ROADWORK_WEIGHTS", None)

    def config(seed):
        cfg = json.loads(json.dumps(TINY))
        cfg["resources"]["trainer"]["config"]["seed"] = seed
        return json.dumps(cfg)

    a = _run_cli(env, "--config-json", config(1))
    lock = tmp_path / "home" / ".roadwork.lock"
    deadline = time.time() + 120
    while not (lock.exists() and f'"pid": {a.pid}' in lock.read_text()):
        assert time.time() < deadline and a.poll() is None, "run A never took the lock"
        time.sleep(0.1)
    b = _run_cli(env, "--config-json", config(2))
    c = _run_cli(env, "--config-json", config(3), "--wait")
    outs = {name: p.communicate(timeout=540) for name, p in (("a", a), ("b", b), ("c", c))}
    codes = {"a": a.returncode, "b": b.returncode, "c": c.returncode}
    assert codes == {"a": 0, "b": 2, "c": 0}, {k: v[1][-2000:] for k, v in outs.items()}
    assert f"is in use by pid {a.pid}" in outs["b"][1] and "started 20" in outs["b"][1]
    assert len(outs["b"][1].strip().splitlines()) == 1
    assert f"is in use by pid {a.pid}" in outs["c"][0] and "waiting" in outs["c"][0]

    def printed(out: str, what: str) -> str:
        return next(line for line in out.splitlines()
                    if line.startswith(f"[roadwork] {what}")).split(": ", 1)[1]

    bundles = {k: printed(outs[k][0], "bundle") for k in ("a", "c")}
    assert bundles["a"] != bundles["c"]  # different seeds: different models
    home = tmp_path / "home"
    assert (home / "bundles" / "LATEST").read_text().strip() == bundles["c"]  # C ran last
    # the final report is C's: what C printed is what is on disk, for C's bundle
    report = json.loads((home / "test_report" / "report.json").read_text())
    assert report["bundle_id"] == bundles["c"]
    assert f"balanced accuracy {report['balanced_accuracy']:.4f}" in printed(outs["c"][0],
                                                                              "val_test")
    for bundle_id in bundles.values():
        ok = subprocess.run([str(BIN / "roadwork"), "verify", str(home / "bundles" / bundle_id)],
                            capture_output=True, text=True, timeout=300, check=False)
        assert ok.returncode == 0, ok.stderr
    assert not list(home.rglob("*.staged-*")) and not list(home.rglob(".staging-*"))
    # every artifact says which settings made it; C's trainer settings are in its policy
    policy = json.loads((home / "policies" / "softmax.json").read_text())
    assert policy["provenance"]["settings"]["exit_policy"]["values"]["alpha"] == 0.2
    from roadwork_assets.core.artifacts import read_parquet_provenance

    stamp = read_parquet_provenance(home / "split_manifest" / "train.parquet")
    assert stamp["settings"]["dataset"]["values"]["default_n_images"] == 160
    assert stamp["settings"]["dataset"]["sha256"] in outs["c"][0]
