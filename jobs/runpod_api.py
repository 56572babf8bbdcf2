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
"""

from __future__ import annotations

import json
import logging
import os
import threading
from typing import Any

import runpod
from runpod import error as rp_error

from jobs.types import GpuChoice, NoCapacityError
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

    # ------------------------------------------------------------------ prices
    def gpu_info(self, gpu_type: str) -> dict[str, Any] | None:
        try:
            return runpod.get_gpu(gql_escape(gpu_type), api_key=self._key)
        except (ValueError, rp_error.QueryError) as exc:
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
                try:
                    pod = runpod.create_pod(
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
                except (rp_error.QueryError, ValueError) as exc:
                    # str(exc) is the server message only; exc.query holds secrets.
                    tried.append(f"{gpu}/{cloud}: {str(exc)[:160]}")
                    log.info("no capacity for %s/%s", gpu, cloud)
                    continue
                pod_id = str(pod["id"])
                price, _live = self.gpu_price(gpu, cloud)
                return pod_id, GpuChoice(gpu, cloud.upper(), price or 0.0)
        raise NoCapacityError("no GPU available; tried " + "; ".join(tried or ["nothing"]))

    def get_pod(self, pod_id: str) -> dict[str, Any] | None:
        try:
            pod = runpod.get_pod(gql_escape(pod_id), api_key=self._key)
        except rp_error.QueryError as exc:
            if "not found" in str(exc).lower():
                return None
            raise
        return pod or None

    def list_pods(self) -> list[dict[str, Any]]:
        return list(runpod.get_pods(api_key=self._key) or [])

    def terminate_pod(self, pod_id: str) -> None:
        """Terminate; a pod that is already gone is fine."""
        try:
            runpod.terminate_pod(gql_escape(pod_id))
        except rp_error.QueryError:
            if self.get_pod(pod_id) is None:
                return
            raise

    def pod_url(self, pod_id: str, port: int = 8000) -> str:
        return self.settings.tuner_pod_url_template.format(pod_id=pod_id, port=port)


def pod_is_alive(pod: dict[str, Any] | None) -> bool:
    return bool(pod) and str(pod.get("desiredStatus", "RUNNING")).upper() == "RUNNING"
