"""Builds the running process: DB, Slack client, Claude, RunPod services, agent runner, app.

Imports are lazy so `tuner doctor` and `tuner projects` stay fast. A service whose key is
missing is left out (None) and the agent explains what to set when a step needs it.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from storage.settings import Settings

log = logging.getLogger(__name__)


class MissingLLM:
    """Stands in for Claude when ANTHROPIC_API_KEY is not set: every call explains that."""

    def structured(self, **_: Any) -> Any:
        from agent.nodes_common import NotConfiguredError

        raise NotConfiguredError("Claude is not configured: set ANTHROPIC_API_KEY and restart.")


@dataclass
class Wired:
    settings: Settings
    db: Any
    app: Any
    runner: Any
    services: Any
    notifier: Any
    reaper: Any | None = None
    scheduler: Any | None = None
    trainer: Any | None = None
    nightly: Any | None = None
    missing: list[str] = field(default_factory=list)
    templates: Any | None = None  # jobs.template_cleanup.TemplateCleaner

    def start_background(self) -> list[str]:
        """Reaper start-up pass + periodic loop, nightly scheduler, then resume dead threads."""
        if self.reaper is not None:
            reaped = self.reaper.run_once()
            if reaped:
                log.warning("reaper terminated %d orphan pod(s) at start-up", len(reaped))
            self.reaper.start()
        if self.scheduler is not None:
            from jobs.scheduler import sync_jobs

            self.scheduler.start()
            sync_jobs(self.scheduler, self.db, self.settings)
        if self.nightly is not None:  # nightlies a dead process left half-way
            threading.Thread(target=self.nightly.recover, name="nightly-recover",
                             daemon=True).start()
        return list(self.runner.recover())

    def close(self) -> None:
        """Graceful stop: training watches detach (pods keep running and are re-attached
        by `recover()` on the next start); nothing else is left half-done."""
        if self.trainer is not None:
            self.trainer.detach()
        if self.reaper is not None:
            self.reaper.stop(timeout=2)
        if self.templates is not None:
            self.templates.close(timeout=2)  # pending templates stay for the next reaper pass
        if self.scheduler is not None and self.scheduler.running:
            self.scheduler.shutdown(wait=False)
        self.services.worker.shutdown(wait=False)
        close = getattr(self.runner, "close", None)
        if close:
            close()  # waits for graph steps still using the checkpoint DB


def build(settings: Settings, *, artifacts_dir: Path | None = None) -> Wired:
    from agent.context import AgentContext
    from agent.runner import AgentRunner
    from bot.app import create_app, make_client
    from bot.handlers import Services
    from bot.presenter import SlackNotifier
    from storage.db import Database

    missing: list[str] = []
    db = Database(settings.database_url)
    client = make_client(settings)
    notifier = SlackNotifier(client, db)

    llm: Any
    judge = None
    if settings.anthropic_api_key is not None:
        from jobs.claude import ClaudeClient
        from jobs.judge import JudgeService

        llm = ClaudeClient(settings, db)
        judge = JudgeService(db, llm, settings)
    else:
        llm = MissingLLM()
        missing.append("ANTHROPIC_API_KEY (spec, data generation and judging are off)")

    trainer = deployer = reaper = templates = None
    if settings.runpod_api_key is not None:
        from jobs.reaper import Reaper
        from jobs.runpod_api import RunPodAPI
        from jobs.serverless import ServerlessClient
        from jobs.template_cleanup import TemplateCleaner
        from jobs.training import TrainingService

        api = RunPodAPI(settings)
        serverless = ServerlessClient(settings)
        templates = TemplateCleaner(db, serverless, window_s=settings.tuner_template_retry_s)
        trainer = TrainingService(db, settings, api, artifacts_dir or Path("data/artifacts"))
        reaper = Reaper(db, api, settings.tuner_reaper_interval_s, templates=templates)
        if settings.hf_token is not None:
            from jobs.deploy import DeployService

            counter = None if isinstance(llm, MissingLLM) else llm  # measured token counts
            deployer = DeployService(db, settings, serverless, token_counter=counter,
                                     templates=templates)
        else:
            missing.append("HF_TOKEN (deployment is off)")
    else:
        missing.append("RUNPOD_API_KEY (training and deployment are off)")

    ctx = AgentContext(db=db, settings=settings, llm=llm, notifier=notifier, trainer=trainer,
                       judge=judge, deployer=deployer)
    runner = AgentRunner(ctx)
    services = Services(db=db, training=trainer, missing=missing)
    app = create_app(settings, runner, services, client=client)

    scheduler = nightly = None
    if trainer is not None and judge is not None:
        from agent.nightly import NightlyService
        from jobs.scheduler import build_scheduler

        nightly = NightlyService(db, settings, llm, trainer, judge, notifier)
        scheduler = build_scheduler(settings, settings.database_url, nightly.run)
        services.scheduler = scheduler
    return Wired(
        settings, db, app, runner, services, notifier, reaper, scheduler, trainer, nightly,
        missing, templates,
    )
