"""`roadwork ui`: Dagster's webserver and daemon, with backfills that move at run speed.

Why not plain ``dagster dev``: "Materialize all" over this graph is an asset backfill
(split-partitioned assets between unpartitioned ones), and Dagster's backfill daemon
looks at a backfill once per loop, sleeping a hard-coded 30 s between loops
(``dagster/_daemon/backfill.py``: ``sleep_time = DEFAULT_DAEMON_INTERVAL_SECONDS -
loop_duration``; ``dagster.yaml``'s ``backfills`` settings have no interval). The
backfill advances one dependency level per loop, and this graph has ten
(unpartitioned -> per split -> per shard -> ... -> test_report), so under ``dagster dev``
the daemon's sleep alone costs ~5 minutes whatever the data.

``roadwork ui`` starts the same two processes ``dagster dev`` does
(``dagster-webserver`` and ``dagster-daemon run``, both on ``-m
roadwork_assets.definitions``), except that the daemon process first sets that module
constant to ``UiConfig.backfill_interval_s`` (default 1 s). Dagster reads it afresh on
every loop, so this is the only change; everything else (which runs the backfill
requests, their order, the run queue, run processes) is Dagster's own code. The same
constant is the asset daemon's tick when ``auto_materialize.minimum_interval_seconds``
is unset; the project's ``dagster.yaml`` sets it (30 s) so declarative automation keeps
Dagster's pace. If a Dagster upgrade drops the constant, the daemon refuses to start
with a line saying so, rather than silently running at 30 s. The daemon also starts the
run launcher's forkserver (``ForkserverRunLauncher.prewarm``) so the code location is
imported while the webserver starts, not when the first run is queued. `roadwork ui`
itself creates the instance's storage before starting either process and refuses a
second UI on the same DAGSTER_HOME.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from roadwork_assets.contracts.errors import RoadworkError

CODE_LOCATION = ["-m", "roadwork_assets.definitions"]
_CONSTANT = "DEFAULT_DAEMON_INTERVAL_SECONDS"


class UiConfig(BaseModel):
    """Settings of `roadwork ui` (the CLI flags)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(3000, ge=1, le=65535)
    backfill_interval_s: float = Field(
        1.0, ge=0.2, le=60.0,
        description="seconds the backfill daemon sleeps between loops (Dagster: 30)")
    log_level: str = "warning"


def set_backfill_interval(seconds: float) -> float:
    """Make Dagster's backfill loop sleep ``seconds`` between iterations; returns the old
    value. Refuses (RoadworkError) when this Dagster's loop no longer reads the constant."""
    from dagster._daemon import backfill, controller

    loop_source = inspect.getsource(backfill.execute_backfill_iteration_loop)
    if not hasattr(controller, _CONSTANT) or _CONSTANT not in loop_source:
        import dagster

        raise RoadworkError(
            f"dagster {dagster.__version__}'s backfill daemon no longer sleeps "
            f"dagster._daemon.controller.{_CONSTANT} between loops, so roadwork ui cannot "
            "shorten it: use `dagster dev -m roadwork_assets.definitions` (backfills then "
            "advance once per Dagster's own interval), or pin dagster==1.13.27")
    old = getattr(controller, _CONSTANT)
    setattr(controller, _CONSTANT, seconds)
    return old


def daemon_command(config: UiConfig) -> list[str]:
    return [sys.executable, "-m", "roadwork_assets.defs.ui", "daemon",
            str(config.backfill_interval_s), "run", "--log-level", config.log_level,
            *CODE_LOCATION]


def webserver_command(config: UiConfig) -> list[str]:
    return [sys.executable, "-m", "dagster_webserver", "-h", config.host, "-p",
            str(config.port), "--dagster-log-level", config.log_level, *CODE_LOCATION]


def serve_ui(config: UiConfig, say=print) -> int:
    """Run the webserver and the daemon until Ctrl-C / SIGTERM, or until one of them
    exits (then the other is stopped and the exit says which). DAGSTER_HOME must be set."""
    if not os.environ.get("DAGSTER_HOME"):
        raise RoadworkError("DAGSTER_HOME is not set: roadwork ui needs the instance "
                            "`roadwork run` uses (the CLI sets it)")
    home = Path(os.environ["DAGSTER_HOME"])
    with _one_ui_per_instance(home):
        prepare_instance(home)
        return _supervise(config, say)


@contextlib.contextmanager
def _one_ui_per_instance(home: Path):
    """Refuse a second `roadwork ui` on one DAGSTER_HOME: Dagster supports one daemon
    per instance (two log "Another ... daemon is still sending heartbeats" and race).
    A lock of its own, so `roadwork run` beside the UI is not blocked."""
    from roadwork_assets.core.runlock import HomeBusyError, hold_lock

    (home / "roadwork_ui").mkdir(parents=True, exist_ok=True)
    try:
        with hold_lock(home / "roadwork_ui", what="DAGSTER_HOME UI", command="roadwork ui"):
            yield
    except HomeBusyError as exc:
        raise RoadworkError(
            f"another roadwork ui already serves DAGSTER_HOME={home}: open that one (its "
            "terminal shows the URL) or stop it first; Dagster runs one daemon per "
            f"instance ({exc})") from None


def _supervise(config: UiConfig, say) -> int:
    procs = {"dagster-webserver": subprocess.Popen(webserver_command(config)),
             "dagster-daemon": subprocess.Popen(daemon_command(config))}
    say(f"[roadwork] UI: http://{config.host}:{config.port}  (DAGSTER_HOME="
        f"{os.environ['DAGSTER_HOME']}; backfills advance every "
        f"{config.backfill_interval_s:g}s; Ctrl-C stops both processes)")
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        while True:
            for name, proc in procs.items():
                if proc.poll() is not None:
                    say(f"[roadwork] {name} exited with code {proc.returncode}; stopping "
                        "the UI (its output above says why)")
                    return 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        say("[roadwork] stopping the webserver and the daemon")
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        _stop(procs.values())


def prepare_instance(dagster_home: Path) -> None:
    """Create (and migrate) the instance's storage before the webserver and the daemon
    start: both would otherwise create a new SQLite storage at once, and one of them
    dies on the other's half-written schema (``UNIQUE constraint failed:
    alembic_version``). ``dagster dev`` does the same in its parent process."""
    import dagster as dg

    from roadwork_assets.core.runlock import hold_lock

    with hold_lock(dagster_home, wait=True, what="DAGSTER_HOME", say=lambda _m: None), \
            dg.DagsterInstance.get():
        pass


def _raise_interrupt(_signum, _frame):
    raise KeyboardInterrupt


def _stop(procs, grace_s: float = 20.0) -> None:
    """SIGINT (both shut down cleanly, stopping their code servers), then kill."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
    deadline = time.monotonic() + grace_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _prewarm_run_launcher() -> None:
    """The daemon launches the runs: have its forkserver import the code location now,
    while the webserver starts, rather than when the first run is queued (~5 s)."""
    import dagster as dg

    from roadwork_assets.defs.run_launcher import ForkserverRunLauncher

    with dg.DagsterInstance.get() as instance:
        if isinstance(instance.run_launcher, ForkserverRunLauncher):
            try:
                instance.run_launcher.prewarm()
            except Exception as exc:  # the first run then starts it, or falls back
                print(f"roadwork ui daemon: warning: could not start the run launcher's "
                      f"forkserver early ({type(exc).__name__}: {exc})", file=sys.stderr)


def _daemon_main(argv: list[str]) -> None:
    """``python -m roadwork_assets.defs.ui daemon SECONDS run ...``: `dagster-daemon`
    with the backfill interval set first."""
    try:
        seconds = UiConfig(backfill_interval_s=float(argv[0])).backfill_interval_s
        set_backfill_interval(seconds)
    except (ValueError, IndexError) as exc:
        sys.exit(f"roadwork ui daemon: error: bad backfill interval {argv[:1]}: {exc}")
    except RoadworkError as exc:
        sys.exit(f"roadwork ui daemon: error: {exc}")
    _prewarm_run_launcher()
    from dagster._daemon.cli import main

    sys.argv = ["dagster-daemon", *argv[1:]]
    main()


if __name__ == "__main__":
    if sys.argv[1:2] != ["daemon"]:
        sys.exit(f"usage: python -m {__spec__.name} daemon SECONDS run [dagster-daemon options]"
                 f" (started by `roadwork ui`; see {Path(__file__).name})")
    _daemon_main(sys.argv[2:])
