"""Launch card, run start and the training watch."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from langgraph.runtime import Runtime
from langgraph.types import Command, interrupt

from agent.context import AgentContext, Trainer
from agent.nodes_common import (
    NotConfiguredError,
    RunDetached,
    action_of,
    guarded,
    route_import,
    sentence,
    set_project,
)
from agent.ports import Action
from agent.state import AgentState
from jobs.values import BudgetExceededError, RunSnapshot
from storage.models import Dataset

__all__ = ["estimate", "launch_wait", "start_run", "train", "progress_text"]

log = logging.getLogger(__name__)

CHART_EVERY = 5  # upload a loss chart every N new eval points (and at the end)


def _trainer(ctx: AgentContext) -> Trainer:
    if ctx.trainer is None:
        raise NotConfiguredError(
            "training is not configured (set RUNPOD_API_KEY and restart the bot)."
        )
    return ctx.trainer


@guarded("estimate", "retry_wait")
def estimate(state: AgentState, runtime: Runtime[AgentContext]) -> Command:
    ctx = runtime.context
    dataset_id = state["dataset_id"]
    est = _trainer(ctx).estimate(state["project_id"], dataset_id)
    with ctx.db.session() as s:
        ds = s.get(Dataset, dataset_id)
        counts = {"n_train": ds.n_train, "n_val": ds.n_val, "n_test": ds.n_test} if ds else {}
    card = {"estimate": dataclasses.asdict(est), "dataset": counts}
    return Command(goto="launch_wait", update={"launch_card": card})


def launch_wait(state: AgentState, runtime: Runtime[AgentContext]) -> Command:
    ctx = runtime.context
    value = interrupt({"kind": "launch", **(state.get("launch_card") or {})})
    if (cmd := route_import(value, "launch_wait")) is not None:
        return cmd
    if action_of(value) != "launch":
        return Command(goto="launch_wait")
    user = str(value.get("user", ""))
    if not ctx.settings.user_allowed(user):
        ctx.notifier.error(
            state["thread_id"],
            f"<@{user}> is not allowed to launch training runs "
            "(ask an admin to add you to TUNER_ALLOWED_USERS).",
        )
        return Command(goto="launch_wait")
    return Command(goto="start_run", update={"launch_user": user})


@guarded("start_run", "launch_wait")
def start_run(state: AgentState, runtime: Runtime[AgentContext]) -> Command:
    ctx = runtime.context
    try:
        run_id = _trainer(ctx).launch(
            state["project_id"], state["dataset_id"], user_id=state.get("launch_user") or ""
        )
    except BudgetExceededError as exc:
        ctx.notifier.error(state["thread_id"], f"Not launched — budget cap: {exc}")
        return Command(goto="launch_wait")
    set_project(ctx, state["project_id"], status="training")
    ctx.notifier.say(state["thread_id"], f"Training run {run_id} launched.")
    return Command(goto="train", update={"run_id": run_id})


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.4f}"


def progress_text(snap: RunSnapshot, *, final: bool = False) -> str:
    head = f"Training run {snap.run_id}: {snap.state}"
    lines = [
        head,
        f"epoch {snap.epoch:.2f} · step {snap.step}/{snap.max_steps or '?'}",
        f"train loss {_fmt(snap.train_loss[-1][1] if snap.train_loss else None)} · "
        f"eval loss {_fmt(snap.eval_loss[-1][1] if snap.eval_loss else None)} · "
        f"best {_fmt(snap.best_eval_loss)}"
        + (f" @ step {snap.best_step}" if snap.best_step is not None else ""),
    ]
    tail = f"cost so far ${snap.cost_usd:.2f}"
    if not final and snap.eta_s is not None:
        tail = f"ETA {max(snap.eta_s, 0) / 60:.0f} min · " + tail
    lines.append(tail)
    if not final and snap.unreachable_s is not None:
        lines.append(f":hourglass: pod unreachable, retrying ({_ago(snap.unreachable_s)} so far)")
    lines += [f":warning: {w}" for w in snap.warnings]
    return "\n".join(lines)


def _ago(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


class _Watch:
    """on_progress callback: edits the run message; uploads a chart every CHART_EVERY evals."""

    def __init__(self, ctx: AgentContext, thread_id: str, run_id: int) -> None:
        self.ctx, self.thread_id, self.run_id = ctx, thread_id, run_id
        self.key = f"run:{run_id}"
        self.charted = 0
        self.last: RunSnapshot | None = None

    def __call__(self, snap: RunSnapshot) -> None:
        self.last = snap
        stop = Action("stop_run", "Stop and keep best", str(self.run_id), "danger")
        self.ctx.notifier.progress(self.thread_id, self.key, progress_text(snap), actions=[stop])
        if len(snap.eval_loss) >= self.charted + CHART_EVERY:
            self.chart(snap)

    def chart(self, snap: RunSnapshot) -> None:
        if not snap.eval_loss and not snap.train_loss:
            return
        try:
            from jobs.chart import loss_chart_png

            png = loss_chart_png(snap.train_loss, snap.eval_loss, snap.best_step)
            self.charted = len(snap.eval_loss)
            self.ctx.notifier.upload(
                self.thread_id, f"run-{self.run_id}-loss.png", png,
                title=f"Run {self.run_id} loss", comment=f"step {snap.step}",
            )
        except Exception:  # noqa: BLE001 - a chart must never break a training run
            log.exception("loss chart failed for run %s", self.run_id)


@guarded("train", "estimate")
def train(state: AgentState, runtime: Runtime[AgentContext]) -> Command:
    ctx = runtime.context
    run_id = state["run_id"]
    assert run_id is not None
    watch = _Watch(ctx, state["thread_id"], run_id)
    outcome = _trainer(ctx).run(run_id, watch)
    if outcome.status == "detached":
        raise RunDetached(f"run {run_id} detached")
    final = watch.last or RunSnapshot(run_id=run_id, state=outcome.status)
    final = dataclasses.replace(
        final, state=outcome.status, cost_usd=max(final.cost_usd, outcome.cost_usd),
        best_eval_loss=outcome.best_eval_loss if outcome.best_eval_loss is not None
        else final.best_eval_loss,
        best_step=outcome.best_step if outcome.best_step is not None else final.best_step,
    )
    ctx.notifier.progress(state["thread_id"], watch.key, progress_text(final, final=True), [])
    watch.chart(final)
    if outcome.notes:  # time cap, merge/push problems: said when training ends, not at Deploy
        ctx.notifier.say(state["thread_id"], "\n".join(outcome.notes))
    if outcome.status == "failed":
        set_project(ctx, state["project_id"], status="failed")
        ctx.notifier.error(
            state["thread_id"],
            sentence(f"Training run {run_id} failed: {outcome.error or 'unknown error'}")
            + " You can launch again.",
        )
        return Command(goto="estimate", update={"run_id": None})
    update: dict[str, Any] = {
        "best_eval_loss": outcome.best_eval_loss,
        "generations": dict(outcome.generations),
    }
    return Command(goto="judge", update=update)
