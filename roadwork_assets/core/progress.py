"""Progress of long stages as readable lines: ``stage: done/total (pct) rate/s ETA``.

A long core function takes an optional ``progress`` callable, ``progress(stage, done,
total)``, and calls it as work completes (``no_progress`` by default). Whoever calls
the function decides where lines go: the Dagster layer passes a
:class:`ProgressReporter` that writes to ``context.log.info`` (the run logs, and the
``roadwork run`` terminal). Core never learns about Dagster.

The reporter throttles: one line at most every ``every_s`` seconds per stage, plus the
first call and the last (``done == total``), so a 100k-image stage writes a few dozen
lines, not 100k.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol


class Progress(Protocol):
    def __call__(self, stage: str, done: int, total: int) -> None: ...


def no_progress(stage: str, done: int, total: int) -> None:
    """The default sink: says nothing."""


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``: short enough for one log line."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def progress_line(stage: str, done: int, total: int, elapsed_s: float) -> str:
    """One line: counts, percentage, rate since the stage began, and the time left at
    that rate (``ETA ?`` until something is done)."""
    rate = done / elapsed_s if elapsed_s > 0 else 0.0
    pct = f" ({100.0 * done / total:.0f}%)" if total > 0 else ""
    if done >= total > 0:
        tail = f"done in {format_duration(elapsed_s)}"
    elif rate > 0:
        tail = f"ETA {format_duration((total - done) / rate)}"
    else:
        tail = "ETA ?"
    # slow stages (training epochs) read better as time per item than as 0.0/s
    speed = (f"{format_duration(1 / rate)}/item" if 0 < rate < 0.1 else f"{rate:.1f}/s")
    return f"{stage}: {done}/{total}{pct} {speed} {tail}"


@dataclass
class _StageClock:
    started: float
    last_emit: float | None = None
    last_done: int = -1


@dataclass
class ProgressReporter:
    """A ``progress(stage, done, total)`` sink that emits throttled lines to ``emit``.

    ``clock`` is injectable so tests can fake a long loop without sleeping. A stage
    whose count goes backwards (the same name reused, e.g. one epoch after another)
    restarts its clock."""

    emit: Callable[[str], None]
    every_s: float = 5.0
    clock: Callable[[], float] = time.monotonic
    _stages: dict[str, _StageClock] = field(default_factory=dict, repr=False)

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = self.clock()
        state = self._stages.get(stage)
        if state is None or done < state.last_done:
            state = self._stages[stage] = _StageClock(started=now)
        state.last_done = done
        finished = total > 0 and done >= total
        due = state.last_emit is None or now - state.last_emit >= self.every_s
        if not (finished or due):
            return
        state.last_emit = now
        self.emit(progress_line(stage, done, total, now - state.started))
        if finished:
            del self._stages[stage]
