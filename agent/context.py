"""Runtime context handed to every graph node (langgraph `context_schema`).

Services are injected, so tests pass loopback-backed real clients and the CLI
wires production ones. trainer/judge/deployer may be None when not configured;
the nodes that need them then explain what is missing instead of crashing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from agent.ports import Notifier
from jobs.llm import LLM
from jobs.values import LaunchEstimate, RunOutcome, RunSnapshot
from storage.db import Database
from storage.settings import Settings


class Trainer(Protocol):
    """jobs.training.TrainingService as the agent uses it."""

    def estimate(self, project_id: int, dataset_id: int) -> LaunchEstimate: ...

    def launch(self, project_id: int, dataset_id: int, *, user_id: str) -> int: ...

    def run(self, run_id: int, on_progress: Callable[[RunSnapshot], None]) -> RunOutcome: ...

    def request_stop(self, run_id: int) -> bool: ...


class Judge(Protocol):
    """jobs.judge.JudgeService as the agent uses it (returns a storage EvalResult)."""

    def judge_run(self, run_id: int, generations: dict[str, str]) -> Any: ...


class Deployer(Protocol):
    """jobs.deploy.DeployService as the agent uses it (returns a storage Deployment)."""

    def deploy(self, project_id: int, run_id: int) -> Any: ...

    def undeploy(self, deployment_id: int) -> Any: ...


@dataclass
class AgentContext:
    db: Database
    settings: Settings
    llm: LLM
    notifier: Notifier
    trainer: Trainer | None = None
    judge: Judge | None = None
    deployer: Deployer | None = None
    progress_interval_s: float = 2.0  # min seconds between edits of a progress message
