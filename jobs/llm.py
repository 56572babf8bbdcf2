"""Claude access for generation and judging: one thin, injectable client."""

from __future__ import annotations

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
