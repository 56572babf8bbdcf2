"""Typed RunPod API failures and bounded retries around the runpod==1.12.0 SDK.

How failures come out of the SDK (runpod/api/graphql.py `run_graphql_query`, which does
`requests.post(..., timeout=30)`, then 401 -> AuthenticationError, then `response.json()`,
then `"errors"` -> QueryError(errors[0].message, query); callers then read
`raw["data"][...]` in runpod/api/ctl_commands.py):
- HTTP 429 with RunPod's problem+json body (`{"title": "Too Many Requests", "status": 429,
  "detail": ...}`, runpod/docs api-reference-v2/openapi.json TooManyRequestsError) has no
  "errors" and no "data": KeyError('data').
- An HTML page (Cloudflare 5xx, rate-limit 1015 page): requests.exceptions.JSONDecodeError
  (a ValueError and a RequestException; runpod/runpod-python issue 36).
- GraphQL errors in a 200: QueryError(message), e.g. "Something went wrong. Please try
  again later or contact support." with extensions.code INTERNAL_SERVER_ERROR
  (runpod/runpod-python issue 239).
- Connection reset / refused, read timeout: requests.ConnectionError / requests.Timeout.
- A GPU id RunPod does not list: ValueError("No GPU found with the specified ID ...")
  from create_pod's get_gpu() pre-check.

The SDK throws the response away, so Retry-After and the status code would be lost. We
stand a recording wrapper in for the `requests` name inside runpod.api.graphql: same
calls, same results, but each thread's last response is kept to classify the failure.

QueryError.query holds the whole mutation (env secrets included): errors raised from here
carry only the server's short message and are raised outside the except block, so the
SDK exception is not even attached as __context__.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar

import requests
from runpod import error as rp_error
from runpod.api import graphql as rp_graphql

from jobs.values import (
    NoCapacityError,
    RunPodAuthError,
    RunPodError,
    RunPodRequestError,
    RunPodTransientError,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

# RunPod's real "no GPU for you" answers to podFindAndDeployOnDemand (lower case):
# mlabonne/llm-autoeval issue 3 (QueryError text), RunPod REST v2 400 detail (same text),
# and the disk / machine variants reported by SDK users (see tests/fakes/runpod_fake.py).
NO_CAPACITY_MARKERS = (
    "no longer any instances available",
    "no instances currently available",
    "does not have the resources to deploy your pod",
    "no resources to deploy for this request",
)
# GraphQL error messages that mean "our side broke, try again" (runpod-python issue 239).
TRANSIENT_MARKERS = (
    "something went wrong",
    "try again later",
    "internal server error",
    "too many requests",
    "rate limit",
    "timed out",
    "timeout",
    "temporarily unavailable",
    "service unavailable",
)
_MAX_MESSAGE = 200


# ----------------------------------------------------------------- response memory
class _LastResponse(threading.local):
    response: requests.Response | None = None


_LAST = _LastResponse()


class _RecordingRequests:
    """Stands in for the `requests` module inside runpod.api.graphql: delegates every
    attribute, and remembers the response of this thread's latest `post`."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def post(self, *args: Any, **kwargs: Any) -> requests.Response:
        _LAST.response = None
        resp = self._real.post(*args, **kwargs)
        _LAST.response = resp
        return resp

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def install_response_memory() -> bool:
    """Idempotent. False if the SDK no longer reaches requests this way (then failures are
    still classified from the exceptions alone, without status or Retry-After)."""
    current = getattr(rp_graphql, "requests", None)
    if isinstance(current, _RecordingRequests):
        return True
    if current is None or not hasattr(current, "post"):
        return False
    rp_graphql.requests = _RecordingRequests(current)  # type: ignore[attr-defined]
    return True


install_response_memory()


# ------------------------------------------------------------------ classification
def retry_after_seconds(value: str | None) -> float | None:
    """Retry-After as seconds: an integer (RunPod, api-reference-v2) or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _body(resp: requests.Response) -> Any:
    try:
        return resp.json()
    except ValueError:
        return None


def _is_html(resp: requests.Response) -> bool:
    ctype = resp.headers.get("Content-Type", "").lower()
    return "html" in ctype or resp.text[:200].lstrip().lower().startswith(("<!doctype", "<html"))


def _short(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 1] + "…"


def _gql_code(resp: requests.Response | None) -> str:
    body = _body(resp) if resp is not None else None
    try:
        return str(body["errors"][0]["extensions"]["code"]).upper()  # type: ignore[index]
    except (KeyError, IndexError, TypeError):
        return ""


def _is_no_capacity(message: str) -> bool:
    low = message.lower()
    return any(m in low for m in NO_CAPACITY_MARKERS)


def _http(resp: requests.Response, what: str) -> RunPodError | None:
    status = resp.status_code
    if status in (401, 403):
        return RunPodAuthError(f"{what}: RunPod refused the API key (HTTP {status}); "
                               "check RUNPOD_API_KEY")
    if status == 429:
        wait = retry_after_seconds(resp.headers.get("Retry-After"))
        return RunPodTransientError(f"{what}: RunPod rate limit (HTTP 429)", retry_after=wait,
                                    status=status)
    if status >= 500 or status in (408, 425):
        page = " (HTML error page)" if _is_html(resp) else ""
        return RunPodTransientError(f"{what}: RunPod API answered HTTP {status}{page}",
                                    status=status)
    return None


def _query_error(exc: rp_error.QueryError, resp: requests.Response | None, what: str) -> RunPodError:
    msg = _short(str(exc))
    low = msg.lower()
    if _gql_code(resp) == "INTERNAL_SERVER_ERROR" or any(m in low for m in TRANSIENT_MARKERS):
        return RunPodTransientError(f"{what}: RunPod internal error: {msg}")
    return RunPodRequestError(f"{what}: RunPod refused the request: {msg}")


def _no_graphql_data(resp: requests.Response, what: str) -> RunPodError:
    """200..499 JSON that is no GraphQL answer (no "data"): e.g. {"error": "..."}."""
    if 400 <= resp.status_code < 500:
        return RunPodRequestError(f"{what}: RunPod API answered HTTP {resp.status_code}")
    return RunPodTransientError(f"{what}: RunPod API answered HTTP {resp.status_code} "
                                "without GraphQL data", status=resp.status_code)


def classify(exc: BaseException, resp: requests.Response | None, what: str) -> RunPodError | None:
    """The typed error for an SDK failure, or None when it is not a RunPod API failure
    (a bug of ours: re-raise it unchanged)."""
    if isinstance(exc, RunPodError):
        return exc
    if isinstance(exc, rp_error.AuthenticationError):
        return RunPodAuthError(f"{what}: {_short(str(exc))}")
    if isinstance(exc, rp_error.QueryError) and _is_no_capacity(str(exc)):
        # whatever the status: a capacity refusal says no pod was made (REST v2 sends it
        # as 400, runpodctl users report it with a 500)
        return NoCapacityError(_short(str(exc)))
    if resp is not None and (typed := _http(resp, what)) is not None:
        return typed
    if isinstance(exc, rp_error.QueryError):
        return _query_error(exc, resp, what)
    if isinstance(exc, requests.exceptions.JSONDecodeError):
        status = resp.status_code if resp is not None else 0
        if 400 <= status < 500:  # e.g. a wrong RUNPOD_API_BASE_URL: retrying will not help
            return RunPodRequestError(f"{what}: RunPod API answered HTTP {status} (not JSON)")
        return RunPodTransientError(f"{what}: RunPod API answered HTTP {status or '?'} with a "
                                    "non-JSON body (HTML error page)")
    if isinstance(exc, requests.RequestException):
        return RunPodTransientError(f"{what}: RunPod API unreachable ({type(exc).__name__})")
    if isinstance(exc, (KeyError, TypeError)) and resp is not None:
        body = _body(resp)
        if not isinstance(body, dict) or body.get("data") is None:
            return _no_graphql_data(resp, what)
        return None
    if type(exc) is ValueError and "no gpu found" in str(exc).lower():
        return NoCapacityError("RunPod does not offer this GPU type")
    if type(exc) is ValueError:
        return RunPodRequestError(f"{what}: {_short(str(exc))}")
    return None


# ------------------------------------------------------------------------ calling
@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5
    base_s: float = 1.0
    max_s: float = 60.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Retry-After when RunPod sent one, else jittered exponential; both capped."""
        if retry_after is not None:
            return min(retry_after, self.max_s)
        raw = min(self.base_s * (2 ** attempt), self.max_s)
        return raw * (0.5 + random.random() / 2)


def sdk_call(fn: Callable[[], T], what: str) -> T:
    """One SDK call; a RunPod API failure comes out as a RunPodError subclass."""
    _LAST.response = None
    typed: RunPodError | None = None
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001 - classified below, re-raised if not RunPod's
        typed = classify(exc, _LAST.response, what)
        if typed is None:
            raise
    else:
        # terminate_pod never reads the answer: a 429/5xx JSON body "succeeds" in the SDK
        resp = _LAST.response
        if resp is None or resp.status_code < 400:
            return result
        typed = _http(resp, what) or RunPodRequestError(
            f"{what}: RunPod API answered HTTP {resp.status_code}")
    raise typed  # outside the except block: the SDK exception (exc.query) is not chained


def with_retries(fn: Callable[[], T], policy: RetryPolicy, what: str, *,
                 sleep: Callable[[float], None] = time.sleep) -> T:
    """sdk_call, retrying transient failures with bounded backoff (honours Retry-After)."""
    last: RunPodTransientError | None = None
    for attempt in range(max(1, policy.attempts)):
        if last is not None:
            sleep(policy.delay(attempt - 1, last.retry_after))
        try:
            return sdk_call(fn, what)
        except RunPodTransientError as err:
            log.info("%s (try %d of %d)", err, attempt + 1, policy.attempts)
            last = err
    assert last is not None
    raise RunPodTransientError(f"{last} - still failing after {policy.attempts} tries",
                               retry_after=last.retry_after, status=last.status)
