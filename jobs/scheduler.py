"""Nightly cron via APScheduler 3.11: one BackgroundScheduler, SQLAlchemyJobStore on the
app's database, one job per project with a stable id ("nightly:<project_id>").

The job store pickles a *reference* to `run_nightly_job` (module-level), so the job
itself only carries the project id; the process registers the actual runner with
`register_runner(fn)` (or `build_scheduler(..., nightly_callable)` does it). The runner
receives (project_id, run_date "YYYY-MM-DD", UTC) and must be idempotent per date.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime, timezone

from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from sqlmodel import select

from storage.db import Database
from storage.models import Project
from storage.settings import Settings

log = logging.getLogger(__name__)

JOB_PREFIX = "nightly:"
MISFIRE_GRACE_S = 6 * 3600
NightlyRunner = Callable[[int, str], object]

_runner: NightlyRunner | None = None
_runner_lock = threading.Lock()
_clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc)  # noqa: E731


def register_runner(fn: NightlyRunner | None, clock: Callable[[], datetime] | None = None) -> None:
    global _runner, _clock
    with _runner_lock:
        _runner = fn
        if clock is not None:
            _clock = clock


def run_nightly_job(project_id: int) -> None:
    """The pickled job target: run the registered nightly runner for today's UTC date."""
    with _runner_lock:
        runner, clock = _runner, _clock
    if runner is None:
        log.error("nightly job for project %s fired but no runner is registered", project_id)
        return
    run_date = clock().astimezone(timezone.utc).date().isoformat()
    runner(int(project_id), run_date)


def job_id(project_id: int) -> str:
    return f"{JOB_PREFIX}{project_id}"


def build_scheduler(
    settings: Settings, db_url: str, nightly_callable: NightlyRunner | None = None
) -> BackgroundScheduler:
    """Not started; call .start() once per process (and sync_jobs after)."""
    if nightly_callable is not None:
        register_runner(nightly_callable)
    return BackgroundScheduler(
        jobstores={"default": SQLAlchemyJobStore(url=db_url, tablename="apscheduler_jobs")},
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": MISFIRE_GRACE_S},
        timezone=timezone.utc,
    )


def _trigger(settings: Settings) -> CronTrigger:
    return CronTrigger(hour=settings.tuner_nightly_hour_utc, minute=0, timezone=timezone.utc)


def sync_jobs(scheduler: BackgroundScheduler, db: Database, settings: Settings | None = None) -> list[str]:
    """Add/replace jobs for projects with nightly_enabled, remove the others. Returns job ids."""
    settings = settings or Settings()
    with db.session() as s:
        enabled = list(s.exec(select(Project.id).where(Project.nightly_enabled == True)).all())  # noqa: E712
    wanted = {job_id(pid) for pid in enabled}
    for pid in enabled:
        existing = scheduler.get_job(job_id(pid))
        if existing is not None and str(existing.trigger) == str(_trigger(settings)):
            continue  # keep its next_run_time
        scheduler.add_job(
            run_nightly_job,
            trigger=_trigger(settings),
            args=[int(pid)],  # type: ignore[arg-type]
            id=job_id(pid),
            name=f"nightly retrain for project {pid}",
            replace_existing=True,
            coalesce=True,
            max_instances=1,
            misfire_grace_time=MISFIRE_GRACE_S,
        )
    for job in scheduler.get_jobs():
        if job.id.startswith(JOB_PREFIX) and job.id not in wanted:
            scheduler.remove_job(job.id)
    return sorted(wanted)


def set_nightly(
    db: Database,
    project_id: int,
    enabled: bool,
    scheduler: BackgroundScheduler | None = None,
    settings: Settings | None = None,
) -> Project | None:
    """Opt a project in or out of nightly retrains and re-sync the scheduler's jobs."""
    with db.session() as s:
        project = s.get(Project, project_id)
        if project is None:
            return None
        project.nightly_enabled = enabled
        s.add(project)
        s.commit()
        s.refresh(project)
    if scheduler is not None:
        sync_jobs(scheduler, db, settings)
    return project
