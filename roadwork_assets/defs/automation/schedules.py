"""The weekly retrain schedule: stopped until a user starts it (UI: Automation, or
`dagster schedule start weekly_retrain`); cron and timezone from the environment."""

import os

import dagster as dg

from roadwork_assets.contracts.errors import BadInputError
from roadwork_assets.defs.automation.jobs import RETRAIN_JOB, TRIGGER_TAG, active_retrain

CRON_ENV, TZ_ENV = "ROADWORK_RETRAIN_CRON", "ROADWORK_RETRAIN_TZ"
DEFAULT_CRON = "0 3 * * 0"  # Sundays 03:00: a quiet hour for a multi-hour rebuild
SCHEDULE_NAME = "weekly_retrain"


def build_retrain_schedule(job: dg.JobDefinition,
                           environ: dict[str, str] | None = None) -> dg.ScheduleDefinition:
    """``environ``: where CRON_ENV / TZ_ENV are read (default os.environ)."""
    env = os.environ if environ is None else environ
    cron = (env.get(CRON_ENV) or DEFAULT_CRON).strip()
    try:
        return _schedule(job, cron, env.get(TZ_ENV) or "UTC")
    except dg.DagsterInvalidDefinitionError as exc:
        raise BadInputError(f"{CRON_ENV}={cron!r} is not a cron expression Dagster accepts "
                            f"({exc}); use five fields such as {DEFAULT_CRON!r} (Sundays "
                            "03:00) or unset it") from None


def _schedule(job: dg.JobDefinition, cron: str, timezone: str) -> dg.ScheduleDefinition:
    @dg.schedule(name=SCHEDULE_NAME, job=job, cron_schedule=cron,
                 execution_timezone=timezone,
                 default_status=dg.DefaultScheduleStatus.STOPPED,
                 description=f"Retrain the whole graph weekly ({CRON_ENV}, default "
                 f"{DEFAULT_CRON!r}, timezone {TZ_ENV}, default UTC); skips a tick while "
                 "a retrain run is queued or running.")
    def weekly_retrain(context: dg.ScheduleEvaluationContext):
        busy = active_retrain(context.instance)
        if busy:
            return dg.SkipReason(f"retrain run {busy} is still queued or running")
        tick = context.scheduled_execution_time
        return dg.RunRequest(run_key=f"weekly-{tick.isoformat() if tick else 'now'}", job_name=RETRAIN_JOB,
                             tags={TRIGGER_TAG: "schedule"})

    return weekly_retrain
