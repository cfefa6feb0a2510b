"""Retraining triggers: the retrain job, the weekly schedule, the new-data and drift
sensors, built together for ``definitions.build_definitions``."""

from __future__ import annotations

from collections.abc import Sequence

import dagster as dg

from roadwork_assets.defs.automation.jobs import build_retrain_job
from roadwork_assets.defs.automation.schedules import build_retrain_schedule
from roadwork_assets.defs.automation.sensors import build_drift_sensor, build_new_data_sensor


def automation(assets: Sequence, resources: dict[str, object]) -> dict[str, list]:
    """``jobs``, ``schedules`` and ``sensors`` for ``dg.Definitions``; the retrain job
    materializes ``assets`` with ``resources``."""
    job = build_retrain_job(lambda: dg.Definitions(assets=list(assets), resources=resources))
    return {"jobs": [job], "schedules": [build_retrain_schedule(job)],
            "sensors": [build_new_data_sensor(job), build_drift_sensor(job)]}
