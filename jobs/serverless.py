"""RunPod serverless client: templates/endpoints over the runpod SDK (GraphQL),
jobs over the serverless REST API (RUNPOD_ENDPOINT_BASE_URL, default https://api.runpod.ai/v2).

runpod==1.12.0 pastes values into GraphQL unescaped, so every string passed through it
is escaped here first. Calls are synchronous; callers run them off the event loop.

Job statuses (runpod/docs serverless/endpoints/job-states.mdx): IN_QUEUE, IN_PROGRESS
and RUNNING (both "a worker has picked the job up"), then COMPLETED, FAILED, CANCELLED
or TIMED_OUT. A COMPLETED job can still hold a worker error: worker-vllm answers engine
and request errors as output items `{"error": {"message", "type", "code"}}`
(runpod-workers/worker-vllm src/handler.py `_error`; before v2.10 src/engine.py yielded
`{"error": create_error_response(...)}`), see `worker_error`.

Deleting a template is refused while it is "in use" by a pod or endpoint, and for up
to 2 minutes after its endpoint was deleted (runpod/docs sdks/graphql/manage-pod-templates.mdx,
"Delete a template"; api-reference-v2/openapi.json deleteTemplate 400 "Template is in use
by a pod or serverless endpoint and cannot be deleted"): `delete_template` raises
TemplateInUse for that, and treats a template that is already gone as deleted.
"""

from __future__ import annotations

import os
import re
from enum import Enum
from typing import Any

import runpod
from runpod.api.graphql import run_graphql_query
from runpod.endpoint.runner import RunPodClient

from jobs.runpod_api import gql_escape
from storage.settings import Settings

DEFAULT_ENDPOINT_BASE = "https://api.runpod.ai/v2"


class JobStatus(str, Enum):
    """A serverless job's status as /run, /status and /cancel report it."""

    IN_QUEUE = "IN_QUEUE"
    IN_PROGRESS = "IN_PROGRESS"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    TIMED_OUT = "TIMED_OUT"

    @classmethod
    def parse(cls, value: object) -> JobStatus | None:
        """The status named `value`, or None for one RunPod does not document."""
        try:
            return cls(str(value))
        except ValueError:
            return None


PENDING: frozenset[JobStatus] = frozenset({JobStatus.IN_QUEUE, JobStatus.IN_PROGRESS, JobStatus.RUNNING})
TERMINAL_OK = JobStatus.COMPLETED
TERMINAL_BAD: frozenset[JobStatus] = frozenset({JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.TIMED_OUT})
_IN_USE = re.compile(r"\bin use\b", re.IGNORECASE)
_GONE = re.compile(r"not found|does not exist|doesn't exist", re.IGNORECASE)


class ServerlessError(RuntimeError):
    """A RunPod serverless API call failed."""


class TemplateInUse(ServerlessError):
    """RunPod refused to delete a template still (or until recently) used by an endpoint."""


def worker_error(output: Any) -> str | None:
    """The message of the first error item in a job's output, or None when it holds none.

    worker-vllm yields `{"error": {"message": ...}}` (current) or `{"error": "..."}`;
    RunPod aggregates a streaming handler's yields into a list.
    """
    items = output if isinstance(output, list) else [output]
    for item in items:
        if isinstance(item, dict) and item.get("error"):
            err = item["error"]
            if isinstance(err, dict):
                return str(err.get("message") or err.get("type") or err)
            return str(err)
    return None


class ServerlessClient:
    def __init__(self, settings: Settings) -> None:
        if settings.runpod_api_key is None:
            raise ServerlessError("RUNPOD_API_KEY is not set")
        self._key = settings.runpod_api_key.get_secret_value()
        # The SDK's GraphQL helper reads RUNPOD_API_BASE_URL from the process env on
        # every call and its template/endpoint helpers use the module-level key.
        if settings.runpod_api_base_url:
            os.environ["RUNPOD_API_BASE_URL"] = settings.runpod_api_base_url.rstrip("/")
        runpod.api_key = self._key
        self._rest = RunPodClient(api_key=self._key)
        self._rest.endpoint_url_base = (
            settings.runpod_endpoint_base_url or DEFAULT_ENDPOINT_BASE
        ).rstrip("/")

    @property
    def endpoint_base_url(self) -> str:
        return self._rest.endpoint_url_base

    # ------------------------------------------------------------ GraphQL
    def _gql(self, query: str) -> dict[str, Any]:
        try:
            return run_graphql_query(query, api_key=self._key)["data"]
        except Exception as exc:  # runpod.error.QueryError / requests errors
            raise ServerlessError(f"RunPod API error: {exc}") from exc

    def create_template(
        self, name: str, image: str, env: dict[str, str], container_disk_gb: int = 20
    ) -> str:
        try:
            out = runpod.create_template(
                name=gql_escape(name),
                image_name=gql_escape(image),
                container_disk_in_gb=int(container_disk_gb),
                env={gql_escape(k): gql_escape(v) for k, v in env.items()},
                is_serverless=True,
            )
        except Exception as exc:
            raise ServerlessError(f"could not create template {name}: {exc}") from exc
        return str(out["id"])

    def create_endpoint(
        self,
        name: str,
        template_id: str,
        *,
        gpu_ids: str = "AMPERE_24",
        workers_min: int = 0,
        workers_max: int = 1,
        idle_timeout: int = 5,
        allowed_cuda_versions: str = "",
    ) -> str:
        """`allowed_cuda_versions`: comma-separated host CUDA versions ("" = any)."""
        try:
            out = runpod.create_endpoint(
                name=gql_escape(name),
                template_id=gql_escape(template_id),
                gpu_ids=gql_escape(gpu_ids),
                idle_timeout=int(idle_timeout),
                workers_min=int(workers_min),
                workers_max=int(workers_max),
                allowed_cuda_versions=gql_escape(allowed_cuda_versions) or None,
            )
        except Exception as exc:
            raise ServerlessError(f"could not create endpoint {name}: {exc}") from exc
        return str(out["id"])

    def list_endpoints(self) -> list[dict[str, Any]]:
        try:
            return list(runpod.get_endpoints())
        except Exception as exc:
            raise ServerlessError(f"could not list endpoints: {exc}") from exc

    def delete_endpoint(self, endpoint_id: str) -> None:
        """Scale to zero workers (RunPod refuses to delete otherwise), then delete."""
        current = next((e for e in self.list_endpoints() if e.get("id") == endpoint_id), None)
        if current is None:
            return  # already gone
        eid = gql_escape(endpoint_id)
        self._gql(
            "mutation { saveEndpoint(input: { "
            f'id: "{eid}", name: "{gql_escape(current.get("name", ""))}", '
            f'templateId: "{gql_escape(current.get("templateId", ""))}", '
            f'gpuIds: "{gql_escape(current.get("gpuIds", ""))}", '
            "workersMin: 0, workersMax: 0 }) { id workersMin workersMax } }"
        )
        self._gql(f'mutation {{ deleteEndpoint(id: "{eid}") }}')

    def delete_template(self, template_name: str) -> None:
        """Delete by name; TemplateInUse while RunPod still counts it as used, and a
        template that no longer exists counts as deleted (a retry after a success)."""
        try:
            self._gql(f'mutation {{ deleteTemplate(templateName: "{gql_escape(template_name)}") }}')
        except ServerlessError as exc:
            text = str(exc)
            if _IN_USE.search(text):
                raise TemplateInUse(text) from exc.__cause__
            if _GONE.search(text):
                return
            raise

    # --------------------------------------------------------------- REST
    def _post(self, path: str, body: dict[str, Any], timeout: int = 30) -> dict[str, Any]:
        try:
            return self._rest.post(path, body, timeout=timeout)
        except Exception as exc:
            raise ServerlessError(f"POST {path} failed: {exc}") from exc

    def _get(self, path: str, timeout: int = 30) -> dict[str, Any]:
        try:
            return self._rest.get(path, timeout=timeout)
        except Exception as exc:
            raise ServerlessError(f"GET {path} failed: {exc}") from exc

    def health(self, endpoint_id: str) -> dict[str, Any]:
        """{"jobs": {...counts}, "workers": {"idle", "running", "initializing", ...}}"""
        return self._get(f"{endpoint_id}/health")

    def submit(self, endpoint_id: str, payload: dict[str, Any]) -> str:
        """POST /run; returns the job id."""
        return str(self._post(f"{endpoint_id}/run", {"input": payload})["id"])

    def status(self, endpoint_id: str, job_id: str) -> dict[str, Any]:
        """{"id", "status", "output"?, "error"?, "executionTime"? (ms), "delayTime"? (ms)}"""
        return self._get(f"{endpoint_id}/status/{job_id}")

    def cancel(self, endpoint_id: str, job_id: str) -> dict[str, Any]:
        return self._post(f"{endpoint_id}/cancel/{job_id}", {})

    def run_sync(self, endpoint_id: str, payload: dict[str, Any], timeout: int = 90) -> dict[str, Any]:
        return self._post(f"{endpoint_id}/runsync", {"input": payload}, timeout=timeout)

    def chat(
        self,
        endpoint_id: str,
        model: str,
        messages: list[dict[str, str]],
        max_tokens: int = 128,
        timeout: int = 90,
    ) -> dict[str, Any]:
        """OpenAI-compatible chat completion (worker-vllm route)."""
        body = {"model": model, "messages": messages, "max_tokens": max_tokens}
        return self._post(f"{endpoint_id}/openai/v1/chat/completions", body, timeout=timeout)
