"""HTTP client for the pod control server (contract: jobs/podproto.py).

The bearer token travels only in the Authorization header; it never appears in
exception messages or logs (URLs carry no secrets).

Pod traffic goes User -> Cloudflare -> RunPod load balancer -> pod (runpod/docs
pods/configuration/expose-ports.mdx), so besides the proxy's 404 (no such pod/port yet)
and 502/503/504, Cloudflare's own 52x codes mean "not reachable right now": 520 unknown
origin error, 521 down, 522 connect timeout, 523 unreachable, 524 no answer within 100 s,
525/526 TLS, 530 (https://developers.cloudflare.com/support/troubleshooting/
http-status-codes/cloudflare-5xx-errors/). Their bodies are HTML pages, as is any other
page an edge may serve in place of our JSON: a non-JSON answer is "unreachable" too.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx

from jobs.podproto import JobRequest, Progress, Results

# Proxy answers meaning "the pod's server is not (yet / any more) reachable".
UNREACHABLE_STATUS = frozenset({404, 502, 503, 504, 520, 521, 522, 523, 524, 525, 526, 530})


class PodError(RuntimeError):
    """The pod answered with an unexpected HTTP status."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class PodUnreachable(PodError):
    """Connection failed or the proxy could not reach the pod's server."""


class PodGone(PodUnreachable):
    """RunPod says the pod is gone or no longer running (exited, terminated)."""


class PodClient:
    def __init__(self, base_url: str, token: str, *, timeout_s: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout_s,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> PodClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, *, json: object | None = None) -> httpx.Response:
        try:
            resp = self._http.request(method, path, json=json)
        except httpx.HTTPError as exc:
            # Only the exception type: httpx messages are safe, but keep them short.
            raise PodUnreachable(f"{method} {path}: {type(exc).__name__}") from None
        if resp.status_code in UNREACHABLE_STATUS:
            raise PodUnreachable(f"{method} {path}: HTTP {resp.status_code}", resp.status_code)
        if resp.status_code >= 400:
            # an edge's HTML error page is noise in a Slack message: the status says enough
            html = "html" in resp.headers.get("content-type", "").lower()
            detail = "" if html else resp.text[:200].replace("\n", " ")
            raise PodError(f"{method} {path}: HTTP {resp.status_code} {detail}".rstrip(),
                           resp.status_code)
        return resp

    def health(self) -> bool:
        try:
            return bool(self._request("GET", "/health").json().get("ok"))
        except (PodError, ValueError):
            return False

    def wait_ready(
        self, timeout: float, interval: float = 1.0, *,
        gone: Callable[[], str | None] | None = None, gone_every_s: float = 10.0,
    ) -> None:
        """Wait for /health. `gone()` (checked on the first miss, then every gone_every_s)
        returns why the pod can never answer (exited, terminated) to stop waiting at once."""
        start = time.monotonic()
        deadline = start + timeout
        next_gone = start
        while True:
            if self.health():
                return
            now = time.monotonic()
            if gone is not None and now >= next_gone:
                next_gone = now + gone_every_s
                reason = gone()
                if reason:
                    raise PodGone(reason)
            if now >= deadline:
                raise PodUnreachable(f"pod control server not ready after {timeout:.0f}s")
            time.sleep(min(interval, max(0.0, deadline - time.monotonic())))

    def _json(self, method: str, path: str, *, json: object | None = None) -> object:
        resp = self._request(method, path, json=json)
        try:
            return resp.json()
        except ValueError:  # an edge's HTML page with a 2xx status, or a cut-off body
            raise PodUnreachable(f"{method} {path}: HTTP {resp.status_code} answer is not JSON",
                                 resp.status_code) from None

    def submit(self, job: JobRequest) -> Progress:
        """Idempotent on the pod (same job_id -> 200), so safe to send again."""
        return Progress.model_validate(self._json("POST", "/job", json=job.model_dump(mode="json")))

    def progress(self) -> Progress:
        return Progress.model_validate(self._json("GET", "/progress"))

    def stop(self) -> Progress:
        return Progress.model_validate(self._json("POST", "/stop"))

    def results(self) -> Results:
        return Results.model_validate(self._json("GET", "/results"))

    def artifact(self, name: str) -> bytes:
        return self._request("GET", f"/artifacts/{name}").content
