"""One read-only snapshot for `/tuner status` and the App Home tab (rendered by bot/)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from sqlmodel import select

from storage import spend
from storage.db import Database
from storage.models import Deployment, Project, Run


@dataclass(frozen=True)
class ProjectStatus:
    project_id: int
    name: str
    thread_id: str
    status: str
    nightly_enabled: bool
    champion_run_id: int | None
    latest_run_id: int | None
    latest_run_status: str | None
    best_eval_loss: float | None  # best (lowest) eval loss over the project's runs
    spend_usd: float
    budget_usd: float


@dataclass(frozen=True)
class DeploymentStatus:
    deployment_id: int
    project_id: int
    run_id: int | None
    endpoint_id: str | None
    model_ref: str
    cost_per_1k_usd: float | None
    big_model_cost_per_1k_usd: float | None
    created_at: datetime


@dataclass(frozen=True)
class StatusSummary:
    projects: list[ProjectStatus] = field(default_factory=list)
    deployments: list[DeploymentStatus] = field(default_factory=list)  # healthy only
    spend_by_kind: dict[str, float] = field(default_factory=dict)  # claude_tokens|pod_seconds|endpoint
    spend_total_usd: float = 0.0


def summary(db: Database) -> StatusSummary:
    with db.session() as s:
        projects = s.exec(select(Project).order_by(Project.id)).all()
        runs = s.exec(select(Run).order_by(Run.project_id, Run.id)).all()
        deps = s.exec(
            select(Deployment).where(Deployment.status == "healthy").order_by(Deployment.id)
        ).all()
    latest: dict[int, Run] = {}
    best: dict[int, float] = {}
    for r in runs:
        latest[r.project_id] = r  # ordered by id: the last one wins
        if r.best_eval_loss is not None:
            best[r.project_id] = min(best.get(r.project_id, r.best_eval_loss), r.best_eval_loss)
    out_projects = [
        ProjectStatus(
            project_id=p.id or 0,
            name=p.name or f"project {p.id}",
            thread_id=p.thread_id,
            status=p.status,
            nightly_enabled=p.nightly_enabled,
            champion_run_id=p.champion_run_id,
            latest_run_id=latest[p.id].id if p.id in latest else None,
            latest_run_status=latest[p.id].status if p.id in latest else None,
            best_eval_loss=best.get(p.id or 0),
            spend_usd=spend.total(db, project_id=p.id),
            budget_usd=p.budget_usd,
        )
        for p in projects
    ]
    out_deps = [
        DeploymentStatus(
            deployment_id=d.id or 0,
            project_id=d.project_id,
            run_id=d.run_id,
            endpoint_id=d.endpoint_id,
            model_ref=d.model_ref,
            cost_per_1k_usd=d.cost_per_1k_usd,
            big_model_cost_per_1k_usd=d.big_model_cost_per_1k_usd,
            created_at=d.created_at,
        )
        for d in deps
    ]
    by_kind = spend.by_kind(db)
    return StatusSummary(out_projects, out_deps, by_kind, round(sum(by_kind.values()), 10))
