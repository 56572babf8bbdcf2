"""Failure answers FakeRunPod can give, each as the real service sends it (with sources).

GraphQL API (api.runpod.io/graphql, behind Cloudflare):
- `rate_limited()`: HTTP 429 + integer Retry-After + problem+json body
  {"title": "Too Many Requests", "status": 429, "detail": "rate limit exceeded for the
  minute window"} (runpod/docs api-reference-v2/openapi.json, components.responses.
  TooManyRequestsError, same host). No "errors", no "data": runpod 1.12.0's ctl_commands
  then fail with KeyError('data').
- `cloudflare_rate_limited()`: Cloudflare's own 429 page "error code: 1015" (text, not
  JSON; dify issue 19355): JSONDecodeError in the SDK.
- `html_error(502|503|504|520|522|524...)`: Cloudflare's HTML error page
  ("<host> | 524: A timeout occurred", "Error code 524", Ray ID; page structure as served
  by Cloudflare, e.g. gist cbarley10/61cb71de0327d52a63e0c6955bd13423):
  requests.exceptions.JSONDecodeError in the SDK (runpod-python issue 36).
- `graphql_error(...)`: HTTP 200 with {"errors": [...], "data": {...: null}}; default
  RunPod's internal error "Something went wrong. Please try again later or contact
  support." with extensions.code INTERNAL_SERVER_ERROR (runpod-python issue 239):
  QueryError(message) in the SDK.
- `dropped()`: the connection closes without an answer (reset, or a timeout on the
  client's side): requests.ConnectionError in the SDK.
- `lost(fault)`: RunPod does the work (e.g. creates the pod, which then bills) and only
  then answers with `fault`: RunPod's create-then-fail-the-readback bug
  (transformerlab-app PR 2305) or an edge error/timeout after the origin acted.

Pod proxy (https://<pod>-<port>.proxy.runpod.net: User -> Cloudflare -> RunPod load
balancer -> pod, runpod/docs pods/configuration/expose-ports.mdx): the same Cloudflare
pages, 520 (unknown origin error), 522 (connect timeout), 524 (origin silent > 100 s).
The fake answers 524 at once instead of after 100 s (tests cannot wait that long).

No-capacity messages RunPod really sends for podFindAndDeployOnDemand: see NO_CAPACITY_*.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field, replace

# mlabonne/llm-autoeval issue 3 (QueryError text); RunPod REST v2 400 detail, same text.
NO_CAPACITY_MSG = (
    "There are no longer any instances available with the requested specifications. "
    "Please refresh and try again."
)
# Seen by SDK users when the disk asked for does not fit (several public clients match it).
NO_CAPACITY_DISK_MSG = "There are no longer any instances available with enough disk space."
# runpodctl / REST users, also on GraphQL creates when the chosen machine filled up.
NO_CAPACITY_MACHINE_MSG = (
    "This machine does not have the resources to deploy your pod. Please try a different machine"
)
NO_CAPACITY_NONE_MSG = "There are no instances currently available"
NO_CAPACITY_MESSAGES = (NO_CAPACITY_MSG, NO_CAPACITY_DISK_MSG, NO_CAPACITY_MACHINE_MSG,
                        NO_CAPACITY_NONE_MSG)
# runpod-python issue 239 (with extensions {"code": "INTERNAL_SERVER_ERROR"}).
INTERNAL_ERROR_MSG = "Something went wrong. Please try again later or contact support."
# dstack src/dstack/_internal/core/backends/runpod/compute.py matches this exact text.
TERMINATE_NOT_FOUND_MSG = "pod not found to terminate"

CLOUDFLARE_TITLES = {
    500: "Internal server error", 502: "Bad gateway", 503: "Service unavailable",
    504: "Gateway time-out", 520: "Web server is returning an unknown error",
    521: "Web server is down", 522: "Connection timed out", 523: "Origin is unreachable",
    524: "A timeout occurred", 525: "SSL handshake failed", 526: "Invalid SSL certificate",
}


@dataclass(frozen=True)
class Fault:
    """One answer in place of the normal one. drop: no answer at all. after: the operation
    happens first (the pod exists, bills), then this answer replaces the real one."""

    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    drop: bool = False
    after: bool = False


def cloudflare_page(status: int, host: str) -> bytes:
    title = CLOUDFLARE_TITLES.get(status, "Error")
    ray = secrets.token_hex(8)
    return (
        '<!DOCTYPE html>\n<html class="no-js" lang="en-US">\n<head>\n'
        f"<title>{host} | {status}: {title}</title>\n"
        '<meta charset="UTF-8" />\n<meta name="robots" content="noindex, nofollow" />\n'
        '<link rel="stylesheet" id="cf_styles-css" href="/cdn-cgi/styles/main.css" />\n'
        '</head>\n<body>\n<div id="cf-wrapper">\n<div id="cf-error-details">\n'
        f'<h1><span class="inline-block">{title}</span>'
        f'<span class="code-label">Error code {status}</span></h1>\n'
        f"<p>Visit cloudflare.com for more information.</p>\n"
        f'<p class="cf-footer-item">Cloudflare Ray ID: <strong>{ray}</strong></p>\n'
        "</div>\n</div>\n</body>\n</html>\n"
    ).encode()


def cloudflare_headers() -> dict[str, str]:
    return {"Content-Type": "text/html; charset=UTF-8", "Server": "cloudflare",
            "CF-RAY": secrets.token_hex(8) + "-AMS"}


def html_error(status: int = 502, host: str = "api.runpod.io") -> Fault:
    return Fault(status=status, body=cloudflare_page(status, host), headers=cloudflare_headers())


def rate_limited(retry_after: int = 1) -> Fault:
    body = {"title": "Too Many Requests", "status": 429,
            "detail": "rate limit exceeded for the minute window"}
    return Fault(status=429, body=json.dumps(body).encode(),
                 headers={"Content-Type": "application/problem+json",
                          "Retry-After": str(retry_after)})


def cloudflare_rate_limited(retry_after: int = 1) -> Fault:
    return Fault(status=429, body=b"error code: 1015",
                 headers={"Content-Type": "text/plain; charset=UTF-8", "Server": "cloudflare",
                          "Retry-After": str(retry_after)})


def graphql_error(message: str = INTERNAL_ERROR_MSG, *, code: str | None = "INTERNAL_SERVER_ERROR",
                  path: str = "") -> Fault:
    err: dict[str, object] = {"message": message, "path": [path] if path else []}
    if code:
        err["extensions"] = {"code": code}
    body = {"errors": [err], "data": {path: None} if path else None}
    return Fault(status=200, body=json.dumps(body).encode(),
                 headers={"Content-Type": "application/json"})


def dropped() -> Fault:
    return Fault(drop=True)


def lost(fault: Fault) -> Fault:
    return replace(fault, after=True)
