"""Status summary shared by `/tuner status`, the App Home tab and `tuner projects`."""

from __future__ import annotations

import json

from bot import limits as L
from bot.layout import section, sections
from storage.db import Database
from storage.status import StatusSummary, summary

# Home tab: at most 100 blocks and 250 kB as sent (JSON, non-ASCII as \u escapes; see
# tests/fakes/slack_validate.py); the status gets at most this much of both.
HOME_STATUS_SECTIONS = 60
HOME_STATUS_BYTES = 180_000

HELP_TEXT = (
    "*tuner* turns a big-LLM prompt into a small fine-tuned model.\n"
    "• Mention me in a channel to start a project; each thread is one project.\n"
    "• Answer my questions in the thread; use the buttons to approve, launch and deploy.\n"
    "• Upload a .jsonl file (prompt/response per line) in the thread to import examples.\n"
    "• `/tuner status` – projects, runs, deployments and spend.\n"
    "• `/tuner nightly on|off <project id>` – nightly retrain on new data, reported here.\n"
    "• `/tuner help` – this message."
)


def _thread_link(thread_id: str) -> str:
    _, channel, ts = (thread_id.split(":", 2) + ["", ""])[:3]
    return f"<#{channel}> thread {ts}" if channel else thread_id


def status_lines(sm: StatusSummary) -> list[str]:
    names = {p.project_id: L.escape(p.name) for p in sm.projects}
    lines = [f"*Projects* ({len(sm.projects)})"]
    for p in sm.projects:
        run = (f"run {p.latest_run_id} {p.latest_run_status}" if p.latest_run_id is not None
               else "no runs")
        loss = f", best eval loss {p.best_eval_loss:.4f}" if p.best_eval_loss is not None else ""
        nightly = ", nightly on" if p.nightly_enabled else ""
        lines.append(f"• #{p.project_id} {L.escape(p.name)} – {p.status} – {run}{loss} – "
                     f"${p.spend_usd:.2f} of ${p.budget_usd:.2f}{nightly} – "
                     f"{_thread_link(p.thread_id)}")
    if not sm.projects:
        lines.append("• none yet")
    lines.append(f"*Deployments* ({len(sm.deployments)})")
    for d in sm.deployments:
        cost = f" – ${d.cost_per_1k_usd:.4f}/1k requests" if d.cost_per_1k_usd is not None else ""
        big = (f" (big model ${d.big_model_cost_per_1k_usd:.4f}/1k)"
               if d.big_model_cost_per_1k_usd is not None else "")
        lines.append(f"• {d.endpoint_id or '(pending)'} – "
                     f"{names.get(d.project_id, f'project {d.project_id}')} – run {d.run_id}"
                     f"{cost}{big}")
    if not sm.deployments:
        lines.append("• none")
    kinds = ", ".join(f"{k} ${v:.2f}" for k, v in sorted(sm.spend_by_kind.items()))
    lines.append(f"*Spend*: ${sm.spend_total_usd:.2f}" + (f" ({kinds})" if kinds else ""))
    return lines


def status_text(db: Database) -> str:
    return "\n".join(status_lines(summary(db)))


def home_view(db: Database) -> dict:
    status: list[dict] = []
    size = 0
    for block in sections(status_text(db)):
        size += len(json.dumps(block))
        if len(status) == HOME_STATUS_SECTIONS - 1 or size > HOME_STATUS_BYTES:
            status.append(section("…and more: `tuner projects` on the bot's host lists "
                                  "everything."))
            break
        status.append(block)
    blocks: list[dict] = [
        {"type": "header", "text": {"type": "plain_text", "text": "tuner"}},
        *status,
        {"type": "divider"},
        *sections(HELP_TEXT),
    ]
    return {"type": "home", "blocks": blocks}
