"""`roadwork ui`'s daemon: Dagster's own backfill loop, at the interval it was given."""

from __future__ import annotations

import logging
import threading
import time

import dagster as dg
import pytest
from dagster._core.workspace.context import WorkspaceProcessContext
from dagster._core.workspace.load_target import EmptyWorkspaceTarget
from dagster._daemon import controller
from dagster._daemon.backfill import execute_backfill_iteration_loop
from dagster._daemon.daemon import SpanMarker

from roadwork_assets.contracts.errors import RoadworkError
from roadwork_assets.defs.ui import UiConfig, daemon_command, set_backfill_interval


def _iterations(seconds: float) -> int:
    """How many passes Dagster's backfill loop makes in ``seconds`` (empty workspace)."""
    with dg.instance_for_test() as instance, WorkspaceProcessContext(
            instance, EmptyWorkspaceTarget()) as context:
        ends = [item for item in execute_backfill_iteration_loop(
            context, logging.getLogger("test"), threading.Event(),
            until=time.time() + seconds) if item is SpanMarker.END_SPAN]
    return len(ends)


def test_the_backfill_loop_sleeps_the_interval_it_was_given(monkeypatch):
    monkeypatch.setattr(controller, "DEFAULT_DAEMON_INTERVAL_SECONDS",
                        controller.DEFAULT_DAEMON_INTERVAL_SECONDS)  # restored afterwards
    assert set_backfill_interval(0.25) == 30  # Dagster's fixed interval, replaced
    # 2 s at 0.25 s per pass: ~8 passes (Dagster's 30 s: one pass, then 30 s asleep)
    assert _iterations(2.0) >= 5


def test_a_dagster_without_the_interval_is_refused(monkeypatch):
    monkeypatch.delattr(controller, "DEFAULT_DAEMON_INTERVAL_SECONDS")
    with pytest.raises(RoadworkError, match="dagster dev -m roadwork_assets.definitions"):
        set_backfill_interval(1.0)


def test_the_daemon_entry_refuses_a_bad_interval_in_one_line():
    import subprocess
    import sys

    command = daemon_command(UiConfig())
    command[4] = "soon"
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith(
        "roadwork ui daemon: error: bad backfill interval ['soon']")
    assert command[0] == sys.executable


@pytest.mark.parametrize("flag,value,message", [
    ("--backfill-interval", "0", "--backfill-interval: Input should be greater than or equal to 0.2"),
    ("--backfill-interval", "600", "--backfill-interval: Input should be less than or equal to 60"),
    ("--port", "70000", "--port: Input should be less than or equal to 65535"),
])
def test_bad_ui_flags_are_one_line(flag, value, message, capsys):
    from roadwork_assets.cli import main

    assert main(["ui", flag, value]) == 2
    assert capsys.readouterr().err.strip() == f"roadwork ui: error: {message}"


def test_the_instance_storage_exists_before_the_ui_processes_start(tmp_path, monkeypatch):
    """On a new DAGSTER_HOME the webserver and the daemon used to race to create the
    SQLite schema (one died: UNIQUE constraint failed: alembic_version); the parent
    now creates it first."""
    from roadwork_assets.defs.ui import prepare_instance

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    prepare_instance(tmp_path)
    assert (tmp_path / "history" / "runs.db").exists()
    with dg.DagsterInstance.get() as instance:  # a second opener finds it ready
        assert instance.get_runs() == []


def test_a_second_ui_on_one_instance_is_refused_at_once(tmp_path):
    """While one `roadwork ui` holds DAGSTER_HOME, another is refused in one line before
    it starts a second daemon (Dagster supports one per instance)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from roadwork_assets.defs.ui import _one_ui_per_instance

    env = dict(os.environ, DAGSTER_HOME=str(tmp_path), ROADWORK_HOME=str(tmp_path / "rw"))
    roadwork = str(Path(sys.executable).parent / "roadwork")
    with _one_ui_per_instance(tmp_path):  # what the first `roadwork ui` holds while up
        done = subprocess.run([roadwork, "ui", "--port", "1"], env=env, capture_output=True,
                              text=True, timeout=120, check=False)
    assert done.returncode == 2
    assert done.stderr.startswith(
        f"roadwork ui: error: another roadwork ui already serves DAGSTER_HOME={tmp_path}")
    assert "dagster-webserver" not in done.stdout + done.stderr  # nothing was started
