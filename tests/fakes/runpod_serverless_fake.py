"""Loopback fake of RunPod serverless: REST /v2/{endpoint_id}/... and the GraphQL
template/endpoint operations the runpod SDK (1.12.0) sends.

    with FakeServerless.running() as fake:
        monkeypatch.setenv("RUNPOD_API_BASE_URL", fake.base_url)            # GraphQL at /graphql
        monkeypatch.setenv("RUNPOD_ENDPOINT_BASE_URL", fake.endpoint_base_url)  # .../v2

`graphql(query, variables)` returns a full GraphQL response body ({"data": ...} or
{"errors": [...]}) or None when the operation is not one of ours, so another fake's
/graphql can delegate to it. GraphQL string literals are really parsed (an unescaped
quote is a syntax error, as on the real server).

Behaviour knobs: `healthy=False` (jobs stay IN_QUEUE, no worker ever becomes ready),
`smoke_fails=True` (jobs end `fail_status`: FAILED, or TIMED_OUT), `worker_error="..."`
(jobs end COMPLETED with worker-vllm's error output), `queue_polls` / `running_polls` /
`progress_polls` (status polls spent in IN_QUEUE / RUNNING / IN_PROGRESS),
`template_in_use_s` (how long after its endpoint is deleted a template still counts as in
use), `execution_ms`, `usage`, `clock` (the fake's time source).

What the real service does that the fake copies, and where that is documented:
- job statuses IN_QUEUE, IN_PROGRESS, RUNNING, COMPLETED, FAILED, CANCELLED, TIMED_OUT
  (runpod/docs serverless/endpoints/job-states.mdx); /run -> {"id","status":"IN_QUEUE"},
  /status -> {"id","status","delayTime","executionTime","output"} (ms; "error" when FAILED),
  /cancel -> {"id","status":"CANCELLED"}, /health -> {"jobs":{completed,failed,inProgress,
  inQueue,retried},"workers":{...}} (serverless/endpoints/operation-reference.mdx).
- worker-vllm (runpod-workers/worker-vllm v2.25.x, src/handler.py): the legacy input
  {"messages"|"prompt", "sampling_params"} is proxied to vLLM's /v1/chat/completions (or
  /v1/completions) and the JSON answer yielded; RunPod aggregates the yields into a list
  (src/main.py return_aggregate_stream=True), so COMPLETED output is
  [<chat.completion with usage.prompt_tokens/completion_tokens>]. Bad input and vLLM
  HTTP errors are yielded as {"error": {"message", "type": "worker_error", "code": None}}:
  the job still ends COMPLETED. vLLM rejects max_tokens beyond MAX_MODEL_LEN with a 400.
- deleteTemplate is refused while an endpoint uses the template and "up to 2 minutes"
  after its most recent use (runpod/docs sdks/graphql/manage-pod-templates.mdx); the
  message is api-reference-v2/openapi.json's deleteTemplate 400 description. The real
  GraphQL wording is not documented; clients should match "in use" only.
- deleteEndpoint needs workersMin = workersMax = 0 first.
"""

from __future__ import annotations

import itertools
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# ------------------------------------------------------------------ GraphQL parsing
_TOKEN = re.compile(
    r'\s*(?:(?P<str>"(?:[^"\\\n]|\\.)*")|(?P<num>-?\d+(?:\.\d+)?)|(?P<name>[A-Za-z_]\w*)'
    r"|(?P<punct>[{}()\[\]:,!$=@])|(?P<comment>#[^\n]*))"
)


class GraphQLSyntaxError(ValueError):
    pass


def _tokens(src: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    src = src.rstrip()
    while pos < len(src):
        m = _TOKEN.match(src, pos)
        if not m or m.end() == pos:
            raise GraphQLSyntaxError(f"Syntax Error: unexpected character at {pos}: {src[pos:pos+20]!r}")
        pos = m.end()
        kind = m.lastgroup
        if kind == "comment":
            continue
        out.append((kind or "", m.group(kind or 0)))
    return out


class _Parser:
    def __init__(self, src: str, variables: dict[str, Any]) -> None:
        self.toks = _tokens(src)
        self.i = 0
        self.vars = variables

    def peek(self) -> str | None:
        return self.toks[self.i][1] if self.i < len(self.toks) else None

    def take(self, expect: str | None = None) -> tuple[str, str]:
        if self.i >= len(self.toks):
            raise GraphQLSyntaxError("Syntax Error: unexpected end of document")
        tok = self.toks[self.i]
        if expect is not None and tok[1] != expect:
            raise GraphQLSyntaxError(f"Syntax Error: expected {expect!r}, got {tok[1]!r}")
        self.i += 1
        return tok

    def operation(self) -> tuple[str, list[tuple[str, dict[str, Any]]]]:
        op = "query"
        if self.peek() in ("query", "mutation"):
            op = self.take()[1]
            if self.peek() not in ("{", "("):
                self.take()  # operation name
            if self.peek() == "(":  # variable definitions: skip
                depth = 0
                while True:
                    t = self.take()[1]
                    depth += t == "("
                    depth -= t == ")"
                    if depth == 0:
                        break
        return op, self.selection()

    def selection(self) -> list[tuple[str, dict[str, Any]]]:
        self.take("{")
        fields: list[tuple[str, dict[str, Any]]] = []
        while self.peek() != "}":
            kind, name = self.take()
            if kind != "name":
                raise GraphQLSyntaxError(f"Syntax Error: unexpected {name!r}")
            args: dict[str, Any] = {}
            if self.peek() == "(":
                self.take("(")
                while self.peek() != ")":
                    key = self.take()[1]
                    self.take(":")
                    args[key] = self.value()
                    if self.peek() == ",":
                        self.take(",")
                self.take(")")
            if self.peek() == "{":
                args["__selection__"] = self.selection()
            fields.append((name, args))
            if self.peek() == ",":
                self.take(",")
        self.take("}")
        return fields

    def value(self) -> Any:
        kind, tok = self.take()
        if kind == "str":
            return json.loads(tok)
        if kind == "num":
            return float(tok) if "." in tok else int(tok)
        if tok == "$":
            return self.vars.get(self.take()[1])
        if kind == "name":
            return {"true": True, "false": False, "null": None}.get(tok, tok)
        if tok == "[":
            items = []
            while self.peek() != "]":
                items.append(self.value())
                if self.peek() == ",":
                    self.take(",")
            self.take("]")
            return items
        if tok == "{":
            obj: dict[str, Any] = {}
            while self.peek() != "}":
                key = self.take()[1]
                self.take(":")
                obj[key] = self.value()
                if self.peek() == ",":
                    self.take(",")
            self.take("}")
            return obj
        raise GraphQLSyntaxError(f"Syntax Error: unexpected {tok!r}")


def parse_graphql(query: str, variables: dict[str, Any] | None = None):  # noqa: ANN201
    """-> (operation, [(field, args)])"""
    return _Parser(query, variables or {}).operation()


# -------------------------------------------------------------------------- fake
@dataclass
class _Job:
    id: str
    endpoint_id: str
    payload: dict[str, Any]
    polls: int = 0
    status: str = "IN_QUEUE"


PENDING_STATUSES = ("IN_QUEUE", "RUNNING", "IN_PROGRESS")
TERMINAL_STATUSES = ("COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT")
TEMPLATE_IN_USE = "Template is in use by a pod or serverless endpoint and cannot be deleted"
WORKER_INPUT_ERROR = ("Job input must contain one of: openai_input (+openai_route), "
                      "route (+body), or prompt/messages.")


@dataclass
class FakeServerless:
    api_key: str = "rp-test-key"
    healthy: bool = True
    smoke_fails: bool = False
    fail_status: str = "FAILED"  # or TIMED_OUT: how a failing job ends
    worker_error: str | None = None  # COMPLETED with [{"error": {...}}] output
    queue_polls: int = 1
    running_polls: int = 1
    progress_polls: int = 1
    template_in_use_s: float = 1.0
    clock: Callable[[], float] = time.monotonic
    execution_ms: int = 1500
    delay_ms: int = 800
    usage: dict[str, int] = field(default_factory=lambda: {"input": 24, "output": 16})
    output_text: str = "Hello from the tuned model."

    templates: dict[str, dict[str, Any]] = field(default_factory=dict)  # by id
    endpoints: dict[str, dict[str, Any]] = field(default_factory=dict)  # by id
    jobs: dict[str, _Job] = field(default_factory=dict)
    requests: list[tuple[str, str, Any]] = field(default_factory=list)  # (method, path, body)
    graphql_queries: list[str] = field(default_factory=list)
    status_log: list[str] = field(default_factory=list)  # statuses served by /status
    template_delete_refusals: int = 0
    endpoint_deleted_at: dict[str, float] = field(default_factory=dict)  # template id -> clock
    port: int = 0

    def __post_init__(self) -> None:
        self._ids = itertools.count(1)
        self._lock = threading.RLock()

    # ----------------------------------------------------------------- urls
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def endpoint_base_url(self) -> str:
        return f"{self.base_url}/v2"

    @property
    def live_endpoints(self) -> list[str]:
        return sorted(self.endpoints)

    @property
    def live_templates(self) -> list[str]:
        return sorted(t["name"] for t in self.templates.values())

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}{next(self._ids):04d}"

    # -------------------------------------------------------------- GraphQL
    def graphql(self, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any] | None:
        try:
            op, fields = parse_graphql(query, variables)
        except GraphQLSyntaxError as exc:
            if any(w in query for w in ("saveTemplate", "saveEndpoint", "deleteEndpoint", "deleteTemplate")):
                return {"errors": [{"message": str(exc)}]}
            return None
        data: dict[str, Any] = {}
        with self._lock:
            for name, args in fields:
                try:
                    handled = self._field(op, name, args)
                except ValueError as exc:
                    return {"errors": [{"message": str(exc)}]}
                if handled is _UNHANDLED:
                    return None
                data[name] = handled
        self.graphql_queries.append(query)
        return {"data": data}

    def _field(self, op: str, name: str, args: dict[str, Any]) -> Any:
        inp = args.get("input", {})
        if op == "mutation" and name == "saveTemplate":
            if any(t["name"] == inp["name"] for t in self.templates.values()):
                raise ValueError(f"Template name must be unique: {inp['name']}")
            tid = self._new_id("tpl")
            env = {e["key"]: e["value"] for e in inp.get("env", [])}
            self.templates[tid] = {
                "id": tid,
                "name": inp["name"],
                "imageName": inp["imageName"],
                "env": env,
                "isServerless": inp.get("isServerless", False),
                "containerDiskInGb": inp.get("containerDiskInGb"),
            }
            return {**self.templates[tid], "env": [{"key": k, "value": v} for k, v in env.items()]}
        if op == "mutation" and name == "saveEndpoint":
            if "id" in inp:  # update
                ep = self.endpoints.get(inp["id"])
                if ep is None:
                    raise ValueError(f"endpoint {inp['id']} not found")
                ep.update({k: v for k, v in inp.items() if k != "id"})
                return dict(ep)
            if inp.get("templateId") not in self.templates:
                raise ValueError(f"template {inp.get('templateId')} not found")
            eid = self._new_id("ep")
            self.endpoints[eid] = {"id": eid, **inp}
            return dict(self.endpoints[eid])
        if op == "mutation" and name == "deleteEndpoint":
            ep = self.endpoints.get(args.get("id"))
            if ep is None:
                raise ValueError(f"endpoint {args.get('id')} not found")
            if ep.get("workersMin", 0) != 0 or ep.get("workersMax", 0) != 0:
                raise ValueError("Endpoint must have min and max workers set to 0 before deletion")
            del self.endpoints[ep["id"]]
            self.endpoint_deleted_at[str(ep.get("templateId"))] = self.clock()
            return None
        if op == "mutation" and name == "deleteTemplate":
            tpl = next((t for t in self.templates.values() if t["name"] == args.get("templateName")), None)
            if tpl is None:
                raise ValueError(f"template {args.get('templateName')} not found")
            if self.template_in_use(tpl["id"]):
                self.template_delete_refusals += 1
                raise ValueError(TEMPLATE_IN_USE)
            del self.templates[tpl["id"]]
            return None
        if op == "query" and name == "myself":
            sel = [f for f, _ in args.get("__selection__", [])]
            if sel != ["endpoints"]:
                return _UNHANDLED
            return {"endpoints": [dict(e) for e in self.endpoints.values()]}
        return _UNHANDLED

    def template_in_use(self, template_id: str) -> bool:
        """Used by a live endpoint, or its endpoint went less than template_in_use_s ago."""
        if any(e.get("templateId") == template_id for e in self.endpoints.values()):
            return True
        gone = self.endpoint_deleted_at.get(template_id)
        return gone is not None and self.clock() - gone < self.template_in_use_s

    # ----------------------------------------------------------------- REST
    def _workers(self, endpoint_id: str) -> dict[str, int]:
        active = any(j.endpoint_id == endpoint_id and j.status in PENDING_STATUSES for j in self.jobs.values())
        if not self.healthy:
            return {"idle": 0, "running": 0, "initializing": 0, "ready": 0, "throttled": 1 if active else 0, "unhealthy": 0}
        busy = any(j.endpoint_id == endpoint_id and j.status in ("RUNNING", "IN_PROGRESS") for j in self.jobs.values())
        ever = any(j.endpoint_id == endpoint_id for j in self.jobs.values())
        return {
            "idle": 1 if ever and not busy else 0,
            "running": 1 if busy else 0,
            "initializing": 1 if active and not busy and not ever else 0,
            "ready": 1 if ever else 0,
            "throttled": 0,
            "unhealthy": 0,
        }

    def _advance(self, job: _Job) -> None:
        if job.status in TERMINAL_STATUSES or not self.healthy:
            return
        job.polls += 1
        running_until = self.queue_polls + self.running_polls
        if job.polls > running_until + self.progress_polls:
            job.status = self.fail_status if self.smoke_fails else "COMPLETED"
        elif job.polls > running_until:
            job.status = "IN_PROGRESS"
        elif job.polls > self.queue_polls:
            job.status = "RUNNING"

    def _job_body(self, job: _Job) -> dict[str, Any]:
        body: dict[str, Any] = {"id": job.id, "status": job.status}
        if job.status in ("RUNNING", "IN_PROGRESS", "COMPLETED", "FAILED"):
            body["delayTime"] = self.delay_ms
        if job.status == "COMPLETED":
            body["executionTime"] = self.execution_ms
            body["output"] = [self._worker_output(job)]
        if job.status == "FAILED":
            body["executionTime"] = self.execution_ms
            body["error"] = "CUDA out of memory while loading the model"
        return body

    def _worker_output(self, job: _Job) -> dict[str, Any]:
        """What worker-vllm yields for the job's input (see the module docstring)."""
        inp = job.payload if isinstance(job.payload, dict) else {}
        if self.worker_error is not None:
            return _worker_error(self.worker_error)
        if inp.get("messages") is None and inp.get("prompt") is None:
            return _worker_error(WORKER_INPUT_ERROR)
        max_len = int(self._env(job.endpoint_id).get("MAX_MODEL_LEN") or 0)
        want = int((inp.get("sampling_params") or {}).get("max_tokens") or 0)
        if max_len and want >= max_len:
            detail = json.dumps({"object": "error", "type": "BadRequestError", "code": 400,
                                 "message": f"This model's maximum context length is {max_len} tokens. "
                                            f"However, you requested {want} output tokens."})
            return _worker_error(f"vLLM returned HTTP 400: {detail}")
        u = self.usage
        return {
            "id": f"chatcmpl-{job.id}", "object": "chat.completion", "created": 0,
            "model": self._env(job.endpoint_id).get("MODEL_NAME", ""),
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": self.output_text}}],
            "usage": {"prompt_tokens": u["input"], "completion_tokens": u["output"],
                      "total_tokens": u["input"] + u["output"]},
        }

    def _env(self, endpoint_id: str) -> dict[str, str]:
        ep = self.endpoints.get(endpoint_id) or {}
        return dict((self.templates.get(str(ep.get("templateId"))) or {}).get("env") or {})

    def rest(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        parts = path.strip("/").split("/")
        if len(parts) < 3 or parts[0] != "v2":
            return 404, {"error": "not found"}
        eid, rest = parts[1], parts[2:]
        with self._lock:
            if eid not in self.endpoints:
                return 404, {"error": f"endpoint {eid} not found"}
            if method == "GET" and rest == ["health"]:
                jobs = [j for j in self.jobs.values() if j.endpoint_id == eid]
                counts = {
                    "completed": sum(j.status == "COMPLETED" for j in jobs),
                    "failed": sum(j.status == "FAILED" for j in jobs),
                    "inProgress": sum(j.status in ("RUNNING", "IN_PROGRESS") for j in jobs),
                    "inQueue": sum(j.status == "IN_QUEUE" for j in jobs),
                    "retried": 0,
                }
                return 200, {"jobs": counts, "workers": self._workers(eid)}
            if method == "POST" and rest in (["run"], ["runsync"]):
                if not isinstance(body, dict) or "input" not in body:
                    return 400, {"error": "missing input"}
                job = _Job(self._new_id("job-"), eid, body["input"])
                self.jobs[job.id] = job
                if rest == ["runsync"]:
                    for _ in range(self.queue_polls + self.running_polls + self.progress_polls + 1):
                        self._advance(job)
                    return 200, self._job_body(job)
                return 200, {"id": job.id, "status": "IN_QUEUE"}
            if method == "GET" and len(rest) == 2 and rest[0] == "status":
                job = self.jobs.get(rest[1])
                if job is None or job.endpoint_id != eid:
                    return 404, {"error": "job not found"}
                self._advance(job)
                body_out = self._job_body(job)
                self.status_log.append(job.status)
                return 200, body_out
            if method == "POST" and len(rest) == 2 and rest[0] == "cancel":
                job = self.jobs.get(rest[1])
                if job is None:
                    return 404, {"error": "job not found"}
                if job.status in PENDING_STATUSES:
                    job.status = "CANCELLED"
                return 200, {"id": job.id, "status": job.status}
            if method == "POST" and rest == ["openai", "v1", "chat", "completions"]:
                if not self.healthy or self.smoke_fails or self.worker_error is not None:
                    return 500, {"error": "worker unavailable"}
                model = self.templates[self.endpoints[eid]["templateId"]]["env"].get("MODEL_NAME", "")
                if body.get("model") != model:
                    return 404, {"error": {"message": f"The model `{body.get('model')}` does not exist."}}
                u = self.usage
                return 200, {
                    "id": "chatcmpl-fake",
                    "object": "chat.completion",
                    "model": model,
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": self.output_text}}],
                    "usage": {"prompt_tokens": u["input"], "completion_tokens": u["output"],
                              "total_tokens": u["input"] + u["output"]},
                }
        return 404, {"error": "not found"}

    # --------------------------------------------------------------- server
    @classmethod
    @contextmanager
    def running(cls, **kwargs: Any) -> Iterator["FakeServerless"]:
        fake = cls(**kwargs)
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(fake))
        fake.port = server.server_address[1]
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        try:
            yield fake
        finally:
            server.shutdown()
            server.server_close()


def _worker_error(message: str) -> dict[str, Any]:
    """worker-vllm's error item (src/handler.py `_error`)."""
    return {"error": {"message": message, "type": "worker_error", "code": None}}


class _Unhandled:
    pass


_UNHANDLED: Any = _Unhandled()


def _handler_for(fake: FakeServerless) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _send(self, code: int, body: Any) -> None:
            raw = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def _authed(self) -> bool:
            return self.headers.get("Authorization") == f"Bearer {fake.api_key}"

        def _handle(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                body = json.loads(raw) if raw else None
            except json.JSONDecodeError:
                return self._send(400, {"error": "bad json"})
            fake.requests.append((method, self.path, body))
            if not self._authed():
                return self._send(401, {"error": "Unauthorized"})
            if self.path.split("?")[0] == "/graphql" and method == "POST":
                out = fake.graphql((body or {}).get("query", ""), (body or {}).get("variables"))
                if out is None:
                    out = {"errors": [{"message": "unsupported operation in FakeServerless"}]}
                return self._send(200, out)
            code, out = fake.rest(method, self.path.split("?")[0], body)
            self._send(code, out)

        def do_GET(self) -> None:  # noqa: N802
            self._handle("GET")

        def do_POST(self) -> None:  # noqa: N802
            self._handle("POST")

    return Handler
