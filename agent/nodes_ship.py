"""Judge the trained model, offer deployment, deploy and undeploy."""

from __future__ import annotations

from typing import Any

from langgraph.graph import END
from langgraph.runtime import Runtime
from langgraph.types import Command, interrupt

from agent.context import AgentContext, Deployer
from agent.nodes_common import NotConfiguredError, action_of, guarded, route_import, set_project
from agent.state import AgentState

__all__ = ["judge", "offer_deploy", "deploy", "deployed", "undeploy", "judge_text"]


def _clip(text: Any, n: int = 300) -> str:
    s = str(text or "")
    return s if len(s) <= n else s[:n] + "…"


def judge_text(result: Any, threshold: float, eval_loss: float | None) -> str:
    from jobs.judge import side_by_side, summary, verdict

    promote, text = verdict(result, threshold)
    lines = [
        f"*Judge results* (Claude, pairwise in both orders, n={result.n})",
        f"win rate {result.win_rate:.0%} (95% CI {result.ci_low:.0%}–{result.ci_high:.0%}) · "
        f"tie rate {summary(result).get('tie_rate', 0.0):.0%} · best eval loss "
        + (f"{eval_loss:.4f}" if eval_loss is not None else "–"),
        ("Verdict: good enough to deploy. " if promote else "Verdict: not good enough yet. ")
        + text,
    ]
    for i, d in enumerate(side_by_side(result)[:3], 1):
        lines += [
            f"\n*Example {i}* ({d.get('outcome', '?')})",
            f"> prompt: {_clip(d.get('prompt'), 200)}",
            f"> fine-tuned: {_clip(d.get('candidate'))}",
            f"> reference: {_clip(d.get('reference'))}",
        ]
    return "\n".join(lines)


def _maybe_crown(ctx: AgentContext, project_id: int, run_id: int, result: Any) -> None:
    """The first judged model becomes the champion; later ones when the verdict promotes.

    Nightly retrains are compared against the champion.
    """
    from jobs.judge import verdict
    from storage.models import Project

    promote, _ = verdict(result, ctx.settings.tuner_promotion_threshold)
    with ctx.db.session() as s:
        project = s.get(Project, project_id)
        if project is not None and (promote or project.champion_run_id is None):
            project.champion_run_id = run_id
            s.add(project)
            s.commit()


@guarded("judge", "retry_wait")
def judge(state: AgentState, runtime: Runtime[AgentContext]) -> Command:
    ctx = runtime.context
    generations = state.get("generations") or {}
    if ctx.judge is None:
        ctx.notifier.say(state["thread_id"], "Judging is not configured; skipping the comparison.")
        return Command(goto="offer_deploy", update={"generations": {}})
    if not generations:
        ctx.notifier.say(state["thread_id"], "The run produced no held-out outputs to judge.")
        return Command(goto="offer_deploy")
    set_project(ctx, state["project_id"], status="judging")
    result = ctx.judge.judge_run(state["run_id"], generations)
    _maybe_crown(ctx, state["project_id"], state["run_id"], result)
    ctx.notifier.say(
        state["thread_id"],
        judge_text(result, ctx.settings.tuner_promotion_threshold, state.get("best_eval_loss")),
    )
    summary = {"win_rate": result.win_rate, "ci_low": result.ci_low, "ci_high": result.ci_high}
    return Command(
        goto="offer_deploy",
        update={"eval_id": result.id, "eval_summary": summary, "generations": {}},
    )


def offer_deploy(state: AgentState, runtime: Runtime[AgentContext]) -> Command:
    ctx = runtime.context
    value = interrupt(
        {
            "kind": "deploy",
            "run_id": state.get("run_id"),
            "eval_id": state.get("eval_id"),
            **(state.get("eval_summary") or {}),
        }
    )
    if (cmd := route_import(value, "offer_deploy")) is not None:
        return cmd
    action = action_of(value)
    if action == "skip":
        ctx.notifier.say(state["thread_id"], "Not deployed. Mention me again to start over.")
        return Command(goto=END)
    if action != "deploy":
        return Command(goto="offer_deploy")
    user = str(value.get("user", ""))
    if not ctx.settings.user_allowed(user):
        ctx.notifier.error(state["thread_id"], f"<@{user}> is not allowed to deploy models.")
        return Command(goto="offer_deploy")
    return Command(goto="deploy")


def _deployer(ctx: AgentContext) -> Deployer:
    if ctx.deployer is None:
        raise NotConfiguredError(
            "deployment is not configured (set RUNPOD_API_KEY and HF_TOKEN and restart the bot)."
        )
    return ctx.deployer


def _money(x: float | None) -> str:
    return "–" if x is None else f"${x:.4f}"


def _healthy_deployment(ctx: AgentContext, run_id: int | None) -> Any:
    from sqlmodel import select

    from storage.models import Deployment

    if run_id is None:
        return None
    with ctx.db.session() as s:
        return s.exec(
            select(Deployment).where(Deployment.run_id == run_id, Deployment.status == "healthy")
        ).first()


@guarded("deploy", "offer_deploy")
def deploy(state: AgentState, runtime: Runtime[AgentContext]) -> Command:
    ctx = runtime.context
    # A step re-run (crash or failed post after a successful deploy) must not create a
    # second billing endpoint for the same model: reuse the healthy one.
    dep = _healthy_deployment(ctx, state["run_id"]) or _deployer(ctx).deploy(
        state["project_id"], state["run_id"]
    )
    lines = [
        f"Deployed: RunPod serverless endpoint `{dep.endpoint_id}` (model `{dep.model_ref}`).",
        f"Cost per 1k requests: {_money(dep.cost_per_1k_usd)} vs "
        f"{_money(dep.big_model_cost_per_1k_usd)} on the big model.",
    ]
    from jobs.deploy import curl_example

    curl = curl_example(dep)
    lines.append("```" + curl + "```")
    ctx.notifier.say(state["thread_id"], "\n".join(lines))
    set_project(ctx, state["project_id"], status="deployed")
    info = {"endpoint_id": str(dep.endpoint_id), "curl": curl}
    return Command(goto="deployed", update={"deployment_id": dep.id, "deploy_info": info})


def deployed(state: AgentState, runtime: Runtime[AgentContext]) -> Command:
    ctx = runtime.context
    value = interrupt(
        {
            "kind": "deployed",
            "deployment_id": state.get("deployment_id"),
            **(state.get("deploy_info") or {}),
        }
    )
    if (cmd := route_import(value, "deployed")) is not None:
        return cmd
    if action_of(value) != "undeploy":
        return Command(goto="deployed")
    user = str(value.get("user", ""))
    if not ctx.settings.user_allowed(user):
        ctx.notifier.error(state["thread_id"], f"<@{user}> is not allowed to undeploy models.")
        return Command(goto="deployed")
    return Command(goto="undeploy")


@guarded("undeploy", "deployed")
def undeploy(state: AgentState, runtime: Runtime[AgentContext]) -> Command:
    ctx = runtime.context
    _deployer(ctx).undeploy(state["deployment_id"])
    ctx.notifier.say(state["thread_id"], "Endpoint removed; nothing is billing any more.")
    set_project(ctx, state["project_id"], status="ready")
    return Command(goto=END)
