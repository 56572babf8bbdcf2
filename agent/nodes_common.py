"""Helpers shared by the graph nodes: error guard, import routing, retry card."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

from langgraph.errors import GraphBubbleUp
from langgraph.runtime import Runtime
from langgraph.types import Command, interrupt

from agent.context import AgentContext
from agent.state import AgentState
from jobs.llm import LLMOutputError
from jobs.values import PlainError
from storage.models import Project
from storage.redact import redact

log = logging.getLogger(__name__)

NodeFn = Callable[[AgentState, Runtime[AgentContext]], Command]

STEP_LABELS = {
    "define": "Understanding the task",
    "persist_spec": "Saving the spec",
    "sample": "Writing sample examples",
    "generate": "Generating the dataset",
    "import_data": "Importing the file",
    "estimate": "Estimating the training cost",
    "start_run": "Launching training",
    "train": "Training",
    "judge": "Judging the model",
    "deploy": "Deploying",
    "undeploy": "Undeploying",
}

class RunDetached(Exception):
    """The bot is shutting down while a run trains: leave the node unfinished.

    The pod keeps running; after the restart `AgentRunner.recover()` re-enters the
    train node and the trainer re-attaches to the same pod.
    """


class NotConfiguredError(RuntimeError):
    """A service the step needs was not wired (its API key is missing)."""


def human_error(exc: BaseException) -> str:
    if isinstance(exc, (LLMOutputError, NotConfiguredError, PlainError)):
        msg = str(exc)
    else:
        msg = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    msg = redact(msg)
    return msg if len(msg) <= 600 else msg[:600] + "…"


def guarded(name: str, on_error: str | Callable[[AgentState], str]) -> Callable[[NodeFn], NodeFn]:
    """Turn an unexpected exception into an error post and a jump to a waiting node."""

    def deco(fn: NodeFn) -> NodeFn:
        @functools.wraps(fn)
        def wrapper(state: AgentState, runtime: Runtime[AgentContext]) -> Command:
            try:
                return fn(state, runtime)
            except (GraphBubbleUp, RunDetached):
                raise
            except Exception as exc:  # noqa: BLE001 - every failure must reach the user
                log.exception("node %s failed for %s", name, state.get("thread_id"))
                text = human_error(exc)
                runtime.context.notifier.error(
                    state["thread_id"], f"{STEP_LABELS.get(name, name)} failed: {text}"
                )
                target = on_error(state) if callable(on_error) else on_error
                return Command(
                    goto=target,
                    update={"error": text, "failed_node": name, "pending_import": None},
                )

        return wrapper

    return deco


def route_import(value: Any, here: str) -> Command | None:
    """At any waiting point, an uploaded file jumps to the import node.

    The runner sends files already parsed, validated and deduplicated (agent/importing.py
    PreparedImport.to_state: "examples", "stats"); "content" (raw text) is what older
    checkpoints hold.
    """
    if isinstance(value, dict) and value.get("action") == "import":
        keep = ("filename", "examples", "stats", "content", "user", "comment", "progress")
        upload = {k: value[k] for k in keep if k in value}
        upload.setdefault("filename", "upload.jsonl")
        return Command(goto="import_data", update={"pending_import": upload, "return_to": here})
    return None


def action_of(value: Any) -> str:
    return str(value.get("action", "")) if isinstance(value, dict) else ""


def set_project(ctx: AgentContext, project_id: int, **fields: Any) -> None:
    with ctx.db.session() as s:
        project = s.get(Project, project_id)
        if project is None:
            return
        for k, v in fields.items():
            setattr(project, k, v)
        s.add(project)
        s.commit()


def retry_wait(state: AgentState, runtime: Runtime[AgentContext]) -> Command:
    """Waiting point after a failed step: the user retries (button or a thread reply)."""
    failed = state.get("failed_node") or "define"
    value = interrupt(
        {
            "kind": "retry",
            "text": sentence(f"{STEP_LABELS.get(failed, failed)} failed: "
                             f"{state.get('error') or 'unknown error'}")
            + " Reply in this thread to try again.",
            "node": failed,
            "step": STEP_LABELS.get(failed, failed),
        }
    )
    if (cmd := route_import(value, "retry_wait")) is not None:
        return cmd
    update: dict[str, Any] = {"error": None}
    text = str(value.get("text", "")).strip() if isinstance(value, dict) else ""
    if failed == "define" and text:
        update["messages"] = [*state.get("messages", []), {"role": "user", "content": text}]
    return Command(goto=failed, update=update)


def sentence(text: str) -> str:
    """`text` ending in exactly one full stop (or its own ! ? …): no "..)." after errors
    that already end in one."""
    text = text.rstrip()
    return text if text.endswith((".", "!", "?", "…")) else text + "."
