"""Loopback fake of the Anthropic Messages API, reached through the real SDK.

Speaks the documented wire format:
  POST /v1/messages  -> {"id","type":"message","role":"assistant","content":[{"type":"text",
                         "text"}],"model","stop_reason","stop_sequence","usage":{...}}
  POST /v1/messages/count_tokens -> {"input_tokens": N}; fields other than the documented
                         ones (e.g. max_tokens) are a 400 "Extra inputs are not permitted",
                         as on the API. N comes from `count_request_tokens` below.
  GET  /v1/models    -> {"data":[{"type":"model","id",...}],"has_more","first_id","last_id"}
  errors             -> {"type":"error","error":{"type":...,"message":...},"request_id":...}
                         with the status the API uses (401 authentication_error, 429
                         rate_limit_error with a retry-after header, 400
                         invalid_request_error, 404 not_found_error).

Model checks, on /v1/messages and /v1/messages/count_tokens alike:
- a model id outside the SDK's own list (anthropic/types/model_param.py `ModelParam`,
  read from the installed SDK) is a 404 not_found_error "model: <id>" (the API's answer
  for an unknown id, e.g. anthropics/claude-code issues 5349 and 6169);
- messages ending in an assistant turn (prefill) on a model without prefill support are
  a 400 invalid_request_error "This model does not support assistant message prefill.
  The conversation must end with a user message." (message as logged from the API in
  jobrunr/JavaClaw issue 36; the SDK's MessageCountTokensParams.messages docstring says
  such requests "return a 400 error", see platform.claude.com/docs/en/api/errors
  #prefill-not-supported). Prefill is gone from Claude 4.6 on; the harsher reading is
  taken: only the 4.5 ids in PREFILL_MODELS accept it.

The fake tokenizer is deterministic and documented so tests can compute expected counts:
a token is a run of word characters or one punctuation character (`_TOKEN`); a
request is its system prompt's tokens plus, per message, MESSAGE_OVERHEAD_TOKENS (role
framing) plus its text's tokens.

`responder(request_json) -> str | Reply` scripts the assistant text. Use it like:

    with FakeAnthropic.running(responder) as fake:
        client = anthropic.Anthropic(api_key=fake.api_key, base_url=fake.base_url)
"""

from __future__ import annotations

import json
import re
import threading
import time
import typing
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from anthropic.types import ModelParam

API_KEY = "sk-ant-test-key"
KNOWN_MODELS: frozenset[str] = frozenset(typing.get_args(typing.get_args(ModelParam)[0]))
PREFILL_MODELS: frozenset[str] = frozenset({
    "claude-opus-4-5", "claude-opus-4-5-20251101", "claude-haiku-4-5", "claude-haiku-4-5-20251001",
}) & KNOWN_MODELS
PREFILL_UNSUPPORTED = ("This model does not support assistant message prefill. "
                       "The conversation must end with a user message.")
MESSAGE_OVERHEAD_TOKENS = 3
COUNT_TOKENS_PATH = "/v1/messages/count_tokens"
COUNT_TOKENS_FIELDS = frozenset({
    "messages", "model", "system", "tools", "tool_choice", "thinking", "output_config",
    "cache_control", "speed", "mcp_servers", "context_management",
})
_TOKEN = re.compile(r"\w+|[^\w\s]")


def count_text_tokens(text: str) -> int:
    """The fake tokenizer: word runs and single punctuation characters."""
    return len(_TOKEN.findall(text))


def _content_text(content: Any) -> str:
    if isinstance(content, list):
        return "\n".join(b.get("text", "") for b in content if isinstance(b, dict))
    return str(content or "")


def count_request_tokens(req: dict[str, Any]) -> int:
    """What POST /v1/messages/count_tokens answers for a request body."""
    n = count_text_tokens(system_text(req))
    for m in req.get("messages") or []:
        n += MESSAGE_OVERHEAD_TOKENS + count_text_tokens(_content_text(m.get("content")))
    return n


@dataclass
class Reply:
    text: str
    stop_reason: str = "end_turn"


Responder = Callable[[dict[str, Any]], "str | Reply"]


def system_text(req: dict[str, Any]) -> str:
    """The system prompt of a request as one string (str or list of text blocks)."""
    s = req.get("system") or ""
    if isinstance(s, list):
        return "\n".join(b.get("text", "") for b in s if isinstance(b, dict))
    return str(s)


def last_user_text(req: dict[str, Any]) -> str:
    for m in reversed(req.get("messages") or []):
        if m.get("role") == "user":
            return _content_text(m.get("content"))
    return ""


def schema_title(req: dict[str, Any]) -> str | None:
    fmt = ((req.get("output_config") or {}).get("format")) or {}
    return (fmt.get("schema") or {}).get("title")


class FakeAnthropic:
    def __init__(
        self,
        responder: Responder,
        *,
        api_key: str = API_KEY,
        latency_s: float = 0.0,
        rate_limit_per_s: float | None = None,
    ) -> None:
        self.responder = responder
        self.api_key = api_key
        self.latency_s = latency_s
        self.rate_limit_per_s = rate_limit_per_s
        self.requests: list[dict[str, Any]] = []
        self.rate_limited = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._window: deque[float] = deque()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------

    @classmethod
    @contextmanager
    def running(cls, responder: Responder, **kwargs: Any) -> Iterator[FakeAnthropic]:
        fake = cls(responder, **kwargs)
        fake.start()
        try:
            yield fake
        finally:
            fake.stop()

    def start(self) -> None:
        fake = self

        class Handler(_Handler):
            owner = fake

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def base_url(self) -> str:
        assert self._server is not None, "not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def message_requests(self) -> list[dict[str, Any]]:
        with self._lock:
            return [r for r in self.requests if r.get("_path") == "/v1/messages"]

    @property
    def count_requests(self) -> list[dict[str, Any]]:
        with self._lock:
            return [r for r in self.requests if r.get("_path") == COUNT_TOKENS_PATH]

    # -- helpers for the handler -------------------------------------------------------------

    def _admit(self) -> float | None:
        """None if admitted under the rate limit, else seconds until a slot frees."""
        if not self.rate_limit_per_s:
            return None
        now = time.monotonic()
        with self._lock:
            while self._window and now - self._window[0] >= 1.0:
                self._window.popleft()
            if len(self._window) >= self.rate_limit_per_s:
                self.rate_limited += 1
                return max(0.01, 1.0 - (now - self._window[0]))
            self._window.append(now)
        return None

    def _enter(self) -> None:
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def _leave(self) -> None:
        with self._lock:
            self.in_flight -= 1


class _Handler(BaseHTTPRequestHandler):
    owner: FakeAnthropic
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        return

    # -- plumbing --------------------------------------------------------------------------

    def _send(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.send_header("request-id", "req_" + uuid.uuid4().hex[:24])
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, etype: str, message: str, headers: dict[str, str] | None = None):
        body = {"type": "error", "error": {"type": etype, "message": message},
                "request_id": "req_" + uuid.uuid4().hex[:24]}
        self._send(status, body, headers)

    def _model_refused(self, body: dict[str, Any]) -> bool:
        """404 for an unknown model id, 400 for prefill on a model without it (sent here)."""
        model = body.get("model")
        if not isinstance(model, str) or model not in KNOWN_MODELS:
            self._error(404, "not_found_error", f"model: {model}")
            return True
        msgs = body.get("messages")
        last = msgs[-1] if isinstance(msgs, list) and msgs else None
        if isinstance(last, dict) and last.get("role") == "assistant" and model not in PREFILL_MODELS:
            self._error(400, "invalid_request_error", PREFILL_UNSUPPORTED)
            return True
        return False

    def _authed(self) -> bool:
        # The API takes `x-api-key`; anthropic 2.x sends the key as `Authorization: Bearer`.
        auth = self.headers.get("authorization") or ""
        bearer = auth[7:] if auth.lower().startswith("bearer ") else None
        if self.owner.api_key not in (self.headers.get("x-api-key"), bearer):
            self._error(401, "authentication_error", "invalid x-api-key")
            return False
        return True

    def _read_json(self) -> dict[str, Any] | None:
        n = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(n) if n else b""
        try:
            body = json.loads(raw or b"{}")
        except json.JSONDecodeError:
            self._error(400, "invalid_request_error", "body is not valid JSON")
            return None
        if not isinstance(body, dict):
            self._error(400, "invalid_request_error", "body must be a JSON object")
            return None
        return body

    # -- routes ----------------------------------------------------------------------------

    def do_GET(self) -> None:  # noqa: N802
        if not self._authed():
            return
        if self.path.split("?")[0] != "/v1/models":
            self._error(404, "not_found_error", f"no route {self.path}")
            return
        model = {
            "type": "model",
            "id": "claude-sonnet-4-6",
            "display_name": "Claude Sonnet 4.6",
            "created_at": "2025-09-29T00:00:00Z",
        }
        self._send(
            200, {"data": [model], "has_more": False, "first_id": model["id"], "last_id": model["id"]}
        )

    def do_POST(self) -> None:  # noqa: N802
        owner = self.owner
        body = self._read_json()
        if body is None:
            return
        path = self.path.split("?")[0]
        if path not in ("/v1/messages", COUNT_TOKENS_PATH):
            self._error(404, "not_found_error", f"no route {self.path}")
            return
        if not self._authed():
            return
        if path == COUNT_TOKENS_PATH:
            self._count_tokens(body)
            return
        wait = owner._admit()
        if wait is not None:
            self._error(
                429,
                "rate_limit_error",
                "rate limit exceeded",
                {"retry-after": f"{wait:.3f}"},
            )
            return
        for required in ("model", "max_tokens", "messages"):
            if required not in body:
                self._error(400, "invalid_request_error", f"{required}: field required")
                return
        if self._model_refused(body):
            return
        for banned in ("temperature", "top_p"):
            if banned in body:
                self._error(
                    400, "invalid_request_error", f"{banned} is not supported for this model"
                )
                return
        if (body.get("tool_choice") or {}).get("type") in ("tool", "any"):
            self._error(400, "invalid_request_error", "forced tool_choice is not supported")
            return
        with owner._lock:
            owner.requests.append({**body, "_path": "/v1/messages"})
        owner._enter()
        try:
            if owner.latency_s:
                time.sleep(owner.latency_s)
            try:
                out = owner.responder(body)
            except Exception as e:  # a bug in a test responder shows up as a 500
                self._error(500, "api_error", f"responder failed: {e!r}")
                return
            reply = out if isinstance(out, Reply) else Reply(str(out))
            in_tokens = max(1, len(json.dumps(body)) // 4)
            out_tokens = max(1, len(reply.text) // 4)
            self._send(
                200,
                {
                    "id": "msg_" + uuid.uuid4().hex[:24],
                    "type": "message",
                    "role": "assistant",
                    "content": [{"type": "text", "text": reply.text}],
                    "model": body["model"],
                    "stop_reason": reply.stop_reason,
                    "stop_sequence": None,
                    "usage": {"input_tokens": in_tokens, "output_tokens": out_tokens},
                },
            )
        finally:
            owner._leave()

    def _count_tokens(self, body: dict[str, Any]) -> None:
        owner = self.owner
        for required in ("model", "messages"):
            if required not in body:
                self._error(400, "invalid_request_error", f"{required}: Field required")
                return
        extra = sorted(set(body) - COUNT_TOKENS_FIELDS)
        if extra:
            self._error(400, "invalid_request_error", f"{extra[0]}: Extra inputs are not permitted")
            return
        msgs = body["messages"]
        if not isinstance(msgs, list) or not msgs:
            self._error(400, "invalid_request_error", "messages: at least one message is required")
            return
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
                self._error(400, "invalid_request_error", f"messages.{i}.role: must be user or assistant")
                return
        if self._model_refused(body):
            return
        with owner._lock:
            owner.requests.append({**body, "_path": COUNT_TOKENS_PATH})
        self._send(200, {"input_tokens": count_request_tokens(body)})
