"""Loopback fake of RunPod's GraphQL API + pod HTTP proxy, reached through the real SDK.

- POST /graphql: parses the query text runpod==1.12.0 generates (gpuTypes, pod,
  myself{pods}, podFindAndDeployOnDemand, podTerminate, podStop) with a real GraphQL
  value parser, so unescaped quotes/newlines in values fail like a syntax error would.
  The API key must arrive as `Authorization: Bearer <key>` (SDK 1.12) or `?api_key=`.
- Creating a pod runs the pod program for real: the base64 bundle in env
  TUNER_TRAIN_B64 is unpacked into the pod's workdir and `python -m jobs.train` runs
  from there (without a bundle, the repo's jobs.train runs) with env TUNER_POD_TOKEN /
  TUNER_POD_PORT / TUNER_WORKDIR / HF_HUB_OFFLINE=1 plus the pod's env.
- /proxy/{pod_id}-{port}/... is a reverse proxy to that process (502 while it is not
  listening or after a crash, 404 for unknown/terminated pods), matching
  TUNER_POD_URL_TEMPLATE="http://127.0.0.1:{fake_port}/proxy/{pod_id}-{port}".
- Billing: seconds from create to terminate (or to vanishing) per pod. An EXITED pod
  (crash(exited=True): its container's process ended) still bills until terminated.
- Host CUDA: each GPU type's hosts report `host_cuda[gpu]` (default "12.8"). A create
  with `allowedCudaVersions` refuses any value outside RunPod's enum (api-reference/
  openapi.json in runpod/docs, PodCreateInput.allowedCudaVersions) and, as the real
  scheduler does (matching is exact, "a version no machine reports yields a capacity
  error": api-reference-v2/openapi.json CreateGpuConfig), answers "no instances
  available" when the host's CUDA is not listed. `containerDiskInGb` is kept per pod.
- Every request proxied to a pod is recorded in `proxied` (pod id, method, path, body),
  so tests can read what the pod program was sent (e.g. the POST /job config).
- Failure injection (real RunPod behaviours): `terminate_failures = n` makes the next n
  podTerminate calls fail with RunPod's internal-error GraphQL message; `create_delay_s`
  delays the answer to podFindAndDeployOnDemand AFTER the pod exists (a client killed
  meanwhile never learns the pod id).
- `fail(op, fault, times=n | seconds=s)`: answer GraphQL operation `op` ("create",
  "gpuTypes", "pod", "pods", "terminate" or "any") with a fault from
  tests/fakes/runpod_faults.py (429 + Retry-After, Cloudflare HTML 5xx, GraphQL internal
  error, dropped connection; `lost(...)` = the pod is created, then the answer is lost).
  `no_capacity_message` picks which of RunPod's real no-capacity texts is sent.
  `gql_log` records (monotonic time, op, HTTP status) for every GraphQL request.
- `proxy_outage(status, seconds=s | times=n, pod_id=None)`: the pod proxy answers
  Cloudflare's HTML page for that status (520/522/524, 502...) or, status 0, resets.
- Booting: a new pod reports each desiredStatus of `boot_statuses` (default CREATED for
  0.3 s: the SDK's own CLI waits for RUNNING after a create, runpod==1.12.0
  runpod/cli/groups/project/functions.py) before RUNNING; its container (process) starts
  only then, the proxy answers 502 meanwhile. Statuses: GraphQL PodStatus
  (https://graphql-spec.runpod.io/#definition-PodStatus).
- Terminated pods stay listed (myself.pods, pod(podId)) with desiredStatus TERMINATED
  (the REST API lists/filters TERMINATED pods, runpod/docs api-reference/openapi.json;
  the harsher reading for GraphQL); `keep_terminated=False` hides them.
- Extension points: add_graphql_handler(fn(query, variables) -> response|None) for
  queries this fake doesn't know (e.g. serverless templates/endpoints), and
  add_route_handler(fn(method, path, headers, body) -> (status, headers, body)|None)
  for extra HTTP routes (e.g. serverless REST). `proxy_status[path] = code` answers
  that pod path with a Cloudflare error page instead of forwarding it (520/522/524 are
  documented Cloudflare errors on RunPod's proxy).
"""

from __future__ import annotations

import base64
import ctypes
import http.client
import io
import json
import os
import queue
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.fakes.runpod_faults import (
    INTERNAL_ERROR_MSG,
    NO_CAPACITY_MSG,
    TERMINATE_NOT_FOUND_MSG,
    Fault,
    cloudflare_headers,
    cloudflare_page,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
# RunPod's allowedCudaVersions enum (GraphQL schema / REST v2 OpenAPI `cudaVersions`).
RUNPOD_CUDA_VERSIONS = ("11.8", "12.0", "12.1", "12.2", "12.3", "12.4", "12.5", "12.6", "12.7",
                        "12.8", "12.9", "13.0")
__all__ = ["NO_CAPACITY_MSG", "FakePod", "FakeRunPod", "Fault"]
GQL_OPS = ("create", "terminate", "stop", "pods", "pod", "gpuTypes")

GraphQLHandler = Callable[[str, dict[str, Any]], dict[str, Any] | None]
RouteHandler = Callable[[str, str, dict[str, str], bytes], tuple[int, dict[str, str], bytes] | None]


# --------------------------------------------------------------------------- parser
class GraphQLSyntaxError(ValueError):
    pass


class _ValueParser:
    """Parses GraphQL argument lists / input values (objects, lists, strings, enums...)."""

    def __init__(self, text: str, pos: int) -> None:
        self.s, self.i = text, pos

    def _ws(self) -> None:
        while self.i < len(self.s) and (self.s[self.i] in " \t\r\n," or self.s[self.i] == "#"):
            if self.s[self.i] == "#":
                while self.i < len(self.s) and self.s[self.i] != "\n":
                    self.i += 1
            else:
                self.i += 1

    def _expect(self, ch: str) -> None:
        self._ws()
        if self.i >= len(self.s) or self.s[self.i] != ch:
            got = self.s[self.i : self.i + 20]
            raise GraphQLSyntaxError(f"Syntax Error: Expected {ch!r}, found {got!r}")
        self.i += 1

    def _name(self) -> str:
        self._ws()
        m = re.compile(r"[_A-Za-z][_0-9A-Za-z]*").match(self.s, self.i)
        if not m:
            raise GraphQLSyntaxError(f"Syntax Error: Expected Name at {self.i}")
        self.i = m.end()
        return m.group(0)

    def args(self) -> dict[str, Any]:
        self._expect("(")
        out: dict[str, Any] = {}
        while True:
            self._ws()
            if self.s[self.i] == ")":
                self.i += 1
                return out
            key = self._name()
            self._expect(":")
            out[key] = self.value()

    def value(self) -> Any:
        self._ws()
        c = self.s[self.i]
        if c == "{":
            self.i += 1
            obj: dict[str, Any] = {}
            while True:
                self._ws()
                if self.s[self.i] == "}":
                    self.i += 1
                    return obj
                key = self._name()
                self._expect(":")
                obj[key] = self.value()
        if c == "[":
            self.i += 1
            items: list[Any] = []
            while True:
                self._ws()
                if self.s[self.i] == "]":
                    self.i += 1
                    return items
                items.append(self.value())
        if c == '"':
            return self._string()
        m = re.compile(r"-?\d+(\.\d+)?([eE][+-]?\d+)?").match(self.s, self.i)
        if m:
            self.i = m.end()
            return float(m.group(0)) if (m.group(1) or m.group(2)) else int(m.group(0))
        name = self._name()
        return {"true": True, "false": False, "null": None}.get(name, name)

    def _string(self) -> str:
        self.i += 1
        out: list[str] = []
        esc = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
        while True:
            if self.i >= len(self.s):
                raise GraphQLSyntaxError("Syntax Error: Unterminated string.")
            c = self.s[self.i]
            if c == '"':
                self.i += 1
                return "".join(out)
            if c in "\n\r":
                raise GraphQLSyntaxError("Syntax Error: Unterminated string.")
            if c == "\\":
                n = self.s[self.i + 1]
                if n == "u":
                    out.append(chr(int(self.s[self.i + 2 : self.i + 6], 16)))
                    self.i += 6
                    continue
                if n not in esc:
                    raise GraphQLSyntaxError(f"Syntax Error: Invalid character escape \\{n}.")
                out.append(esc[n])
                self.i += 2
                continue
            out.append(c)
            self.i += 1


def field_args(query: str, field_name: str) -> dict[str, Any] | None:
    """Arguments of the first `field_name(...)` in the query; {} if it has none; None if absent."""
    # skip operation names ("query pod {"): only fields count
    m = re.search(rf"(?<!query )(?<!mutation )\b{field_name}\s*(\(|\{{)", query)
    if not m:
        return None
    if m.group(1) == "{":
        return {}
    return _ValueParser(query, m.start(1)).args()


def check_balanced(query: str) -> None:
    """Cheap whole-document syntax check: strings terminate, braces balance."""
    depth, i = 0, 0
    while i < len(query):
        c = query[i]
        if c == '"':
            p = _ValueParser(query, i)
            p._string()
            i = p.i
            continue
        if c in "{(":
            depth += 1
        elif c in "})":
            depth -= 1
            if depth < 0:
                raise GraphQLSyntaxError("Syntax Error: Unexpected '}'.")
        i += 1
    if depth:
        raise GraphQLSyntaxError("Syntax Error: Expected '}', found <EOF>.")


# ------------------------------------------------------------------------- the fake
@dataclass
class FakePod:
    id: str
    name: str
    image: str
    gpu_type: str
    cloud_type: str
    price: float
    env: dict[str, str]
    docker_args: str
    ports: str
    port: int
    workdir: Path
    container_disk_gb: int = 0
    allowed_cuda: list[str] | None = None
    created_at: float = field(default_factory=time.monotonic)
    ended_at: float | None = None  # terminated or vanished
    terminated: bool = False
    # desiredStatus before RUNNING: (status, seconds) from creation on
    boot: tuple[tuple[str, float], ...] = ()
    forced_status: str | None = None  # set by crash(exited=True) etc.
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    @property
    def alive(self) -> bool:
        return self.ended_at is None

    @property
    def boot_s(self) -> float:
        return sum(seconds for _, seconds in self.boot)

    @property
    def status(self) -> str:
        """desiredStatus as RunPod reports it now."""
        if self.terminated:
            return "TERMINATED"
        if self.forced_status:
            return self.forced_status
        elapsed = time.monotonic() - self.created_at
        for status, seconds in self.boot:
            if elapsed < seconds:
                return status
            elapsed -= seconds
        return "RUNNING"

    @status.setter
    def status(self, value: str) -> None:
        self.forced_status = value

    def billed_seconds(self) -> float:
        return (self.ended_at or time.monotonic()) - self.created_at


class _Spawner:
    """Starts pod processes from one long-lived thread with PR_SET_PDEATHSIG, so a test
    process that dies (crash, kill -9) takes its fake pods with it. The death signal
    follows the *thread* that forked, hence not the short-lived HTTP handler threads."""

    def __init__(self) -> None:
        self._jobs: queue.Queue[tuple[Callable[[], Any], queue.Queue[Any]]] = queue.Queue()
        threading.Thread(target=self._loop, daemon=True, name="fake-pod-spawner").start()

    def _loop(self) -> None:
        while True:
            fn, out = self._jobs.get()
            try:
                out.put(fn())
            except BaseException as exc:  # noqa: BLE001 - handed back to the caller
                out.put(exc)

    def popen(self, argv: list[str], *, cwd: Path, env: dict[str, str], log_path: Path
              ) -> subprocess.Popen[bytes]:
        def start() -> subprocess.Popen[bytes]:
            with open(log_path, "wb") as logf:
                return subprocess.Popen(argv, cwd=cwd, env=env, stdout=logf,
                                        stderr=subprocess.STDOUT, start_new_session=True,
                                        preexec_fn=_die_with_parent)

        out: queue.Queue[Any] = queue.Queue()
        self._jobs.put((start, out))
        result = out.get()
        if isinstance(result, BaseException):
            raise result
        return result


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


_SPAWNER = _Spawner()


class FakeRunPod:
    def __init__(
        self,
        *,
        api_key: str = "rp-test-key",
        prices: dict[str, tuple[float, float]] | None = None,
        capacity: set[tuple[str, str]] | set[str] | None = None,
        run_pods: bool = True,
        workroot: Path | None = None,
        boot_statuses: tuple[tuple[str, float], ...] = (("CREATED", 0.3),),
        keep_terminated: bool = True,
    ) -> None:
        self.api_key = api_key
        # gpu id -> (securePrice, communityPrice)
        self.prices: dict[str, tuple[float, float]] = prices or {
            "NVIDIA RTX A5000": (0.27, 0.16),
            "NVIDIA GeForce RTX 4090": (0.69, 0.34),
            "NVIDIA RTX A6000": (0.49, 0.33),
            "NVIDIA A40": (0.40, 0.35),
        }
        # which (gpu, cloud) or gpu can be had; None = everything
        self.capacity = capacity
        self.run_pods = run_pods
        self._own_root = workroot is None
        self.workroot = workroot or Path(tempfile.mkdtemp(prefix="fake-runpod-"))
        self.pods: dict[str, FakePod] = {}
        self.host_cuda: dict[str, str] = {}  # gpu id -> host CUDA; missing: "12.8"
        self.proxied: list[tuple[str, str, str, bytes]] = []
        self.proxy_status: dict[str, int] = {}
        self.create_attempts: list[tuple[str, str]] = []
        self.terminate_failures = 0
        self.terminate_calls = 0
        self.create_delay_s = 0.0
        self.boot_statuses = tuple(boot_statuses)
        self.keep_terminated = keep_terminated
        self.no_capacity_message = NO_CAPACITY_MSG
        self.queries: list[str] = []
        self.gql_log: list[tuple[float, str, int]] = []  # (monotonic, op, HTTP status)
        self.status_log: list[tuple[str, str]] = []  # (pod id, desiredStatus) per pod query
        self._faults: list[_Rule] = []
        self._proxy_faults: list[_Rule] = []
        self._gql_handlers: list[GraphQLHandler] = []
        self._route_handlers: list[RouteHandler] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------- lifecycle
    @property
    def port(self) -> int:
        assert self._server is not None, "fake not started"
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pod_url_template(self) -> str:
        return self.base_url + "/proxy/{pod_id}-{port}"

    def env(self) -> dict[str, str]:
        """Env vars pointing the SDK + settings at this fake (apply with monkeypatch)."""
        return {
            "RUNPOD_API_BASE_URL": self.base_url,
            "RUNPOD_API_KEY": self.api_key,
            "TUNER_POD_URL_TEMPLATE": self.pod_url_template,
        }

    def start(self) -> FakeRunPod:
        fake = self

        class Handler(_Handler):
            owner = fake

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        for pod in list(self.pods.values()):
            self._kill(pod)
        if self._server:
            self._server.shutdown()
            self._server.server_close()
        if self._own_root:
            shutil.rmtree(self.workroot, ignore_errors=True)

    @classmethod
    @contextmanager
    def running(cls, **kwargs: Any) -> Iterator[FakeRunPod]:
        fake = cls(**kwargs).start()
        try:
            yield fake
        finally:
            fake.close()

    @contextmanager
    def patched_env(self) -> Iterator[None]:
        """Set env() in os.environ for the block (pytest: prefer monkeypatch.setenv)."""
        old = {k: os.environ.get(k) for k in self.env()}
        os.environ.update(self.env())
        try:
            yield
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    # --------------------------------------------------------------- test helpers
    def add_graphql_handler(self, fn: GraphQLHandler) -> None:
        self._gql_handlers.append(fn)

    def add_route_handler(self, fn: RouteHandler) -> None:
        self._route_handlers.append(fn)

    def fail(self, op: str, fault: Fault, *, times: int | None = None,
             seconds: float | None = None) -> None:
        """Answer GraphQL op (GQL_OPS or "any") with `fault`: the next `times` requests
        (default 1), or every request for the next `seconds`."""
        assert op == "any" or op in GQL_OPS, op
        with self._lock:
            self._faults.append(_Rule.make(op, fault, times, seconds))

    def proxy_outage(self, status: int, *, times: int | None = None,
                     seconds: float | None = None, pod_id: str | None = None,
                     path: str | None = None, lost: bool = False) -> None:
        """The pod proxy answers Cloudflare's HTML page for `status` (0: connection reset)
        instead of forwarding, for `times` requests or `seconds` (only for `path` if given).
        lost=True: the request reaches the pod first, only its answer is replaced (a 524
        after the pod acted)."""
        fault = Fault(drop=True, after=lost) if status == 0 else Fault(
            status=status, body=cloudflare_page(status, "proxy.runpod.net"),
            headers=cloudflare_headers(), after=lost)
        rule = _Rule.make(pod_id or "any", fault, times, seconds)
        rule.path = path
        with self._lock:
            self._proxy_faults.append(rule)

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()
            self._proxy_faults.clear()

    def gql_count(self, op: str) -> int:
        return sum(1 for _, o, _ in self.gql_log if o == op)

    def live_pods(self) -> list[str]:
        with self._lock:
            return [p.id for p in self.pods.values() if p.alive]

    def billed_seconds(self, pod_id: str) -> float:
        return self.pods[pod_id].billed_seconds()

    def crash(self, pod_id: str, *, vanish: bool = False, exited: bool = False) -> None:
        """Kill the pod's process. vanish=True: the pod also disappears (host lost).
        exited=True: RunPod reports the pod EXITED (still listed, still billed)."""
        pod = self.pods[pod_id]
        if pod.proc and pod.proc.poll() is None:
            pod.proc.kill()
            pod.proc.wait(10)
        if exited:
            pod.status = "EXITED"
        if vanish:
            with self._lock:
                pod.ended_at = time.monotonic()

    def pod_log(self, pod_id: str) -> str:
        p = self.pods[pod_id].log_path
        return p.read_text(errors="replace") if p and p.exists() else ""

    # ------------------------------------------------------------------ graphql
    def graphql_http(self, query: str, variables: dict[str, Any]
                     ) -> tuple[int, dict[str, str], bytes] | None:
        """One POST /graphql: (status, headers, body), or None to drop the connection."""
        op = _op_of(query)
        fault = _take(self._faults, op, self._lock)
        if fault is not None and not fault.after:
            return self._log(op, fault)
        res = self.handle_graphql(query, variables)
        if fault is not None:  # the work is done (pod created...), the answer is lost
            return self._log(op, fault)
        self.gql_log.append((time.monotonic(), op, 200))
        return 200, {"Content-Type": "application/json"}, json.dumps(res).encode()

    def _log(self, op: str, fault: Fault) -> tuple[int, dict[str, str], bytes] | None:
        self.gql_log.append((time.monotonic(), op, 0 if fault.drop else fault.status))
        return None if fault.drop else (fault.status, dict(fault.headers), fault.body)

    def handle_graphql(self, query: str, variables: dict[str, Any]) -> dict[str, Any]:
        self.queries.append(query)
        try:
            check_balanced(query)
            for handler in (
                self._create,
                self._terminate,
                self._stop,
                self._pods,
                self._pod,
                self._gpu_types,
            ):
                res = handler(query)
                if res is not None:
                    return res
        except GraphQLSyntaxError as exc:
            return _err(str(exc))
        except (KeyError, TypeError, AttributeError) as exc:
            return _err(f"Invalid input: {exc!r}")
        for fn in self._gql_handlers:
            res = fn(query, variables)
            if res is not None:
                return res
        return _err("Cannot query field on type Query/Mutation (unknown to FakeRunPod)")

    def _gpu_types(self, q: str) -> dict[str, Any] | None:
        args = field_args(q, "gpuTypes")
        if args is None:
            return None
        ids = list(self.prices)
        if "input" in args:
            ids = [i for i in ids if i == args["input"].get("id")]
        out = []
        for gid in ids:
            sec, com = self.prices[gid]
            out.append(
                {
                    "id": gid, "displayName": gid.replace("NVIDIA ", ""), "memoryInGb": 24,
                    "maxGpuCount": 8, "manufacturer": "Nvidia", "cudaCores": 0,
                    "secureCloud": True, "communityCloud": True,
                    "securePrice": sec, "communityPrice": com,
                    "oneMonthPrice": None, "threeMonthPrice": None, "oneWeekPrice": None,
                    "communitySpotPrice": None, "secureSpotPrice": None,
                    "lowestPrice": {"minimumBidPrice": None, "uninterruptablePrice": min(sec, com)},
                }
            )
        return {"data": {"gpuTypes": out}}

    def _has_capacity(self, gpu: str, cloud: str) -> bool:
        if self.capacity is None:
            return True
        return gpu in self.capacity or (gpu, cloud) in self.capacity  # type: ignore[operator]

    def _create(self, q: str) -> dict[str, Any] | None:
        args = field_args(q, "podFindAndDeployOnDemand")
        if args is None:
            return None
        inp = args["input"]
        gpu, cloud = inp.get("gpuTypeId", ""), str(inp.get("cloudType", "ALL"))
        self.create_attempts.append((gpu, cloud))
        allowed = inp.get("allowedCudaVersions")
        if allowed is not None:
            bad = [v for v in allowed if v not in RUNPOD_CUDA_VERSIONS]
            if bad:
                return _err(f"Invalid input: allowedCudaVersions has unknown value(s) {bad}")
        if gpu not in self.prices or not self._has_capacity(gpu, cloud):
            return _err(self.no_capacity_message, "podFindAndDeployOnDemand")
        if allowed is not None and self.host_cuda.get(gpu, "12.8") not in allowed:
            return _err(self.no_capacity_message, "podFindAndDeployOnDemand")
        env = {e["key"]: e["value"] for e in inp.get("env") or []}
        pod_id = secrets.token_hex(7)
        sec, com = self.prices[gpu]
        pod = FakePod(
            id=pod_id, name=inp.get("name", ""), image=inp.get("imageName", ""),
            gpu_type=gpu, cloud_type=cloud, price=com if cloud == "COMMUNITY" else sec,
            env=env, docker_args=inp.get("dockerArgs", ""), ports=inp.get("ports", ""),
            port=_free_port(), workdir=self.workroot / pod_id, boot=self.boot_statuses,
            container_disk_gb=int(inp.get("containerDiskInGb") or 0), allowed_cuda=allowed,
        )
        with self._lock:
            self.pods[pod_id] = pod
        if self.run_pods and pod.boot_s > 0:  # the container starts once the pod boots
            timer = threading.Timer(pod.boot_s, self._spawn_if_alive, args=(pod,))
            timer.daemon = True
            timer.start()
        elif self.run_pods:
            self._spawn(pod)
        if self.create_delay_s:
            time.sleep(self.create_delay_s)
        return {
            "data": {
                "podFindAndDeployOnDemand": {
                    "id": pod_id, "imageName": pod.image,
                    "env": [f"{k}={v}" for k, v in env.items()],
                    "machineId": "m-" + pod_id, "machine": {"podHostId": pod_id + "-host"},
                }
            }
        }

    def _terminate(self, q: str) -> dict[str, Any] | None:
        args = field_args(q, "podTerminate")
        if args is None:
            return None
        pod = self.pods.get(args["input"]["podId"])
        self.terminate_calls += 1
        if self.terminate_failures > 0:
            self.terminate_failures -= 1
            return _err(INTERNAL_ERROR_MSG, "podTerminate", code="INTERNAL_SERVER_ERROR")
        if pod is None or not pod.alive:
            return _err(TERMINATE_NOT_FOUND_MSG, "podTerminate")
        self._kill(pod)
        return {"data": {"podTerminate": None}}

    def _stop(self, q: str) -> dict[str, Any] | None:
        args = field_args(q, "podStop")
        if args is None:
            return None
        return _err("podStop is not used by tuner (pods are terminated)")

    def _pod_json(self, pod: FakePod) -> dict[str, Any]:
        return {
            "id": pod.id, "name": pod.name, "imageName": pod.image,
            "desiredStatus": pod.status, "costPerHr": pod.price,
            "dockerArgs": pod.docker_args, "dockerId": None,
            "env": [f"{k}={v}" for k, v in pod.env.items()],
            "gpuCount": 1, "containerDiskInGb": pod.container_disk_gb, "memoryInGb": 31, "vcpuCount": 8,
            "volumeInGb": 0, "volumeMountPath": "/runpod-volume", "podType": "RESERVED",
            "port": None, "ports": pod.ports, "machineId": "m-" + pod.id,
            "lastStatusChange": "Rented by User", "uptimeSeconds": int(pod.billed_seconds()),
            "runtime": {"ports": [{"ip": "100.64.0.1", "isIpPublic": False,
                                   "privatePort": 8000, "publicPort": 8000, "type": "http"}]},
            "machine": {"gpuDisplayName": pod.gpu_type.replace("NVIDIA ", "")},
        }

    def _pods(self, q: str) -> dict[str, Any] | None:
        if field_args(q, "myself") is None or field_args(q, "pods") is None:
            return None
        with self._lock:
            pods = [self._pod_json(p) for p in self.pods.values() if self._listed(p)]
        return {"data": {"myself": {"pods": pods}}}

    def _listed(self, pod: FakePod) -> bool:
        return pod.alive or (pod.terminated and self.keep_terminated)

    def _pod(self, q: str) -> dict[str, Any] | None:
        args = field_args(q, "pod")
        if args is None:
            return None
        pod = self.pods.get(args["input"]["podId"])
        if pod is None or not self._listed(pod):
            return {"data": {"pod": None}}
        record = self._pod_json(pod)
        self.status_log.append((pod.id, record["desiredStatus"]))
        return {"data": {"pod": record}}

    # ----------------------------------------------------------------- processes
    def _spawn_if_alive(self, pod: FakePod) -> None:
        if pod.alive and pod.forced_status is None and self._server is not None:
            self._spawn(pod)

    def _spawn(self, pod: FakePod) -> None:
        pod.workdir.mkdir(parents=True, exist_ok=True)
        cwd = REPO_ROOT
        bundle = pod.env.get("TUNER_TRAIN_B64")
        if bundle:
            cwd = pod.workdir / "code"
            cwd.mkdir()
            with tarfile.open(fileobj=io.BytesIO(base64.b64decode(bundle))) as tar:
                tar.extractall(cwd, filter="data")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RUNPOD_", "TUNER_"))}
        env.pop("PYTHONPATH", None)
        env.update(pod.env)
        env.update(
            TUNER_POD_PORT=str(pod.port), TUNER_WORKDIR=str(pod.workdir / "work"),
            HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
        )
        pod.log_path = pod.workdir / "pod.log"
        pod.proc = _SPAWNER.popen([sys.executable, "-m", "jobs.train"], cwd=cwd, env=env,
                                  log_path=pod.log_path)

    def _kill(self, pod: FakePod) -> None:
        with self._lock:
            if pod.ended_at is None:
                pod.ended_at = time.monotonic()
            pod.terminated = True
        proc = pod.proc
        if proc and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(10)

    # -------------------------------------------------------------------- proxy
    def proxy(self, method: str, path: str, headers: dict[str, str], body: bytes
              ) -> tuple[int, dict[str, str], bytes]:
        m = re.match(r"^/proxy/([0-9a-z]+)-(\d+)(/.*)?$", path)
        if not m:
            return 404, {}, b"not found"
        pod = self.pods.get(m.group(1))
        if pod is None or not pod.alive or m.group(2) != "8000":
            return 404, {"Content-Type": "text/plain"}, b"404 pod not found"
        fault = _take(self._proxy_faults, pod.id, self._lock, path=m.group(3) or "/")
        if fault is not None and not fault.after:
            return (0, {}, b"") if fault.drop else (fault.status, dict(fault.headers), fault.body)
        answer = self._forward(pod, method, m.group(3) or "/", headers, body)
        if fault is not None:  # the pod got the request; its answer is lost on the way back
            return (0, {}, b"") if fault.drop else (fault.status, dict(fault.headers), fault.body)
        return answer

    def _forward(self, pod: FakePod, method: str, path: str, headers: dict[str, str],
                 body: bytes) -> tuple[int, dict[str, str], bytes]:
        if pod.proc is None or pod.proc.poll() is not None:
            return 502, {"Content-Type": "text/plain"}, b"502 Bad Gateway"
        sub = path
        self.proxied.append((pod.id, method, sub, body))
        if sub in self.proxy_status:
            code = self.proxy_status[sub]
            return code, {"Content-Type": "text/html"}, f"<html>error code: {code}</html>".encode()
        conn = http.client.HTTPConnection("127.0.0.1", pod.port, timeout=60)
        fwd = {k: v for k, v in headers.items() if k.lower() not in ("host", "connection")}
        try:
            conn.request(method, path, body=body or None, headers=fwd)
            resp = conn.getresponse()
            data = resp.read()
            rh = {k: v for k, v in resp.getheaders()
                  if k.lower() not in ("transfer-encoding", "connection", "content-length")}
            return resp.status, rh, data
        except OSError:
            return 502, {"Content-Type": "text/plain"}, b"502 Bad Gateway"
        finally:
            conn.close()


class _Handler(BaseHTTPRequestHandler):
    owner: FakeRunPod
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def _send(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _handle(self) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else b""
        url = urlsplit(self.path)
        headers = dict(self.headers.items())
        if url.path.startswith("/proxy/"):
            status, rh, data = self.owner.proxy(self.command, self.path, headers, body)
            if status == 0:  # connection reset: no answer at all
                self.close_connection = True
                return
            self._send(status, rh, data)
            return
        if url.path == "/graphql" and self.command == "POST":
            key = parse_qs(url.query).get("api_key", [""])[0]
            auth = self.headers.get("Authorization", "")
            if auth.startswith("Bearer "):
                key = auth[7:]
            if key != self.owner.api_key:
                self._send(401, {"Content-Type": "application/json"}, b'{"error":"Unauthorized"}')
                return
            payload = json.loads(body or b"{}")
            answer = self.owner.graphql_http(payload.get("query", ""), payload.get("variables") or {})
            if answer is None:  # dropped: close without a response
                self.close_connection = True
                return
            self._send(*answer)
            return
        for fn in self.owner._route_handlers:
            res = fn(self.command, self.path, headers, body)
            if res is not None:
                self._send(*res)
                return
        self._send(404, {"Content-Type": "text/plain"}, b"not found")

    do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = _handle


def _err(message: str, path: str = "", *, code: str | None = None) -> dict[str, Any]:
    err: dict[str, Any] = {"message": message, "path": [path] if path else []}
    if code:
        err["extensions"] = {"code": code}
    return {"errors": [err], "data": {path: None} if path else None}


def _op_of(query: str) -> str:
    """Which of GQL_OPS a query is (the first whose field it calls), else "other"."""
    def has(name: str) -> bool:  # a field call, not parsed (the text may be malformed)
        return re.search(rf"(?<!query )(?<!mutation )\b{name}\s*[({{]", query) is not None

    fields = {"create": "podFindAndDeployOnDemand", "terminate": "podTerminate",
              "stop": "podStop", "gpuTypes": "gpuTypes", "pods": "pods", "pod": "pod"}
    for op, name in fields.items():
        if has(name):
            return op
    return "other"


@dataclass
class _Rule:
    target: str  # GraphQL op / pod id / "any"
    fault: Fault
    remaining: int | None  # None: until `until`
    until: float | None
    path: str | None = None  # proxy rules: only this path

    @classmethod
    def make(cls, target: str, fault: Fault, times: int | None, seconds: float | None) -> _Rule:
        if seconds is not None:
            return cls(target, fault, times, time.monotonic() + seconds)
        return cls(target, fault, 1 if times is None else times, None)

    def live(self) -> bool:
        if self.until is not None and time.monotonic() >= self.until:
            return False
        return self.remaining is None or self.remaining > 0


def _take(rules: list[_Rule], target: str, lock: threading.Lock, *,
          path: str | None = None) -> Fault | None:
    """The first live rule for target (or "any") [and path], consumed once."""
    with lock:
        rules[:] = [r for r in rules if r.live()]
        for rule in rules:
            if rule.target in (target, "any") and rule.path in (None, path):
                if rule.remaining is not None:
                    rule.remaining -= 1
                return rule.fault
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
