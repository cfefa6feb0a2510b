"""Launch each run in a process forked from one that imported the code location once.

Dagster's ``DefaultRunLauncher`` starts every run as a fresh ``dagster api
execute_run`` interpreter, which imports this code location (torch, timm, sklearn,
onnxruntime, the definitions: ~5 s on 2 cores, ~15 s when four start at once).
"Materialize all" over this graph launches ~21 runs in 10 dependency levels, so under
``DefaultRunLauncher`` the imports take longer than the work (tiny config: runs of ~2 s
work each, each starting 8-30 s after it was queued).

``ForkserverRunLauncher`` starts runs through Python's ``multiprocessing`` forkserver
(the start method Dagster's own multiprocess executor offers for steps): the forkserver
imports ``preload`` (``roadwork_assets.definitions``) once, and each run is a fork of
it that executes the run exactly as ``dagster api execute_run`` does
(``_execute_run_command_body``: Dagster's run worker body, event log, failure
handling). What the run executes is unchanged; only the interpreter start is saved.

Never stale code: before each run the launcher hashes the preloaded packages' source
files and restarts the forkserver if they changed since it was started; the forked run
hashes them again and, if the code changed in between, replaces itself with a fresh
``dagster api execute_run`` interpreter (Dagster's own command) and logs why. If the forkserver cannot start a run (no forkserver on this platform, a
preload that fails), the run is launched by ``DefaultRunLauncher`` and an engine event
says why. Termination: SIGINT to the run's process (Dagster marks it canceled).

Configure in ``dagster.yaml`` (the project's default)::

    run_launcher:
      module: roadwork_assets.defs.run_launcher
      class: ForkserverRunLauncher
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import multiprocessing
import os
import signal
import socket
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dagster._core.launcher import DefaultRunLauncher
from dagster._core.launcher.base import CheckRunHealthResult, LaunchRunContext, WorkerStatus
from dagster._serdes import ConfigurableClassData

from roadwork_assets.core.artifacts import hash_source_tree

PID_TAG = "roadwork/run_worker_pid"
HOST_TAG = "roadwork/run_worker_host"
DEFAULT_PRELOAD = ("roadwork_assets.definitions",)


def source_fingerprint(modules: list[str]) -> str:
    """sha256 over the ``*.py`` files, as they are on disk now, of the top-level packages
    of ``modules`` (for ``roadwork_assets.definitions``: the package whose hash assets
    stamp as their code version), found without importing them, and over the names of
    the installed distributions (name and version) of this environment."""
    h = hashlib.sha256()
    for top in sorted({m.split(".")[0] for m in modules}):
        spec = importlib.util.find_spec(top)
        if spec is None or (spec.origin is None and not spec.submodule_search_locations):
            h.update(f"{top}: not found".encode())
            continue
        roots = [Path(d) for d in (spec.submodule_search_locations or [])] or [
            Path(spec.origin)]
        for root in roots:
            h.update(root.as_posix().encode())
            hash_source_tree(h, root)
    # the libraries it imports: a `pip install -U torch` changes a .dist-info name
    for site_dir in sorted({p for p in sys.path if p.endswith("site-packages")}):
        with contextlib.suppress(OSError):
            h.update("\n".join(sorted(n for n in os.listdir(site_dir)
                                       if n.endswith((".dist-info", ".egg-info")))).encode())
    return h.hexdigest()


# A process has one forkserver (multiprocessing's, shared by every context): what it
# preloaded, and the fingerprint of that code when it was started
_FORKSERVER_LOCK = threading.Lock()
_FORKSERVER: dict[str, Any] = {"preload": None, "fingerprint": None}


def ensure_forkserver(preload: list[str]):
    """This process's forkserver, importing ``preload`` as the code is on disk now:
    started now (its import runs while the caller goes on), or restarted when the code
    or the preload list changed since it was started. Returns (context, fingerprint)."""
    from multiprocessing import forkserver

    with _FORKSERVER_LOCK:
        current = source_fingerprint(preload)
        ctx = multiprocessing.get_context("forkserver")
        if (_FORKSERVER["preload"], _FORKSERVER["fingerprint"]) != (list(preload), current):
            if _FORKSERVER["fingerprint"] is not None:
                _retire_forkserver()  # it holds other code
            ctx.set_forkserver_preload(list(preload))
            forkserver.ensure_running()
            _FORKSERVER.update(preload=list(preload), fingerprint=current)
        return ctx, current


def _retire_forkserver() -> None:
    """Make the next start spawn a new forkserver, without waiting for the old one.

    multiprocessing's own ``ForkServer._stop`` closes the old server's "alive" pipe and
    waits for it to exit, but every process it forked holds a copy of that pipe, so the
    wait lasts until the runs forked from it end: the daemon's run queue would freeze
    behind a long run. Here the old server is detached (its socket unlinked, so nothing
    reaches it) and reaped by a thread once its runs are done. Uses the ``ForkServer``
    attributes of CPython 3.11 (the project's Python); another layout raises, and the
    launcher then starts the run with DefaultRunLauncher."""
    from multiprocessing import forkserver, util

    server = forkserver._forkserver
    with server._lock:
        pid, address = server._forkserver_pid, server._forkserver_address
        if pid is None:
            return
        os.close(server._forkserver_alive_fd)
        server._forkserver_alive_fd = server._forkserver_pid = None
        server._forkserver_address = None
        if not util.is_abstract_socket_namespace(address):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(address)
    threading.Thread(target=os.waitpid, args=(pid, 0), daemon=True,
                     name="reap-retired-forkserver").start()


class ForkserverRunLauncher(DefaultRunLauncher):
    """Runs forked from a forkserver that preloaded the code location; Dagster's
    ``DefaultRunLauncher`` where that is not possible (and for its runs' termination)."""

    def __init__(self, inst_data: ConfigurableClassData | None = None,
                 preload: list[str] | None = None):
        super().__init__(inst_data=inst_data)
        self._preload = list(preload or DEFAULT_PRELOAD)
        self._procs: dict[str, multiprocessing.process.BaseProcess] = {}

    @classmethod
    def config_type(cls):
        from dagster import Array, Field

        return {"preload": Field(Array(str), is_required=False,
                                 description="modules the forkserver imports once")}

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData,
                          config_value: Mapping[str, Any]):
        return cls(inst_data=inst_data, preload=config_value.get("preload"))

    def prewarm(self) -> None:
        """Start the forkserver (and its import of the code location) before the first
        run asks for it: `roadwork ui`'s daemon calls this when it starts."""
        ensure_forkserver(self._preload)

    def launch_run(self, context: LaunchRunContext) -> None:
        run = context.dagster_run
        try:
            ctx, fingerprint = ensure_forkserver(self._preload)
            proc = ctx.Process(target=run_worker, name=f"dagster-run-{run.run_id[:8]}",
                               args=(run.run_id, self._instance.get_ref(), self._preload,
                                     fingerprint))
            proc.start()
        except Exception as exc:  # no forkserver here, a failing preload, ...
            self._instance.report_engine_event(
                f"ForkserverRunLauncher could not fork this run ({type(exc).__name__}: "
                f"{str(exc)[:300]}); launching it with Dagster's DefaultRunLauncher instead",
                run, cls=self.__class__)
            super().launch_run(context)
            return
        self._procs = {k: p for k, p in self._procs.items() if p.is_alive()}
        self._procs[run.run_id] = proc
        self._instance.add_run_tags(run.run_id, {PID_TAG: str(proc.pid),
                                                 HOST_TAG: socket.gethostname()})

    def _worker_pid(self, run_id: str) -> int | None:
        run = self._instance.get_run_by_id(run_id)
        if run is None or PID_TAG not in run.tags:
            return None
        if run.tags.get(HOST_TAG) != socket.gethostname():
            return None
        return int(run.tags[PID_TAG])

    def terminate(self, run_id: str) -> bool:
        pid = self._worker_pid(run_id)
        if pid is None:
            return super().terminate(run_id)
        run = self._instance.get_run_by_id(run_id)
        if run.is_finished:
            return False
        self._instance.report_run_canceling(run)
        try:
            os.kill(pid, signal.SIGINT)  # Dagster's run worker turns it into a canceled run
        except ProcessLookupError:
            return False
        return True

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run) -> CheckRunHealthResult:
        pid = self._worker_pid(run.run_id)
        if pid is None:
            # not forked on this host: `roadwork run` / `dagster asset materialize` execute
            # in their own process, DefaultRunLauncher fallbacks in the code server's
            # children; run monitoring must not fail them for want of a pid
            return CheckRunHealthResult(WorkerStatus.RUNNING, "worker not tracked here")
        proc = self._procs.get(run.run_id)
        if proc is not None:  # launched by this process: its exit code is known
            alive = proc.is_alive()
        else:
            try:
                os.kill(pid, 0)
                alive = True
            except ProcessLookupError:
                alive = False
            except PermissionError:  # a process of another user holds that pid now
                alive = False
        if alive:
            return CheckRunHealthResult(WorkerStatus.RUNNING)
        return CheckRunHealthResult(WorkerStatus.FAILED,
                                    f"run worker process {pid} is gone")


def run_worker(run_id: str, instance_ref, preload: list[str], preloaded: str) -> None:
    """The forked run: Dagster's run worker body on a fresh instance connection, or a
    fresh ``dagster api execute_run`` interpreter if the code on disk is no longer the
    ``preloaded`` fingerprint (edited since the forkserver imported it). As in
    ``dagster api execute_run``, SIGINT / SIGTERM are captured and handled by Dagster's
    execution (a canceled run), and a failure before Dagster's run body starts marks the
    run failed: never left STARTING."""
    from dagster._utils.interrupts import capture_interrupts

    with capture_interrupts():
        _run_worker(run_id, instance_ref, preload, preloaded)


def _run_worker(run_id: str, instance_ref, preload: list[str], preloaded: str) -> None:
    import dagster as dg
    from dagster._cli.api import _execute_run_command_body

    with dg.DagsterInstance.from_ref(instance_ref) as instance:
        run = instance.get_run_by_id(run_id)
        if run is None:
            raise RuntimeError(f"run {run_id} is not in the instance {instance_ref}")
        try:
            if source_fingerprint(preload) != preloaded:
                _exec_fresh_interpreter(instance, run, instance_ref)
            missing = [m for m in preload if m not in sys.modules]
            if missing:
                # multiprocessing's forkserver swallows a preload's ImportError
                instance.report_engine_event(
                    f"the forkserver could not import {', '.join(missing)} (not importable "
                    "from its sys.path: install the package, or set PYTHONPATH); this run "
                    "imports it itself, as a fresh interpreter would", run)
        except BaseException as exc:
            instance.report_run_failed(run, f"the forked run worker could not start: "
                                       f"{type(exc).__name__}: {exc}")
            raise
        _execute_run_command_body(run_id, instance, write_stream_fn=lambda _event: None,
                                  set_exit_code_on_failure=False)


def _exec_fresh_interpreter(instance, run, instance_ref) -> None:
    """Replace this process by Dagster's own ``python -m dagster api execute_run``."""
    from dagster._core.origin import get_python_environment_entry_point
    from dagster._grpc.types import ExecuteRunArgs
    from dagster._serdes import serialize_value

    instance.report_engine_event(
        "the code changed since the forkserver imported it: running this run in a fresh "
        "interpreter (dagster api execute_run)", run)
    python = run.job_code_origin.executable_path or sys.executable
    command = [*get_python_environment_entry_point(python), "api", "execute_run",
               serialize_value(ExecuteRunArgs(job_origin=run.job_code_origin,
                                              run_id=run.run_id, instance_ref=instance_ref))]
    os.execv(command[0], command)
