"""Interfaces the agent talks through. Implementations live in bot/ (Slack) and jobs/.

Nothing here knows about Slack: the bot's presenter turns these calls into messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel

T = TypeVar("T", bound=BaseModel)


class LLMOutputError(RuntimeError):
    """The model kept returning output that does not fit the schema."""


class LLM(Protocol):
    def structured(
        self,
        *,
        system: str,
        messages: list[dict[str, Any]],
        schema: type[T],
        purpose: str,
        project_id: int | None = None,
        max_tokens: int = 4096,
        model: str | None = None,
    ) -> T:
        """Call Claude and return a validated `schema` instance.

        Retries malformed output a few times, then raises LLMOutputError.
        Records token usage in the spend ledger under `purpose`.
        """
        ...


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

    def texts(self, kind: str) -> list[Any]:
        return [v for k, v in self.calls if k == kind]
