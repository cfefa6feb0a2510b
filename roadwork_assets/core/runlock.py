"""One run at a time per artifact root: an exclusive ``flock`` on ``ROOT/.roadwork.lock``.

Two runs on one root would overwrite each other's artifacts between their checks and
their promotion (one run printed the other's metrics, ``LATEST`` held the other's
checkpoint). The lock is an OS file lock, so it is released when its holder exits,
however it exits (SIGKILL included): there is never a stale lock to delete by hand.
The file also records who holds it (pid, host, start time), for the refusal message.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from roadwork_assets.contracts.errors import RoadworkError

LOCK_NAME = ".roadwork.lock"


class HomeBusyError(RoadworkError):
    """Another run holds the lock on this artifact root."""


def _holder(fh) -> str:
    fh.seek(0)
    try:
        info = json.loads(fh.read() or "{}")
    except ValueError:
        info = {}
    if not info:
        return "another process (holder unknown)"
    return (f"pid {info.get('pid')} on {info.get('host')} "
            f"(started {info.get('started_at')}, {info.get('command', 'roadwork run')})")


@contextlib.contextmanager
def hold_lock(root: Path, *, wait: bool = False, what: str = "ROADWORK_HOME",
              command: str = "roadwork run", say: Callable[[str], None] = print,
              poll_s: float = 1.0) -> Iterator[Path]:
    """Hold the exclusive lock on ``root`` for the body of the ``with``.

    ``wait=False`` refuses at once with ``HomeBusyError`` naming the holder;
    ``wait=True`` says who it waits for, once, and blocks until the lock is free.
    """
    root = Path(root)
    path = root / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    fh = os.fdopen(fd, "r+")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fh)
            if not wait:
                raise HomeBusyError(
                    f"{what} {root} is in use by {holder}: wait for that run to finish, "
                    f"pass --wait to queue behind it, or use another {what}") from None
            say(f"[roadwork] {what} {root} is in use by {holder}: waiting for it to finish")
            while True:  # poll, so a Ctrl-C is handled promptly
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    time.sleep(poll_s)
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({
            "pid": os.getpid(), "host": socket.gethostname(), "command": command,
            "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}))
        fh.flush()
        yield path
    finally:
        fh.close()  # closing the descriptor releases the flock
