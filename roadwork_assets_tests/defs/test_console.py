"""What `roadwork run` prints: the assets' own lines and progress by default, Dagster's
event stream only with --verbose; MLflow BetaWarnings and database INFO lines hidden
unless verbose, every other warning kept. Real Dagster runs of a toy asset."""

from __future__ import annotations

import logging
import warnings

import dagster as dg
import pytest

from roadwork_assets.defs.console import (
    console_logger_config,
    progress_reporter,
    quiet_terminal,
    with_console,
)


@dg.asset
def slow_toy(context) -> int:
    progress = progress_reporter(context, every_s=0.0)
    for done in range(0, 5):
        progress("toy stage", done, 4)
    context.log.warning("a real warning from the asset")
    return 1


def _run(verbose: bool, capfd) -> str:
    defs = with_console(dg.Definitions(assets=[slow_toy]))
    job = defs.resolve_implicit_global_asset_job_def()
    capfd.readouterr()
    with dg.DagsterInstance.ephemeral() as instance:
        job.execute_in_process(instance=instance,
                               run_config={"loggers": {"console": console_logger_config(verbose)}})
    out, err = capfd.readouterr()
    return out + err


def test_default_shows_progress_and_warnings_without_the_event_stream(capfd):
    text = _run(False, capfd)
    lines = text.strip().splitlines()
    assert "[roadwork]   slow_toy: toy stage: 0/4 (0%) 0.0/s ETA ?" in lines
    assert any(line.startswith("[roadwork]   slow_toy: toy stage: 4/4 (100%)") for line in lines)
    assert "[roadwork]   slow_toy: WARNING: a real warning from the asset" in lines
    for event in ("STEP_START", "STEP_SUCCESS", "ASSET_MATERIALIZATION", "RUN_SUCCESS", "DEBUG"):
        assert event not in text
    assert len(lines) == 6  # five progress lines and the warning: nothing else


def test_verbose_shows_every_dagster_event(capfd):
    text = _run(True, capfd)
    for event in ("STEP_START", "STEP_SUCCESS", "ASSET_MATERIALIZATION", "RUN_SUCCESS"):
        assert event in text
    assert "toy stage: 4/4 (100%)" in text and "a real warning from the asset" in text


def test_console_levels():
    assert console_logger_config(False) == {"config": {"log_level": "INFO", "events": False}}
    assert console_logger_config(True) == {"config": {"log_level": "DEBUG", "events": True}}
    assert console_logger_config(False, "critical")["config"]["log_level"] == "CRITICAL"


def _emit_noise() -> None:
    warnings.warn("Class `MlFlow` is currently in beta", dg.BetaWarning, stacklevel=1)
    warnings.warn("Parameter `owners` of initializer `SensorDefinition.__init__` is currently "
                  "in beta", dg.BetaWarning, stacklevel=1)
    warnings.warn("Function `unrelated` is currently in beta", dg.BetaWarning, stacklevel=1)
    warnings.warn("a real problem", UserWarning, stacklevel=1)
    logging.getLogger("mlflow.store.db.utils").info("Creating initial MLflow database tables...")
    logging.getLogger("alembic.runtime.migration").info("Context impl SQLiteImpl.")
    logging.getLogger("mlflow.store.db.utils").warning("database is locked, retrying")


@pytest.mark.parametrize("verbose", [False, True])
def test_quiet_terminal_hides_mlflow_noise_only(verbose, caplog, monkeypatch):
    caplog.set_level(logging.INFO)
    # an MLflow store created earlier in the session reconfigures alembic's loggers
    # (level / propagation); start from the logging defaults so the test sees only what
    # quiet_terminal itself does
    for name in ("alembic", "alembic.runtime", "alembic.runtime.migration"):
        logger = logging.getLogger(name)
        monkeypatch.setattr(logger, "level", logging.NOTSET)
        monkeypatch.setattr(logger, "propagate", True)
        monkeypatch.setattr(logger, "disabled", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_terminal(verbose):
            _emit_noise()
    messages = [str(w.message) for w in caught]
    logged = [r.getMessage() for r in caplog.records]
    assert "Function `unrelated` is currently in beta" in messages  # other BetaWarnings stay
    assert "a real problem" in messages
    assert "database is locked, retrying" in logged  # MLflow warnings stay
    hidden = ("Class `MlFlow` is currently in beta" in messages,
              any("`owners`" in m for m in messages),
              "Creating initial MLflow database tables..." in logged,
              "Context impl SQLiteImpl." in logged)
    assert hidden == ((True,) * 4 if verbose else (False,) * 4)
    assert logging.getLogger("mlflow.store.db.utils").level == logging.NOTSET  # restored
