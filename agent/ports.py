"""Interfaces the agent talks through. Implementations live in bot/ (Slack) and jobs/.

Nothing here knows about Slack: the bot's presenter turns these calls into messages.
A thread_id is "team:channel:thread_ts"; an empty thread_ts ("team:channel:") means
a top-level post in the channel (used by nightly reports).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from jobs.llm import LLM, LLMOutputError  # noqa: F401  (re-exported)


@dataclass(frozen=True)
class Action:
    """A button. `value` is opaque to the bot (it carries e.g. an interrupt id)."""

    action_id: str
    label: str
    value: str = ""
    style: str | None = None  # "primary" | "danger" | None


@dataclass(frozen=True)
class Field_:
    label: str
    value: str


class Notifier(Protocol):
    """What the agent and jobs may show in a project's thread."""

    def say(self, thread_id: str, text: str) -> None: ...

    def progress(
        self, thread_id: str, key: str, text: str, actions: list[Action] | None = None
    ) -> None:
        """Post once per (thread_id, key); later calls edit that same message."""
        ...

    def upload(
        self, thread_id: str, filename: str, content: bytes, title: str, comment: str = ""
    ) -> None: ...

    def error(self, thread_id: str, text: str) -> None: ...

    def ask(self, thread_id: str, interrupt_id: str, payload: dict[str, Any]) -> None:
        """Render a pending human-approval interrupt (payload["kind"] says which card)."""
        ...


@dataclass
class RecordingNotifier:
    """In-memory Notifier for unit tests of agent/jobs code."""

    calls: list[tuple[str, Any]] = field(default_factory=list)

    def say(self, thread_id: str, text: str) -> None:
        self.calls.append(("say", text))

    def progress(
        self, thread_id: str, key: str, text: str, actions: list[Action] | None = None
    ) -> None:
        self.calls.append(("progress", (key, text, actions or [])))

    def upload(
        self, thread_id: str, filename: str, content: bytes, title: str, comment: str = ""
    ) -> None:
        self.calls.append(("upload", (filename, content, title, comment)))

    def error(self, thread_id: str, text: str) -> None:
        self.calls.append(("error", text))

    def ask(self, thread_id: str, interrupt_id: str, payload: dict[str, Any]) -> None:
        self.calls.append(("ask", (interrupt_id, payload)))

    def texts(self, kind: str) -> list[Any]:
        return [v for k, v in self.calls if k == kind]
