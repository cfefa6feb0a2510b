"""What `roadwork run` shows on the terminal, and the Dagster side of progress lines.

Default: the project's own log lines (``context.log.*`` of the assets: progress with
rate and ETA, per-epoch metrics, warnings), on stdout beside the ``[roadwork]`` lines
(stderr keeps the one-line errors), and real Python warnings. Hidden unless
``--verbose``: Dagster's event stream (STEP_START, HANDLED_OUTPUT, ... and a failed
step's traceback: the CLI prints one error line for it), the BetaWarnings that
dagster / dagster_mlflow raise about the MLflow integration, and MLflow's / alembic's
database INFO lines. Every event is still written to DAGSTER_HOME, so the run logs in
the UI (`dagster dev`) keep the full stream either way.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from collections.abc import Iterator

import dagster as dg
from dagster._core.log_manager import LOG_RECORD_EVENT_ATTR, LOG_RECORD_METADATA_ATTR
from dagster._utils.log import create_console_logger

from roadwork_assets.core.progress import ProgressReporter

# MLflow's tracking-store setup ("Creating initial MLflow database tables...",
# "Experiment ... does not exist. Creating a new experiment.") and alembic's migrations
QUIET_LOGGERS = ("mlflow.store.db.utils", "mlflow.tracking.fluent", "alembic")
# BetaWarnings that are not the user's to act on: dagster_mlflow's hook, resource and
# MlFlow class (named in the message), and the one Dagster 1.13's own @sensor decorator
# raises for the `owners` argument it passes itself (every sensor, owners unset)
QUIET_BETA_MESSAGE = r".*(mlflow|MlFlow|Parameter `owners` of initializer `SensorDefinition)"


def progress_reporter(context, every_s: float = 5.0) -> ProgressReporter:
    """The ``progress`` sink an asset passes to core: throttled lines to
    ``context.log.info`` (the run's logs, and the `roadwork run` terminal)."""
    return ProgressReporter(emit=context.log.info, every_s=every_s)


class _NoDagsterEvents(logging.Filter):
    """Pass the lines assets log; drop Dagster's own events (which carry a DagsterEvent)."""

    def filter(self, record: logging.LogRecord) -> bool:
        meta = getattr(record, LOG_RECORD_METADATA_ATTR, None) or {}
        return getattr(record, LOG_RECORD_EVENT_ATTR, None) is None \
            and meta.get("dagster_event") is None


class _ShortFormat(logging.Formatter):
    """``[roadwork]   checkpoint: train epochs: 1/2 (50%) ...``: the asset and its own
    message, a level only when it is not INFO (the run id and job name are in the UI)."""

    def format(self, record: logging.LogRecord) -> str:
        meta = getattr(record, LOG_RECORD_METADATA_ATTR, None) or {}
        source = meta.get("step_key") or (f"resource:{meta['resource_name']}"
                                          if meta.get("resource_name") else "dagster")
        level = "" if record.levelno == logging.INFO else f"{record.levelname}: "
        return f"[roadwork]   {source}: {level}{meta.get('orig_message', record.getMessage())}"


@dg.logger(
    {
        "log_level": dg.Field(str, is_required=False, default_value="INFO",
                              description="the console's threshold"),
        "events": dg.Field(bool, is_required=False, default_value=True,
                           description="also print Dagster's event stream (the default "
                           "console does); `roadwork run` turns it off unless --verbose"),
    },
    description="Dagster's colored console logger, optionally without its event stream.",
)
def roadwork_console(init_context) -> logging.Logger:
    config = init_context.logger_config
    level = config["log_level"].upper()
    if config["events"]:  # Dagster's own console, colored, on stderr
        return create_console_logger("dagster", level)
    # the assets' lines join the [roadwork] lines on stdout; stderr keeps errors only
    log = logging.getLoggerClass()("dagster", level=level)
    handler = logging.StreamHandler(sys.stdout)
    handler.addFilter(_NoDagsterEvents())
    handler.setFormatter(_ShortFormat())
    log.addHandler(handler)
    return log


def console_logger_config(verbose: bool, level: str | None = None) -> dict:
    """Run config for ``roadwork_console``: INFO without events by default, DEBUG with
    every event when verbose; ``level`` (``--dagster-log-level``) overrides the level."""
    return {"config": {"log_level": (level or ("debug" if verbose else "info")).upper(),
                       "events": verbose}}


def with_console(defs: dg.Definitions) -> dg.Definitions:
    """``defs`` whose jobs log to the terminal through ``roadwork_console``."""
    return dg.Definitions.merge(defs, dg.Definitions(loggers={"console": roadwork_console}))


@contextlib.contextmanager
def quiet_terminal(verbose: bool) -> Iterator[None]:
    """Hide the MLflow / sensor-owners BetaWarnings and MLflow database INFO lines (unless ``verbose``); every
    other warning is shown as usual. Restores the warning filters and logger levels."""
    if verbose:
        yield
        return
    levels = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=QUIET_BETA_MESSAGE,
                                category=dg.BetaWarning)
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
        try:
            yield
        finally:
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)
