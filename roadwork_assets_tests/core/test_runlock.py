"""One run per ROADWORK_HOME (flock), staged names unique per process, and the leftovers
of dead runs collected."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from roadwork_assets.core.artifacts import collect_dead_leftovers, staged_path
from roadwork_assets.core.runlock import HomeBusyError, hold_lock


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_second_run_is_refused_at_once_naming_the_holder(tmp_path):
    with hold_lock(tmp_path, say=lambda _m: None):
        t0 = time.perf_counter()
        with pytest.raises(HomeBusyError) as err, hold_lock(tmp_path):
            pass
        assert time.perf_counter() - t0 < 1.0
    msg = str(err.value)
    assert f"pid {os.getpid()}" in msg and "started 20" in msg and "--wait" in msg
    assert "\n" not in msg
    with hold_lock(tmp_path):  # released on exit: free again
        pass


def test_wait_queues_behind_the_holder(tmp_path):
    said = []
    released = threading.Event()

    def holder():
        with hold_lock(tmp_path):
            time.sleep(0.6)
        released.set()

    t = threading.Thread(target=holder)
    t.start()
    time.sleep(0.2)
    with hold_lock(tmp_path, wait=True, say=said.append, poll_s=0.05):
        assert released.is_set()
    t.join()
    assert len(said) == 1 and "waiting for it to finish" in said[0]


def test_lock_of_a_killed_holder_is_free(tmp_path):
    code = ("import sys, time; from roadwork_assets.core.runlock import hold_lock\n"
            f"with hold_lock({str(tmp_path)!r}):\n    print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(HomeBusyError, match=f"pid {proc.pid}"), hold_lock(tmp_path):
        pass
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with hold_lock(tmp_path):
        pass


def test_staged_names_are_unique_per_process(tmp_path):
    dest = tmp_path / "report.json"
    mine = staged_path(dest)
    assert staged_path(dest) == mine  # stable within a process: write, then promote
    assert mine.name.startswith(f".report.json.staged-{os.getpid()}-") and mine.suffix == ".json"
    other = subprocess.run(
        [sys.executable, "-c", ("import sys; from roadwork_assets.core.artifacts import "
         f"staged_path; print(staged_path({str(dest)!r}))")],
        capture_output=True, text=True, check=True).stdout.strip()
    assert other != str(mine)


def test_leftovers_of_dead_runs_are_collected_and_live_ones_kept(tmp_path):
    dead, live = _dead_pid(), os.getpid()
    staging = tmp_path / "bundles" / f".staging-{dead}-x1y2"
    staging.mkdir(parents=True)
    (staging / "model.pt").write_bytes(b"copy")
    dead_files = [tmp_path / "test_report" / f".report.json.staged-{dead}-ab12cd34.json",
                  tmp_path / "checkpoint" / f".model.pt.tmp-{dead}-q8w9"]
    keep = [tmp_path / "test_report" / f".report.json.staged-{live}-00ff00ff.json",
            tmp_path / "bundles" / f".staging-{live}-abc" / "model.pt",
            tmp_path / "test_report" / "report.json",
            tmp_path / "test_report" / "report.json.rejected.json"]
    for path in dead_files + keep:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    removed = collect_dead_leftovers(tmp_path)
    assert sorted(removed) == sorted([staging, *dead_files])
    assert not staging.exists() and not any(p.exists() for p in dead_files)
    assert all(p.exists() for p in keep)
