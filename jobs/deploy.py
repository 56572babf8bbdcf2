"""Deploy a trained run's merged model (on the HF Hub) to a RunPod serverless endpoint.

Flow: template (worker-vllm image, MODEL_NAME=<hf repo>) -> endpoint (tuner-..., workers
0..1) -> smoke request via /run, polled until COMPLETED (a scale-from-zero endpoint only
gets a worker once a job is queued, so "healthy" = workers ready or the smoke job done)
-> costs -> Deployment(status="healthy"). On any failure the endpoint and template are
deleted so nothing is left billing, the Deployment is marked failed and DeployError raised.
"""

from __future__ import annotations

import logging
import shlex
import time
from collections.abc import Callable
from typing import Any

from sqlmodel import select

from jobs.serverless import PENDING, TERMINAL_BAD, TERMINAL_OK, ServerlessClient, ServerlessError
from storage import spend
from storage.db import Database
from storage.redact import redact
from storage.models import Deployment, Example, Run, utcnow
from storage.settings import Settings

log = logging.getLogger(__name__)

# Flex worker price, USD per second, by RunPod serverless GPU pool id.
SERVERLESS_PRICE_PER_S: dict[str, float] = {
    "AMPERE_16": 0.00016,
    "AMPERE_24": 0.00019,
    "ADA_24": 0.00031,
    "AMPERE_48": 0.00034,
    "ADA_48_PRO": 0.00053,
    "AMPERE_80": 0.00076,
    "ADA_80_PRO": 0.00116,
}
DEFAULT_GPU_IDS = "AMPERE_24"
CHARS_PER_TOKEN = 4.0  # estimate for the big model's tokens from example text
SMOKE_PROMPT = "Reply with one short sentence: are you ready?"


class DeployError(RuntimeError):
    """Deployment failed; the message is safe to show in Slack (no secrets)."""


def model_ref_for(run: Run, settings: Settings) -> str:
    """HF Hub repo id of the run's merged model, or DeployError saying why there is none."""
    uri = run.artifact_uri or ""
    if uri.startswith("hf://"):
        repo = uri[len("hf://") :].strip("/")
        if repo and "/" not in repo and settings.tuner_hf_namespace:
            repo = f"{settings.tuner_hf_namespace}/{repo}"
        if repo:
            return repo
    where = f"only at {uri}" if uri else "nowhere (the run has no artifact)"
    push_error = (run.config or {}).get("hf_error")
    if push_error:
        fix = (f"The push to the Hub failed on the pod ({push_error}); fix that (token scope, "
               "namespace) and retrain, then deploy again.")
    else:
        fix = ("Serverless workers download the model from the Hub, so set HF_TOKEN and "
               "TUNER_HF_NAMESPACE and retrain to push the merged model there, then deploy again.")
    raise DeployError(f"Run {run.id}'s model is {where}, not on the Hugging Face Hub. {fix}")


def endpoint_name(deployment: Deployment) -> str:
    return f"tuner-p{deployment.project_id}-d{deployment.id}"


def template_name(deployment: Deployment) -> str:
    return f"tuner-p{deployment.project_id}-d{deployment.id}-tpl"


def curl_example(deployment: Deployment, endpoint_base_url: str = "https://api.runpod.ai/v2") -> str:
    """OpenAI-compatible curl; the key is the $RUNPOD_API_KEY placeholder, never a value."""
    url = f"{endpoint_base_url.rstrip('/')}/{deployment.endpoint_id}/openai/v1/chat/completions"
    body = (
        '{"model": "' + deployment.model_ref + '", '
        '"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 256}'
    )
    return (
        f"curl -s {shlex.quote(url)} \\\n"
        '  -H "Authorization: Bearer $RUNPOD_API_KEY" \\\n'
        '  -H "Content-Type: application/json" \\\n'
        f"  -d {shlex.quote(body)}"
    )


def _usage(output: Any) -> tuple[int, int]:
    """(input, output) tokens from a worker-vllm job output or an OpenAI response."""
    items = output if isinstance(output, list) else [output]
    tin = tout = 0
    for item in items:
        if not isinstance(item, dict):
            continue
        u = item.get("usage") or {}
        tin += int(u.get("input", u.get("prompt_tokens", 0)) or 0)
        tout += int(u.get("output", u.get("completion_tokens", 0)) or 0)
    return tin, tout


class DeployService:
    def __init__(
        self,
        db: Database,
        settings: Settings,
        client: ServerlessClient,
        *,
        gpu_ids: str = DEFAULT_GPU_IDS,
        ready_timeout_s: float = 900.0,
        poll_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.db = db
        self.settings = settings
        self.client = client
        self.gpu_ids = gpu_ids
        self.ready_timeout_s = ready_timeout_s
        self.poll_s = settings.tuner_poll_interval_s if poll_s is None else poll_s
        self.clock = clock
        self.sleep = sleep

    # ------------------------------------------------------------------ deploy
    def deploy(self, project_id: int, run_id: int) -> Deployment:
        with self.db.session() as s:
            run = s.get(Run, run_id)
            if run is None or run.project_id != project_id:
                raise DeployError(f"Run {run_id} does not belong to project {project_id}.")
            ref = model_ref_for(run, self.settings)
            dep = Deployment(project_id=project_id, run_id=run_id, model_ref=ref, status="creating")
            s.add(dep)
            s.commit()
            s.refresh(dep)
        try:
            return self._bring_up(dep)
        except (DeployError, ServerlessError) as exc:
            leftover = self._teardown(dep)
            self._save(dep, status="failed", removed_at=utcnow())
            msg = redact(str(exc), self.settings)
            if leftover:
                msg += f" Clean-up also failed ({leftover}); delete {endpoint_name(dep)} in the RunPod console."
            raise DeployError(msg) from exc

    def _bring_up(self, dep: Deployment) -> Deployment:
        env = {"MODEL_NAME": dep.model_ref, "MAX_MODEL_LEN": "2048", "GPU_MEMORY_UTILIZATION": "0.90"}
        if self.settings.hf_token is not None and self.settings.hf_token.get_secret_value():
            env["HF_TOKEN"] = self.settings.hf_token.get_secret_value()
        tpl = self.client.create_template(template_name(dep), self.settings.tuner_vllm_image, env)
        self._save(dep, template_id=tpl)
        eid = self.client.create_endpoint(
            endpoint_name(dep), tpl, gpu_ids=self.gpu_ids, workers_min=0, workers_max=1
        )
        self._save(dep, endpoint_id=eid)
        job = self._smoke(eid)
        exec_s = float(job.get("executionTime") or 0) / 1000.0
        price = SERVERLESS_PRICE_PER_S.get(self.gpu_ids.split(",")[0].strip(), SERVERLESS_PRICE_PER_S[DEFAULT_GPU_IDS])
        tin, tout = _usage(job.get("output"))
        spend.record(
            self.db,
            kind="endpoint",
            usd=price * exec_s,
            quantity=exec_s,
            project_id=dep.project_id,
            run_id=dep.run_id,
            detail=f"smoke request on {eid}: {exec_s:.2f}s, {tin}+{tout} tokens",
        )
        return self._save(
            dep,
            status="healthy",
            cost_per_1k_usd=price * exec_s * 1000,
            big_model_cost_per_1k_usd=self.big_model_cost_per_1k(dep.project_id),
        )

    def _smoke(self, endpoint_id: str) -> dict[str, Any]:
        """Queue one chat request and poll it to COMPLETED; DeployError otherwise."""
        payload = {
            "messages": [{"role": "user", "content": SMOKE_PROMPT}],
            "sampling_params": {"max_tokens": 32},
        }
        job_id = self.client.submit(endpoint_id, payload)
        deadline = self.clock() + self.ready_timeout_s
        last: dict[str, Any] = {}
        while True:
            last = self.client.status(endpoint_id, job_id)
            state = str(last.get("status", ""))
            if state == TERMINAL_OK:
                return last
            if state in TERMINAL_BAD:
                err = str(last.get("error") or "no error message")[:300]
                raise DeployError(f"The smoke request ended {state}: {err}")
            if state not in PENDING:
                raise DeployError(f"The smoke request returned an unknown status {state!r}.")
            if self.clock() >= deadline:
                break
            self.sleep(self.poll_s)
        workers = self._workers_text(endpoint_id)
        try:
            self.client.cancel(endpoint_id, job_id)
        except ServerlessError:
            pass
        raise DeployError(
            f"The endpoint never became healthy within {self.ready_timeout_s:.0f}s "
            f"(smoke request still {last.get('status', 'unknown')}; workers: {workers}). "
            "Usually no GPU of that type is free, or the model is too big or private."
        )

    def _workers_text(self, endpoint_id: str) -> str:
        try:
            w = self.client.health(endpoint_id).get("workers", {})
        except ServerlessError:
            return "unknown"
        return ", ".join(f"{k} {v}" for k, v in sorted(w.items())) or "none"

    def big_model_cost_per_1k(self, project_id: int) -> float | None:
        """What 1k requests cost on the big model, from the project's example sizes."""
        with self.db.session() as s:
            rows = s.exec(select(Example.prompt, Example.response).where(Example.project_id == project_id)).all()
        if not rows:
            return None
        tin = sum(len(p) for p, _ in rows) / len(rows) / CHARS_PER_TOKEN
        tout = sum(len(r) for _, r in rows) / len(rows) / CHARS_PER_TOKEN
        return spend.claude_cost(self.settings.tuner_claude_model, int(round(tin)), int(round(tout))) * 1000

    # ---------------------------------------------------------------- undeploy
    def undeploy(self, deployment_id: int) -> Deployment:
        with self.db.session() as s:
            dep = s.get(Deployment, deployment_id)
        if dep is None:
            raise DeployError(f"Deployment {deployment_id} not found.")
        if dep.status == "removed":
            return dep
        leftover = self._teardown(dep)
        if leftover:
            raise DeployError(f"Could not remove {endpoint_name(dep)}: {leftover}")
        return self._save(dep, status="removed", removed_at=utcnow())

    def _teardown(self, dep: Deployment) -> str:
        """Delete endpoint then template; returns '' or what could not be deleted."""
        problems: list[str] = []
        if dep.endpoint_id:
            try:
                self.client.delete_endpoint(dep.endpoint_id)
            except ServerlessError as exc:
                problems.append(f"endpoint {dep.endpoint_id}: {exc}")
        if dep.template_id and not problems:
            try:
                self.client.delete_template(template_name(dep))
            except ServerlessError as exc:
                problems.append(f"template {template_name(dep)}: {exc}")
        for p in problems:
            log.error("deploy teardown: %s", p)
        return "; ".join(problems)

    def _save(self, dep: Deployment, **changes: Any) -> Deployment:
        with self.db.session() as s:
            row = s.get(Deployment, dep.id)
            assert row is not None
            for k, v in changes.items():
                setattr(row, k, v)
                setattr(dep, k, v)
            s.add(row)
            s.commit()
            s.refresh(row)
            return row

    def active(self, project_id: int) -> list[Deployment]:
        with self.db.session() as s:
            return list(
                s.exec(
                    select(Deployment).where(Deployment.project_id == project_id, Deployment.status == "healthy")
                ).all()
            )


