"""Status summary shared by `/tuner status`, the App Home tab and `tuner projects`."""

from __future__ import annotations

from dataclasses import dataclass

from sqlmodel import select

from storage import spend
from storage.db import Database
from storage.models import Deployment, Project, Run

HELP_TEXT = (
    "*tuner* turns a big-LLM prompt into a small fine-tuned model.\n"
    "• Mention me in a channel to start a project; each thread is one project.\n"
    "• Answer my questions in the thread; use the buttons to approve, launch and deploy.\n"
    "• Upload a .jsonl file (prompt/response per line) in the thread to import examples.\n"
    "• `/tuner status` – projects, runs, deployments and spend.\n"
    "• `/tuner help` – this message."
)


@dataclass
class Summary:
    projects: list[Project]
    runs: list[Run]
    deployments: list[Deployment]
    spend_by_kind: dict[str, float]
    spend_total: float


def summary(db: Database, limit: int = 20) -> Summary:
    with db.session() as s:
        projects = list(s.exec(select(Project).order_by(Project.id.desc()).limit(limit)))  # type: ignore[union-attr]
        runs = list(s.exec(select(Run).order_by(Run.id.desc()).limit(limit)))  # type: ignore[union-attr]
        deps = list(
            s.exec(
                select(Deployment)
                .where(Deployment.status != "removed")
                .order_by(Deployment.id.desc())  # type: ignore[union-attr]
                .limit(limit)
            )
        )
    return Summary(projects, runs, deps, spend.by_kind(db), spend.total(db))


def _permalink(p: Project) -> str:
    return f"<#{p.channel_id}> thread {p.thread_ts}"


def status_lines(sm: Summary) -> list[str]:
    names = {p.id: (p.name or f"project {p.id}") for p in sm.projects}
    lines = [f"*Projects* ({len(sm.projects)})"]
    lines += [f"• #{p.id} {p.name or '(unnamed)'} – {p.status} – {_permalink(p)}"
              for p in sm.projects] or ["• none yet"]
    lines.append(f"*Runs* ({len(sm.runs)})")
    lines += [
        f"• run {r.id} ({names.get(r.project_id, f'project {r.project_id}')}) – {r.status}"
        + (f" – best eval loss {r.best_eval_loss:.4f}" if r.best_eval_loss is not None else "")
        for r in sm.runs
    ] or ["• none"]
    lines.append(f"*Deployments* ({len(sm.deployments)})")
    lines += [
        f"• {d.endpoint_id or '(pending)'} ({names.get(d.project_id, f'project {d.project_id}')})"
        f" – {d.status}"
        + (f" – ${d.cost_per_1k_usd:.4f}/1k requests" if d.cost_per_1k_usd is not None else "")
        for d in sm.deployments
    ] or ["• none"]
    kinds = ", ".join(f"{k} ${v:.2f}" for k, v in sorted(sm.spend_by_kind.items()))
    lines.append(f"*Spend*: ${sm.spend_total:.2f}" + (f" ({kinds})" if kinds else ""))
    return lines


def status_text(db: Database) -> str:
    return "\n".join(status_lines(summary(db)))


def home_view(db: Database) -> dict:
    text = status_text(db)
    blocks: list[dict] = [
        {"type": "header", "text": {"type": "plain_text", "text": "tuner"}},
        {"type": "section", "text": {"type": "mrkdwn", "text": text[:2900]}},
        {"type": "divider"},
        {"type": "section", "text": {"type": "mrkdwn", "text": HELP_TEXT}},
    ]
    return {"type": "home", "blocks": blocks}
