"""Define the task: clarifying questions, spec persistence, spec approval."""

from __future__ import annotations

import json
from typing import Any

from langgraph.runtime import Runtime
from langgraph.types import Command, interrupt
from sqlalchemy import func
from sqlmodel import select

from agent.context import AgentContext
from agent.nodes_common import action_of, guarded, retry_wait, route_import, set_project
from agent.state import AgentState
from jobs.catalog import lookup, supported_list_text
from storage.models import TaskSpecRow

__all__ = ["define", "ask", "persist_spec", "confirm", "retry_wait"]

MAX_QUESTIONS = 5  # the prompt asks for at most three; this is the hard stop


def unsupported_model_question(model_id: str) -> str:
    """Plain-words refusal of an unknown base model, with the supported list."""
    return (
        f"I can't fine-tune `{model_id or '(none)'}`: it isn't one of the base models tuner "
        "supports (each one's GPU, disk and time figures are known). Which of these should "
        "I use?\n" + supported_list_text()
        + "\nReply with one of them (or say \"the default\")."
    )


@guarded("define", "retry_wait")
def define(state: AgentState, runtime: Runtime[AgentContext]) -> Command:
    from agent.spec import DEFINE_SYSTEM, DefineTurn

    ctx = runtime.context
    messages = list(state.get("messages", []))
    asked = sum(1 for m in messages if m["role"] == "assistant")
    system = DEFINE_SYSTEM
    if asked >= MAX_QUESTIONS:
        system += "\nYou have asked enough questions: set ready=true and write the spec now."
    turn = ctx.llm.structured(
        system=system,
        messages=messages,
        schema=DefineTurn,
        purpose="define",
        project_id=state.get("project_id"),
    )
    if turn.ready and turn.spec is not None:
        spec = turn.spec.model_dump()
        model = lookup(spec.get("base_model") or "")
        if model is None:  # never shown as an approvable spec card: ask for a listed model
            question = unsupported_model_question(str(spec.get("base_model") or ""))
            return Command(
                goto="ask",
                update={"messages": [*messages, {"role": "assistant", "content": question}]},
            )
        spec["base_model"] = model.id  # the catalog's spelling
        return Command(goto="persist_spec", update={"spec": spec, "error": None})
    question = (turn.question or "").strip() or "Could you describe the task in more detail?"
    return Command(
        goto="ask",
        update={"messages": [*messages, {"role": "assistant", "content": question}]},
    )


def ask(state: AgentState, runtime: Runtime[AgentContext]) -> Command:
    messages = state.get("messages", [])
    question = messages[-1]["content"] if messages and messages[-1]["role"] == "assistant" else ""
    value = interrupt({"kind": "question", "text": question})
    if (cmd := route_import(value, "ask")) is not None:
        return cmd
    text = str(value.get("text", "")).strip() if isinstance(value, dict) else ""
    if action_of(value) != "answer" or not text:
        return Command(goto="ask")
    return Command(goto="define", update={"messages": [*messages, {"role": "user", "content": text}]})


@guarded("persist_spec", "retry_wait")
def persist_spec(state: AgentState, runtime: Runtime[AgentContext]) -> Command:
    ctx = runtime.context
    project_id = state["project_id"]
    spec = state["spec"] or {}
    with ctx.db.session() as s:
        latest = s.exec(
            select(func.max(TaskSpecRow.version)).where(TaskSpecRow.project_id == project_id)
        ).one()
        row = TaskSpecRow(project_id=project_id, version=(latest or 0) + 1, spec=spec)
        s.add(row)
        s.commit()
        s.refresh(row)
    fields: dict[str, Any] = {"name": str(spec.get("name", "")), "status": "defining"}
    stated = spec.get("budget_usd")
    if isinstance(stated, (int, float)) and stated > 0:
        # the user's own budget can lower the admin's cap, never raise it
        fields["budget_usd"] = min(float(stated), ctx.settings.tuner_project_budget_usd)
    set_project(ctx, project_id, **fields)
    return Command(goto="confirm", update={"spec_row_id": row.id})


def confirm(state: AgentState, runtime: Runtime[AgentContext]) -> Command:
    spec = state.get("spec") or {}
    value = interrupt({"kind": "spec", "spec": spec})
    if (cmd := route_import(value, "confirm")) is not None:
        return cmd
    action = action_of(value)
    if action == "approve":
        return Command(goto="sample")
    if action == "change":
        text = str(value.get("text", "")).strip()
        if not text:
            return Command(goto="confirm")
        messages: list[dict[str, Any]] = [
            *state.get("messages", []),
            {"role": "assistant", "content": "Proposed spec:\n" + json.dumps(spec, indent=1)},
            {"role": "user", "content": f"Please change the spec: {text}"},
        ]
        return Command(goto="define", update={"messages": messages})
    return Command(goto="confirm")
