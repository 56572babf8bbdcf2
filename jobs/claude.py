"""Claude through the real anthropic SDK: structured output, retries, spend ledger.

Structured output uses the same wire format as `client.messages.parse(output_format=...)`
(`output_config.format = {"type": "json_schema", "schema": ...}`, schema built by the
SDK's own `transform_schema`), but calls `messages.create` and validates the text
itself: `parse` validates inside the SDK and raises before the usage of a malformed
reply can be read, and every call must land in the spend ledger.

No temperature/top_p is sent (not accepted by current models); no forced tool_choice.
The SDK retries 429/5xx itself (honouring retry-after); this class retries only
malformed output (invalid JSON, schema mismatch, refusal, max_tokens cut-off).

Token counting (`count_tokens`) goes to POST /v1/messages/count_tokens through the SDK's
`messages.count_tokens`; the API answers {"input_tokens": N}. Counting is free, so it is
not recorded in the spend ledger.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import anthropic
from pydantic import BaseModel, ValidationError

from jobs.llm import LLMOutputError
from storage import spend
from storage.db import Database
from storage.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T", bound=BaseModel)

DEFAULT_BASE_URL = "https://api.anthropic.com"
MAX_ATTEMPTS = 3
_BAD_ECHO_CHARS = 4000  # how much of a malformed reply is echoed back in the retry


class ClaudeAPIError(RuntimeError):
    """Claude could not be reached or refused the request (auth, quota, bad request)."""


class ClaudeClient:
    """Implements `jobs.llm.LLM`. Thread-safe: one instance serves many workers."""

    def __init__(
        self,
        settings: Settings,
        db: Database | None,
        client: anthropic.Anthropic | None = None,
        *,
        max_retries: int = 4,
        timeout_s: float = 600.0,
    ) -> None:
        self.settings = settings
        self.db = db
        self.base_url = settings.anthropic_base_url or DEFAULT_BASE_URL
        self._max_retries = max_retries
        self._timeout_s = timeout_s
        self._client = client
        self._lock = threading.Lock()

    # -- public ---------------------------------------------------------------------------

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
        model = model or self.settings.tuner_claude_model
        output_config = {
            "format": {"type": "json_schema", "schema": anthropic.transform_schema(schema)}
        }
        convo = list(messages)
        problem = ""
        for attempt in range(1, MAX_ATTEMPTS + 1):
            msg = self._create(
                model=model,
                system=system,
                messages=convo,
                max_tokens=max_tokens,
                output_config=output_config,
            )
            self._record(msg, model=model, purpose=purpose, project_id=project_id)
            text = "".join(b.text for b in msg.content if getattr(b, "type", "") == "text")
            problem = _problem(msg.stop_reason, text, schema)
            if not problem:
                return schema.model_validate_json(_strip_fences(text))
            log.warning("claude %s attempt %d/%d: %s", purpose, attempt, MAX_ATTEMPTS, problem)
            if text.strip():
                convo.append({"role": "assistant", "content": text[:_BAD_ECHO_CHARS]})
            convo.append({"role": "user", "content": _correction(problem, schema)})
        raise LLMOutputError(
            f"Claude did not return a valid {schema.__name__} for '{purpose}' after "
            f"{MAX_ATTEMPTS} attempts (last problem: {problem}). Try again or simplify the request."
        )

    def count_tokens(
        self,
        system: str,
        messages: list[dict[str, Any]],
        model: str | None = None,
    ) -> int:
        """Input tokens Claude would bill for `system` + `messages` (free; not in the ledger).

        A conversation ending in an assistant turn is counted too, so the tokens of a
        response are count(prompt + response) - count(prompt).
        """
        kwargs: dict[str, Any] = {
            "model": model or self.settings.tuner_claude_model,
            "messages": messages,
        }
        if system:
            kwargs["system"] = system
        result = self._call(lambda client: client.messages.count_tokens(**kwargs))
        return int(result.input_tokens)

    def ping(self) -> str:
        """Cheap connectivity/auth check for `tuner doctor`."""
        page = self._call(lambda client: client.models.list(limit=1))
        ids = [m.id for m in page.data]
        return f"Claude reachable at {self.base_url}" + (f" (e.g. {ids[0]})" if ids else "")

    # -- internals ------------------------------------------------------------------------

    def _sdk(self) -> anthropic.Anthropic:
        with self._lock:
            if self._client is None:
                if self.settings.anthropic_api_key is None:
                    raise ClaudeAPIError("ANTHROPIC_API_KEY is not set.")
                self._client = anthropic.Anthropic(
                    api_key=self.settings.anthropic_api_key.get_secret_value(),
                    base_url=self.base_url,
                    max_retries=self._max_retries,
                    timeout=self._timeout_s,
                )
            return self._client

    def _create(self, **kwargs: Any) -> Any:
        return self._call(lambda client: client.messages.create(**kwargs))

    def _call(self, fn: Callable[[anthropic.Anthropic], Any]) -> Any:
        """Run one SDK call, turning SDK errors into ClaudeAPIError with a readable message."""
        client = self._sdk()
        try:
            return fn(client)
        except anthropic.AuthenticationError as e:
            raise ClaudeAPIError(_auth_message()) from e
        except anthropic.APIConnectionError as e:
            raise ClaudeAPIError(f"Could not reach Claude at {self.base_url}: {e}") from e
        except anthropic.APIStatusError as e:
            raise ClaudeAPIError(f"Claude API answered {e.status_code}: {_err_text(e)}") from e

    def _record(self, msg: Any, *, model: str, purpose: str, project_id: int | None) -> None:
        if self.db is None:
            return
        usage = msg.usage
        tin = int(usage.input_tokens or 0) + int(getattr(usage, "cache_read_input_tokens", 0) or 0)
        tin += int(getattr(usage, "cache_creation_input_tokens", 0) or 0)
        tout = int(usage.output_tokens or 0)
        spend.record(
            self.db,
            kind="claude_tokens",
            quantity=tin + tout,
            usd=spend.claude_cost(model, tin, tout),
            project_id=project_id,
            detail=purpose,
        )


def _problem(stop_reason: str | None, text: str, schema: type[BaseModel]) -> str:
    if stop_reason == "refusal":
        return "the model refused"
    if stop_reason == "max_tokens":
        return "the reply was cut off at max_tokens"
    if not text.strip():
        return "empty reply"
    try:
        schema.model_validate_json(_strip_fences(text))
    except ValidationError as e:
        errs = e.errors()
        if errs and errs[0].get("type") == "json_invalid":
            return "reply is not valid JSON"
        first = errs[0] if errs else {}
        loc = ".".join(str(p) for p in first.get("loc", ())) or "(root)"
        return f"{len(errs)} schema error(s), first at {loc}: {first.get('msg', 'invalid')}"
    return ""


def _correction(problem: str, schema: type[BaseModel]) -> str:
    return (
        f"Your previous reply could not be used: {problem}. Reply again with ONLY one JSON "
        f"object that matches the {schema.__name__} schema exactly"
        + (", and keep it shorter." if "max_tokens" in problem else ".")
    )


def _strip_fences(text: str) -> str:
    t = text.strip()
    if t.startswith("```"):
        t = t.split("\n", 1)[1] if "\n" in t else ""
        if t.rstrip().endswith("```"):
            t = t.rstrip()[:-3]
    return t


def _auth_message() -> str:
    return "Anthropic rejected the API key (401 authentication_error). Check ANTHROPIC_API_KEY."


def _err_text(e: anthropic.APIStatusError) -> str:
    body = e.body
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):
            return f"{err.get('type', 'error')}: {err['message']}"
    try:
        return json.dumps(body)[:300]
    except (TypeError, ValueError):
        return str(e)[:300]
