"""ForkserverRunLauncher on a real Dagster instance, with a throwaway code location.

The code location is a package written into tmp_path whose import appends a line to a
counter file, so a test can tell how many times the code was imported: once by the
forkserver, not once per run.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import time
from multiprocessing import forkserver

import dagster as dg
import pytest
from dagster._core.definitions.reconstruct import ReconstructableRepository

from roadwork_assets.defs.run_launcher import (
    PID_TAG,
    ForkserverRunLauncher,
    run_worker,
    source_fingerprint,
)

DEFS = '''
import os, time
from pathlib import Path
import dagster as dg

with open(Path(__file__).parent / "imports.txt", "a") as f:
    f.write(f"{os.getpid()}\\n")
MESSAGE = "@MESSAGE@"

@dg.asset
def hello(context):
    context.log.info(f"{MESSAGE} from pid {os.getpid()}")
    return 1

@dg.asset
def slow(context):
    time.sleep(120)

defs = dg.Definitions(assets=[hello, slow], executor=dg.in_process_executor)
'''
# the current test's code location: (folder, package). Each test has its own package
# name: a module imported by an earlier test stays in this process's sys.modules
CODE: list = []


@pytest.fixture
def location(tmp_path, monkeypatch):
    name = "fsdemo_" + re.sub(r"\W", "_", tmp_path.name)
    pkg = tmp_path / "code" / name
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "defs.py").write_text(DEFS.replace("@MESSAGE@", "version one"))
    monkeypatch.syspath_prepend(str(tmp_path / "code"))
    # the forkserver imports its preload from the default sys.path (Python 3.11 ignores
    # the parent's): as an installed package is found
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "code"))
    CODE[:] = [tmp_path / "code", name]
    home = tmp_path / "dagster"
    home.mkdir()
    (home / "dagster.yaml").write_text(
        "telemetry: {enabled: false}\nrun_launcher:\n  module: roadwork_assets.defs.run_launcher\n"
        f"  class: ForkserverRunLauncher\n  config: {{preload: [{name}.defs]}}\n")
    yield pkg, home
    # the forkserver is per process: stop it so later tests start their own
    forkserver._forkserver._stop()


def _launch(instance: dg.DagsterInstance, asset: str) -> str:
    recon = ReconstructableRepository.for_module(f"{CODE[1]}.defs", "defs", str(CODE[0]))
    job = recon.get_reconstructable_job("__ASSET_JOB")
    run = instance.create_run_for_job(
        job_def=job.get_definition().get_subset(asset_selection={dg.AssetKey(asset)}),
        job_code_origin=job.get_python_origin(), asset_selection=frozenset({dg.AssetKey(asset)}))
    instance.launch_run(run.run_id, workspace=None)
    return run.run_id


def _wait(instance, run_id: str, timeout_s: float = 120) -> dg.DagsterRun:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run = instance.get_run_by_id(run_id)
        if run.is_finished:
            return run
        time.sleep(0.2)
    raise AssertionError(f"run {run_id} not finished after {timeout_s:.0f}s: {run.status}")


def _messages(instance, run_id: str) -> list[str]:
    return [e.dagster_event.message if e.dagster_event and e.dagster_event.message
            else e.user_message for e in instance.all_logs(run_id)]


def test_runs_fork_from_one_import_of_the_code(location):
    pkg, home = location
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert isinstance(instance.run_launcher, ForkserverRunLauncher)
        ids = [_launch(instance, "hello") for _ in range(2)]
        runs = [_wait(instance, run_id) for run_id in ids]
        assert [r.status for r in runs] == [dg.DagsterRunStatus.SUCCESS] * 2
        pids = [int(r.tags[PID_TAG]) for r in runs]
        assert len(set(pids)) == 2 and os.getpid() not in pids
        for run_id, pid in zip(ids, pids, strict=True):
            # Dagster's run worker body ran in the forked process, with the preloaded code
            assert f"Executing steps in process (pid: {pid})" in _messages(instance, run_id)
            assert f"version one from pid {pid}" in _messages(instance, run_id)
    # imported by this test (to create the runs) and once more, by the forkserver only
    imports = [int(pid) for pid in (pkg / "imports.txt").read_text().split()]
    others = [pid for pid in imports if pid != os.getpid()]
    assert len(others) == 1 and others[0] not in pids, imports


def test_edited_code_restarts_the_forkserver(location):
    pkg, home = location
    with dg.DagsterInstance.from_config(str(home)) as instance:
        first = _wait(instance, _launch(instance, "hello"))
        (pkg / "defs.py").write_text(DEFS.replace("@MESSAGE@", "version two"))
        second = _wait(instance, _launch(instance, "hello"))
        assert first.status == second.status == dg.DagsterRunStatus.SUCCESS
        pid = second.tags[PID_TAG]
        assert f"version two from pid {pid}" in _messages(instance, second.run_id)
    imports = [int(pid) for pid in (pkg / "imports.txt").read_text().split()]
    assert len([pid for pid in imports if pid != os.getpid()]) == 2  # a new forkserver


def test_prewarm_imports_before_the_first_run_and_never_serves_older_code(location):
    """`roadwork ui`'s daemon prewarms the forkserver at start; code edited after that
    import and before the first run must still be what the first run executes."""
    pkg, home = location
    with dg.DagsterInstance.from_config(str(home)) as instance:
        instance.run_launcher.prewarm()
        deadline = time.monotonic() + 60
        while not (pkg / "imports.txt").exists():  # imported with no run asked for
            assert time.monotonic() < deadline, "the prewarmed forkserver never imported"
            time.sleep(0.2)
        warm = _wait(instance, _launch(instance, "hello"))
        assert f"version one from pid {warm.tags[PID_TAG]}" in _messages(instance, warm.run_id)
        (pkg / "defs.py").write_text(DEFS.replace("@MESSAGE@", "version four"))
        instance.run_launcher.prewarm()  # the daemon restarted: prewarm, then the edit...
        (pkg / "defs.py").write_text(DEFS.replace("@MESSAGE@", "version five"))
        run = _wait(instance, _launch(instance, "hello"))
        assert f"version five from pid {run.tags[PID_TAG]}" in _messages(instance, run.run_id)


def test_a_run_forked_before_an_edit_reexecs_dagster(location):
    """The race the launcher cannot see: code edited between its hash and the fork."""
    pkg, home = location
    with dg.DagsterInstance.from_config(str(home)) as instance:
        _wait(instance, _launch(instance, "hello"))  # starts the forkserver
        recon = ReconstructableRepository.for_module(f"{CODE[1]}.defs", "defs", str(CODE[0]))
        job = recon.get_reconstructable_job("__ASSET_JOB")
        run = instance.create_run_for_job(
            job_def=job.get_definition().get_subset(asset_selection={dg.AssetKey("hello")}),
            job_code_origin=job.get_python_origin(),
            asset_selection=frozenset({dg.AssetKey("hello")}))
        (pkg / "defs.py").write_text(DEFS.replace("@MESSAGE@", "version three"))
        proc = multiprocessing.get_context("forkserver").Process(
            target=run_worker, args=(run.run_id, instance.get_ref(), [f"{CODE[1]}.defs"],
                                     "fingerprint of the forkserver's import"))
        proc.start()
        proc.join(120)
        done = _wait(instance, run.run_id)
        assert done.status == dg.DagsterRunStatus.SUCCESS
        messages = _messages(instance, run.run_id)
        assert any("code changed since the forkserver imported it" in m for m in messages)
        assert any("version three from pid" in m for m in messages)  # the new code ran


def test_terminate_cancels_a_forked_run(location):
    _pkg, home = location
    with dg.DagsterInstance.from_config(str(home)) as instance:
        run_id = _launch(instance, "slow")
        deadline = time.monotonic() + 60
        while instance.get_run_by_id(run_id).status != dg.DagsterRunStatus.STARTED:
            assert time.monotonic() < deadline, "the slow run never started"
            time.sleep(0.2)
        assert instance.run_launcher.check_run_worker_health(
            instance.get_run_by_id(run_id)).status.value == "RUNNING"
        assert instance.run_launcher.terminate(run_id)
        run = _wait(instance, run_id, timeout_s=60)
        assert run.status == dg.DagsterRunStatus.CANCELED
        health = instance.run_launcher.check_run_worker_health(run)
        assert health.status.value == "FAILED" and "is gone" in health.msg


def _started(instance, run_id: str, timeout_s: float = 60) -> dg.DagsterRun:
    deadline = time.monotonic() + timeout_s
    while (run := instance.get_run_by_id(run_id)).status != dg.DagsterRunStatus.STARTED:
        assert time.monotonic() < deadline, f"run {run_id} never started: {run.status}"
        time.sleep(0.2)
    return run


def test_an_edit_during_a_long_run_does_not_freeze_the_next_runs(location):
    """The old forkserver lives until the runs it forked end; retiring it must not wait
    for them (multiprocessing's own _stop would, holding the daemon's run queue)."""
    pkg, home = location
    with dg.DagsterInstance.from_config(str(home)) as instance:
        slow = _launch(instance, "slow")
        _started(instance, slow)
        (pkg / "defs.py").write_text(DEFS.replace("@MESSAGE@", "version six"))
        t0 = time.monotonic()
        run = _wait(instance, _launch(instance, "hello"), timeout_s=60)
        assert time.monotonic() - t0 < 45  # the slow run sleeps 120 s
        assert run.status == dg.DagsterRunStatus.SUCCESS
        assert f"version six from pid {run.tags[PID_TAG]}" in _messages(instance, run.run_id)
        assert instance.get_run_by_id(slow).status == dg.DagsterRunStatus.STARTED
        assert instance.run_launcher.terminate(slow)
        assert _wait(instance, slow).status == dg.DagsterRunStatus.CANCELED


def test_a_killed_worker_is_marked_failed_by_run_monitoring(location):
    """kill -9 (as the OOM killer does): Dagster's run monitoring asks the launcher and
    fails the run instead of leaving it STARTED. A plain SIGTERM (no cancel request) is
    caught by Dagster's interrupt handling in the worker: a failed run, recorded."""
    import logging
    import signal

    from dagster._daemon.monitoring.run_monitoring import monitor_started_run

    _pkg, home = location
    with dg.DagsterInstance.from_config(str(home)) as instance:
        killed = _started(instance, _launch(instance, "slow"))
        os.kill(int(killed.tags[PID_TAG]), signal.SIGKILL)
        deadline = time.monotonic() + 30
        while instance.run_launcher.check_run_worker_health(killed).status.value == "RUNNING":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        monitor_started_run(instance, None, instance.get_run_record_by_id(killed.run_id),
                            logging.getLogger("test"))
        assert instance.get_run_by_id(killed.run_id).status == dg.DagsterRunStatus.FAILURE
        termed = _started(instance, _launch(instance, "slow"))
        os.kill(int(termed.tags[PID_TAG]), signal.SIGTERM)
        assert _wait(instance, termed.run_id).status == dg.DagsterRunStatus.FAILURE
        assert any("interrupted" in (m or "").lower() for m in _messages(instance, termed.run_id))


def test_runs_not_forked_here_are_never_failed_by_monitoring(location):
    """`roadwork run` / `dagster asset materialize` runs execute in their own process:
    the launcher has no worker to judge, and must not report them dead."""
    _pkg, home = location
    with dg.DagsterInstance.from_config(str(home)) as instance:
        run = instance.create_run_for_job(job_def=dg.Definitions(
            assets=[dg.asset(lambda: 1, name="x")]).resolve_implicit_global_asset_job_def())
        health = instance.run_launcher.check_run_worker_health(run)
        assert health.status.value == "RUNNING"


def test_fingerprint_follows_the_source_files(location, monkeypatch):
    pkg, _home = location
    module = f"{CODE[1]}.defs"
    before = source_fingerprint([module])
    assert source_fingerprint([module, CODE[1]]) == before  # per package
    (pkg / "extra.py").write_text("X = 1\n")
    assert source_fingerprint([module]) != before
    # an upgraded library changes it too: a .dist-info name in a site-packages folder
    site = pkg.parent.parent / "env" / "site-packages"
    site.mkdir(parents=True)
    monkeypatch.syspath_prepend(str(site))
    edited = source_fingerprint([module])
    (site / "somelib-1.0.dist-info").mkdir()
    assert source_fingerprint([module]) != edited
    assert source_fingerprint(["no_such_package_here"]) != before


def test_the_project_dagster_yaml_loads(tmp_path):
    """The instance config `roadwork run` / `roadwork ui` copy into DAGSTER_HOME is valid
    and gives the launcher, the 1 s run queue and the 30 s automation tick it promises."""
    import shutil

    from dagster._core.run_coordinator import QueuedRunCoordinator

    from roadwork_assets.cli import REPO_DAGSTER_YAML

    shutil.copyfile(REPO_DAGSTER_YAML, tmp_path / "dagster.yaml")
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        assert isinstance(instance.run_launcher, ForkserverRunLauncher)
        assert isinstance(instance.run_coordinator, QueuedRunCoordinator)
        assert instance.run_coordinator.dequeue_interval_seconds == 1
        assert instance.auto_materialize_minimum_interval_seconds == 30
