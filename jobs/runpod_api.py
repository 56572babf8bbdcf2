"""RunPod pods over the real `runpod==1.12.0` SDK.

Facts this wrapper handles:
- The SDK's pod calls are synchronous GraphQL (`requests.post`); async callers must run
  them in a thread (`asyncio.to_thread`).
- The SDK reads RUNPOD_API_BASE_URL from the environment on every call ({base}/graphql,
  key as `Authorization: Bearer`), and the API key from the module global `runpod.api_key`
  (create_pod/terminate_pod take no api_key argument), so we set that global here.
- The SDK pastes every string value UNESCAPED into the GraphQL text, so every value we
  pass (name, image, env keys/values, docker args) goes through `gql_escape` first.
- `create_pod` raises `runpod.error.QueryError` when no GPU of that type/cloud is free.
- `create_pod(allowed_cuda_versions=[...])` (runpod 1.12.0 ctl_commands.create_pod ->
  mutations/pods.py) adds `allowedCudaVersions: ["12.8", ...]` to GPU pods only, each
  value quoted but unescaped; RunPod places the pod only on a host whose driver reports
  one of them, and answers "no instances available" otherwise.
- `runpod.error.QueryError.query` holds the whole mutation (including env secrets): it is
  never logged or re-raised from here.
- Every SDK call goes through jobs.runpod_retry: failures come out typed (transient / no
  capacity / auth / request, jobs.values) and transient ones are retried with bounded
  backoff (429 waits its Retry-After). Only RunPod's real no-capacity answers move
  create_pod_with_fallback to the next GPU/cloud.
- A create whose answer is lost (5xx, HTML page, reset, timeout) may still have made the
  pod (RunPod creates, then fails reading it back: transformerlab-app PR 2305), so before
  any new try the pod is looked up by name: it is adopted, never created twice. If even
  the lookup fails, the create gives up: a pod made meanwhile has no run and the reaper
  (jobs/reaper.py) terminates it.
- Prices survive API trouble: retried briefly, then the list price (is_live=False).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import runpod

from jobs import podstatus
from jobs.podproto import TOKEN_ENV
from jobs.runpod_retry import RetryPolicy, sdk_call, with_retries
from jobs.values import (
    GpuChoice,
    NoCapacityError,
    RunPodError,
    RunPodRequestError,
    RunPodTransientError,
)
from storage.settings import Settings

log = logging.getLogger(__name__)

POD_NAME_PREFIX = "tuner-"
POD_PORTS = "8000/http"
POD_CONTAINER_DISK_GB = 40

# USD/hour used only when the API returns no price (LaunchEstimate.price_is_live=False).
FALLBACK_PRICES: dict[str, float] = {
    "NVIDIA RTX A5000": 0.27,
    "NVIDIA GeForce RTX 4090": 0.69,
    "NVIDIA RTX A6000": 0.49,
    "NVIDIA A40": 0.40,
    "NVIDIA L40S": 0.86,
    "NVIDIA A100 80GB PCIe": 1.64,
    "NVIDIA A100-SXM4-80GB": 1.74,
    "NVIDIA H100 PCIe": 2.39,
    "NVIDIA H100 80GB HBM3": 2.99,
}

_KEY_LOCK = threading.Lock()
# The launch card waits for at most PRICE_ATTEMPTS lookups (each wait <= PRICE_MAX_WAIT_S,
# even if Retry-After asks for more), then shows the list price.
PRICE_ATTEMPTS = 3
PRICE_MAX_WAIT_S = 5.0
PRICE_OUTAGE_S = 60.0
T = TypeVar("T")


def gql_escape(value: object) -> str:
    """Escape a value for the inside of a GraphQL "string" (quotes, backslashes, controls)."""
    return json.dumps(str(value), ensure_ascii=False)[1:-1]


class RunPodAPI:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        key = settings.runpod_api_key.get_secret_value() if settings.runpod_api_key else None
        self._key = key
        with _KEY_LOCK:
            if key:
                runpod.api_key = key
        # The SDK reads this env var itself; settings may have it from a .env file.
        if settings.runpod_api_base_url:
            os.environ.setdefault("RUNPOD_API_BASE_URL", settings.runpod_api_base_url)
        self.policy = RetryPolicy(
            attempts=settings.tuner_runpod_attempts, base_s=settings.tuner_runpod_backoff_s,
            max_s=settings.tuner_runpod_backoff_max_s,
        )
        self._price_outage_until = 0.0

    def _call(self, fn: Callable[[], T], what: str, *, attempts: int | None = None) -> T:
        policy = self.policy
        if attempts is not None:
            policy = RetryPolicy(attempts=attempts, base_s=policy.base_s, max_s=policy.max_s)
        return with_retries(fn, policy, what)

    # ------------------------------------------------------------------ prices
    def gpu_info(self, gpu_type: str) -> dict[str, Any] | None:
        """The GPU type's record, or None (unknown type, or RunPod unavailable after a few
        quick retries: prices then fall back to the list price). After such an outage the
        next PRICE_OUTAGE_S of lookups answer None at once, so a launch card listing
        several GPU types waits for one round of retries, not one per type."""
        if time.monotonic() < self._price_outage_until:
            return None
        policy = RetryPolicy(attempts=min(PRICE_ATTEMPTS, self.policy.attempts),
                             base_s=self.policy.base_s, max_s=min(self.policy.max_s, PRICE_MAX_WAIT_S))
        try:
            return with_retries(lambda: runpod.get_gpu(gql_escape(gpu_type), api_key=self._key),
                                policy, "RunPod GPU price")
        except RunPodTransientError as exc:
            self._price_outage_until = time.monotonic() + PRICE_OUTAGE_S
            log.warning("no live price for %s, using the list price: %s", gpu_type, exc)
        except RunPodError as exc:
            log.info("no GPU info for %s: %s", gpu_type, exc)
        return None

    @staticmethod
    def _price_of(info: dict[str, Any], cloud_type: str) -> float | None:
        order = ["securePrice", "communityPrice"]
        if cloud_type.upper() == "COMMUNITY":
            order.reverse()
        for k in order:
            v = info.get(k)
            if isinstance(v, (int, float)) and v > 0:
                return float(v)
        lowest = info.get("lowestPrice") or {}
        v = lowest.get("uninterruptablePrice")
        return float(v) if isinstance(v, (int, float)) and v > 0 else None

    def gpu_price(self, gpu_type: str, cloud_type: str = "SECURE") -> tuple[float | None, bool]:
        """(usd_per_hour, is_live). Falls back to FALLBACK_PRICES (not live)."""
        info = self.gpu_info(gpu_type)
        live = self._price_of(info, cloud_type) if info else None
        if live is not None:
            return live, True
        return FALLBACK_PRICES.get(gpu_type), False

    def gpu_prices(
        self, gpu_types: list[str] | None = None, cloud_type: str = "SECURE"
    ) -> dict[str, float]:
        """Live prices (USD/hour) for the given (default: configured) GPU types that have one."""
        out: dict[str, float] = {}
        for gpu in gpu_types if gpu_types is not None else self.settings.gpu_types:
            info = self.gpu_info(gpu)
            price = self._price_of(info, cloud_type) if info else None
            if price is not None:
                out[gpu] = price
        return out

    # -------------------------------------------------------------------- pods
    def create_pod_with_fallback(
        self,
        name: str,
        image: str,
        env: dict[str, str],
        gpu_types: list[str] | None = None,
        cloud_types: list[str] | None = None,
        *,
        docker_args: str = "",
        container_disk_gb: int = POD_CONTAINER_DISK_GB,
        allowed_cuda_versions: list[str] | None = None,
    ) -> tuple[str, GpuChoice]:
        """Try each (gpu, cloud) in order; the first that deploys wins. The pod only lands
        on a host whose CUDA is in `allowed_cuda_versions` (None: any)."""
        cuda = [gql_escape(v) for v in allowed_cuda_versions] if allowed_cuda_versions else None
        if not name.startswith(POD_NAME_PREFIX):
            name = POD_NAME_PREFIX + name
        gpus = gpu_types if gpu_types is not None else self.settings.gpu_types
        clouds = cloud_types if cloud_types is not None else self.settings.cloud_types
        safe_env = {gql_escape(k): gql_escape(v) for k, v in env.items()}
        tried: list[str] = []
        for gpu in gpus:
            for cloud in clouds:
                def create(gpu: str = gpu, cloud: str = cloud) -> dict[str, Any]:
                    return runpod.create_pod(
                        name=gql_escape(name),
                        image_name=gql_escape(image),
                        gpu_type_id=gql_escape(gpu),
                        cloud_type=cloud.upper(),
                        gpu_count=1,
                        volume_in_gb=0,
                        container_disk_in_gb=int(container_disk_gb),
                        ports=POD_PORTS,
                        env=safe_env,
                        docker_args=gql_escape(docker_args),
                        start_ssh=False,
                        allowed_cuda_versions=cuda,
                    )

                try:
                    pod_id = self._create_or_adopt(name, env, create)
                except NoCapacityError as exc:
                    # str(exc) is the server message only; exc.query holds secrets.
                    tried.append(f"{gpu}/{cloud}: {str(exc)[:160]}")
                    log.info("no capacity for %s/%s", gpu, cloud)
                    continue
                price, _live = self.gpu_price(gpu, cloud)
                return pod_id, GpuChoice(gpu, cloud.upper(), price or 0.0)
        raise NoCapacityError("no GPU available; tried " + "; ".join(tried or ["nothing"]))

    def _create_or_adopt(self, name: str, env: dict[str, str],
                         create: Callable[[], dict[str, Any]]) -> str:
        """One (gpu, cloud): create, retrying transient failures; after each failure whose
        request may have created the pod, adopt the pod by name instead of creating again.
        NoCapacityError: this candidate has none. Other RunPodErrors: give up."""
        attempts = max(1, self.policy.attempts)
        for attempt in range(attempts):
            try:
                return str(sdk_call(create, "RunPod create pod")["id"])
            except RunPodTransientError as exc:
                err = exc
            log.warning("%s; looking for pod %s before trying again", err, name)
            found = self._adopt(name, env, err)
            if found is None and attempt + 1 < attempts:
                time.sleep(self.policy.delay(attempt, err.retry_after))
                found = self._adopt(name, env, err)  # a pod can show up in the list late
            if found is not None:
                return found
        raise RunPodTransientError(
            f"{err} - still failing after {attempts} tries; no pod named {name} exists",
            retry_after=err.retry_after, status=err.status,
        )

    def _adopt(self, name: str, env: dict[str, str], cause: RunPodTransientError) -> str | None:
        try:
            found = self.find_pod(name, env)
        except RunPodError as exc:
            raise RunPodTransientError(
                f"{cause}; and whether it made a pod is unknown ({exc}): not trying again "
                "(a pod it made has no run, so the reaper removes it)"
            ) from None
        if found is not None:
            log.warning("adopted pod %s (%s): its create answer was lost", found, name)
        return found

    def find_pod(self, name: str, env: dict[str, str] | None = None) -> str | None:
        """Id of the alive pod with this name (and, when RunPod lists env, this pod token)."""
        for pod in self.list_pods():
            if pod.get("name") == name and podstatus.pod_is_alive(pod) and _env_matches(pod, env):
                return str(pod["id"])
        return None

    def get_pod(self, pod_id: str, *, attempts: int | None = None) -> dict[str, Any] | None:
        """The pod, or None once it is gone (not found, or TERMINATED)."""
        try:
            pod = self._call(lambda: runpod.get_pod(gql_escape(pod_id), api_key=self._key),
                             "RunPod get pod", attempts=attempts)
        except RunPodRequestError as exc:
            if "not found" in str(exc).lower():
                return None
            raise
        return None if podstatus.pod_is_deleted(pod) else pod

    def list_pods(self) -> list[dict[str, Any]]:
        """Our account's pods that still exist (TERMINATED ones are left out)."""
        pods = self._call(lambda: runpod.get_pods(api_key=self._key), "RunPod list pods")
        return [p for p in pods or [] if not podstatus.pod_is_deleted(p)]

    def terminate_pod(self, pod_id: str) -> None:
        """Terminate (transient failures retried); a pod that is already gone is fine."""
        try:
            self._call(lambda: runpod.terminate_pod(gql_escape(pod_id)), "RunPod terminate pod")
        except RunPodError:
            if self.get_pod(pod_id) is None:
                return
            raise

    def pod_url(self, pod_id: str, port: int = 8000) -> str:
        return self.settings.tuner_pod_url_template.format(pod_id=pod_id, port=port)


def pod_is_alive(pod: dict[str, Any] | None) -> bool:
    """Exists and is not terminal: booting (CREATED, RESTARTING...) counts (jobs.podstatus)."""
    return podstatus.pod_is_alive(pod)


def _env_matches(pod: dict[str, Any], env: dict[str, str] | None) -> bool:
    """False only when RunPod lists the pod's env (as "KEY=value" strings, runpod/docs
    sdks/graphql/manage-pods.mdx) and its pod token differs from ours: another attempt's
    pod with the same name, whose server would refuse our token. Anything we cannot
    tell apart counts as ours (a second pod is the costlier mistake)."""
    want = (env or {}).get(TOKEN_ENV)
    listed = pod.get("env")
    if want is None or not isinstance(listed, list):
        return True
    have = dict(str(item).split("=", 1) for item in listed if "=" in str(item))
    return have.get(TOKEN_ENV, want) == want
