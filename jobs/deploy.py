"""Deploy a trained run's merged model (on the HF Hub) to a RunPod serverless endpoint.

Flow: template (worker-vllm image, MODEL_NAME=<hf repo>, container disk sized for the
run's base model) -> endpoint (tuner-..., workers 0..1, GPU pools that hold the model:
jobs.serve_plan) -> smoke requests via /run, each polled until COMPLETED (a scale-from-zero
endpoint only gets a worker once a job is queued, so "healthy" = the first smoke job done)
-> costs -> Deployment(status="healthy"). A smoke job that ends FAILED/CANCELLED/TIMED_OUT,
or COMPLETED with a worker error in its output (worker-vllm reports engine errors that way),
fails the deploy: the endpoint is deleted so nothing is left billing, the Deployment is
marked failed and DeployError raised.

Templates: RunPod refuses to delete a template for up to ~2 minutes after its endpoint is
deleted. Undeploy and a failed deploy delete the endpoint (scale to 0, then delete) and
hand the template to jobs.template_cleanup.TemplateCleaner, which retries in the
background and leaves what is still refused to the reaper. Templates do not bill, so
Undeploy succeeds once the endpoint is gone, and only a failed endpoint deletion is
reported as a clean-up failure.

Held-out sample: the run's dataset examples, split "test" first, then "val", then "train"
(ordered by id), each sent with the approved task spec's system prompt, exactly as the
model was trained and judged.

Cost per 1k requests, both sides from measured numbers:

* fine-tuned (`cost_per_1k_usd`): SMOKE_REQUESTS smoke jobs, one after another, on
  held-out prompts (the fixed SMOKE_PROMPT when the project has no examples);
      1000 * mean(executionTime_s) * SERVERLESS_PRICE_PER_S[gpu pool]
  i.e. a warm worker serving one request at a time; cold starts (delayTime) and idle
  time are not included, and vLLM batching concurrent requests only makes it cheaper.
  The jobs' usage tokens go to the spend ledger's detail with their cost.
* big model (`big_model_cost_per_1k_usd`): for up to BIG_MODEL_SAMPLE held-out examples,
  Claude's token counter (POST /v1/messages/count_tokens, free) measures
      in_i  = count(system, [user: prompt_i])
      out_i = count(system, [user: prompt_i + "\n\n" + reference_i]) - in_i
  where reference_i is the example's big-model reference output (its response when none).
  Both counts are one user turn with the same system prompt, so the framing cancels and
  out_i is the reference's own tokens (plus at most one for the separator). No request
  ends in an assistant turn: models without prefill support (claude-sonnet-4-6 and the
  other 4.6+ models) answer those with a 400 ("This model does not support assistant
  message prefill"), on count_tokens too. Then
      1000 * (mean(in) * input_price + mean(out) * output_price) / 1e6
  with storage.spend.CLAUDE_PRICES for settings.tuner_claude_model. Without a token counter
  (Claude not configured) or when counting fails it is None: never a guess.
"""

from __future__ import annotations

import logging
import shlex
import time
from collections.abc import Callable
from typing import Any, Protocol

from sqlmodel import col, select

from jobs import serve_plan
from jobs.serve_plan import SERVERLESS_PRICE_PER_S, ServePlan
from jobs.serverless import (
    PENDING,
    TERMINAL_BAD,
    TERMINAL_OK,
    JobStatus,
    ServerlessClient,
    ServerlessError,
    worker_error,
)
from jobs.template_cleanup import TemplateCleaner
from jobs.export_report import no_model_reason
from storage import spend
from storage.db import Database
from storage.models import Deployment, Example, Run, TaskSpecRow, utcnow
from storage.redact import redact
from storage.settings import Settings

log = logging.getLogger(__name__)

__all__ = ["SERVERLESS_PRICE_PER_S", "DeployError", "DeployService", "curl_example"]

SMOKE_PROMPT = "Reply with one short sentence: are you ready?"
SMOKE_REQUESTS = 3  # smoke jobs whose execution time is averaged for the fine-tuned cost
BIG_MODEL_SAMPLE = 8  # held-out examples whose tokens Claude counts for the big-model cost
MAX_MODEL_LEN = 2048
REFERENCE_SEPARATOR = "\n\n"  # between prompt and reference in the output-token count
_SPLIT_ORDER = {"test": 0, "val": 1, "train": 2}


class TokenCounter(Protocol):
    """Counts the input tokens of a Claude request (jobs.claude.ClaudeClient implements it)."""

    def count_tokens(self, system: str, messages: list[dict[str, Any]], model: str | None = None) -> int: ...


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
    fix = no_model_reason(run.config or {}, namespace=settings.tuner_hf_namespace,
                          hub_configured=bool(settings.hf_token and settings.tuner_hf_namespace))
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


def fine_tuned_cost_per_1k(exec_times_s: list[float], price_per_s: float) -> float:
    """1000 * mean execution seconds * worker USD/s (warm worker, one request at a time)."""
    if not exec_times_s:
        return 0.0
    return 1000 * price_per_s * sum(exec_times_s) / len(exec_times_s)


def big_model_cost_per_1k(model: str, input_tokens: list[int], output_tokens: list[int]) -> float:
    """1000 * (mean input tokens * input price + mean output tokens * output price) / 1e6."""
    if not input_tokens or len(input_tokens) != len(output_tokens):
        raise ValueError("need one output count per input count, at least one")
    n = len(input_tokens)
    pin, pout = spend.CLAUDE_PRICES.get(model, spend.DEFAULT_CLAUDE_PRICE)
    return 1000 * (sum(input_tokens) / n * pin + sum(output_tokens) / n * pout) / 1_000_000


class DeployService:
    def __init__(
        self,
        db: Database,
        settings: Settings,
        client: ServerlessClient,
        *,
        gpu_ids: str | None = None,
        ready_timeout_s: float = 900.0,
        poll_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        token_counter: TokenCounter | None = None,
        templates: TemplateCleaner | None = None,
    ) -> None:
        """`gpu_ids` overrides TUNER_SERVERLESS_GPU_IDS, which overrides the pools sized
        from the model (jobs.serve_plan)."""
        self.db = db
        self.token_counter = token_counter
        self.settings = settings
        self.client = client
        self.gpu_ids = gpu_ids or settings.tuner_serverless_gpu_ids.strip() or None
        self.templates = templates or TemplateCleaner(
            db, client, window_s=settings.tuner_template_retry_s)
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
        self._remove_stale(project_id)
        with self.db.session() as s:
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
                msg += f" Clean-up also failed ({redact(leftover, self.settings)}); delete {endpoint_name(dep)} in the RunPod console."
            raise DeployError(msg) from exc

    def plan(self, project_id: int, run_id: int | None) -> ServePlan:
        """GPU pools and worker disk for the run's base model (config, else approved spec)."""
        with self.db.session() as s:
            run = s.get(Run, run_id) if run_id is not None else None
        base = str(((run.config or {}) if run else {}).get("base_model") or "")
        base = base or str(self._approved_spec(project_id).get("base_model") or "")
        plan = serve_plan.plan_for(base)
        if not plan.known:
            log.warning("base model %r is not in the catalog; serving on %s with a %d GB disk",
                        base, plan.gpu_ids, plan.disk_gb)
        if self.gpu_ids:
            plan = ServePlan(self.gpu_ids, plan.disk_gb, plan.known)
        return plan

    def _worker_env(self, dep: Deployment) -> dict[str, str]:
        """worker-vllm's environment (names from its README "Configuration" table)."""
        env = {"MODEL_NAME": dep.model_ref, "MAX_MODEL_LEN": str(MAX_MODEL_LEN),
               "GPU_MEMORY_UTILIZATION": f"{serve_plan.GPU_MEMORY_UTILIZATION:.2f}"}
        if self.settings.hf_token is not None and self.settings.hf_token.get_secret_value():
            env["HF_TOKEN"] = self.settings.hf_token.get_secret_value()
        return env

    def _bring_up(self, dep: Deployment) -> Deployment:
        plan = self.plan(dep.project_id, dep.run_id)
        tpl = self.client.create_template(template_name(dep), self.settings.tuner_vllm_image,
                                          self._worker_env(dep), container_disk_gb=plan.disk_gb)
        self._save(dep, template_id=tpl)
        eid = self.client.create_endpoint(
            endpoint_name(dep), tpl, gpu_ids=plan.gpu_ids, workers_min=0, workers_max=1,
            allowed_cuda_versions=self.settings.tuner_vllm_cuda_versions,
        )
        self._save(dep, endpoint_id=eid)
        system, examples, max_tokens = self._held_out(dep.project_id, dep.run_id)
        prompts = [e.prompt for e in examples[:SMOKE_REQUESTS]] or [SMOKE_PROMPT]
        price = serve_plan.price_per_s(plan.gpu_ids)
        exec_times: list[float] = []
        for i, prompt in enumerate(prompts, start=1):
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt}
            ]
            job = self._smoke(eid, messages, max_tokens)
            exec_s = float(job.get("executionTime") or 0) / 1000.0
            tin, tout = _usage(job.get("output"))
            exec_times.append(exec_s)
            spend.record(
                self.db,
                kind="endpoint",
                usd=price * exec_s,
                quantity=exec_s,
                project_id=dep.project_id,
                run_id=dep.run_id,
                detail=f"smoke request {i}/{len(prompts)} on {eid}: {exec_s:.2f}s, {tin}+{tout} tokens",
            )
        return self._save(
            dep,
            status="healthy",
            cost_per_1k_usd=fine_tuned_cost_per_1k(exec_times, price),
            big_model_cost_per_1k_usd=self._big_model_cost_safe(system, examples),
        )

    def _remove_stale(self, project_id: int) -> None:
        """Tear down the project's deployments left "creating" by a bot that died mid-deploy
        (one deploy step runs per project thread at a time, so none is in progress now):
        their queued smoke job keeps the endpoint trying to start billed GPU workers."""
        with self.db.session() as s:
            stale = list(s.exec(select(Deployment).where(
                Deployment.project_id == project_id, Deployment.status == "creating")).all())
        for dep in stale:
            if dep.endpoint_id is None:  # died between creating the endpoint and saving its id?
                name = endpoint_name(dep)
                try:
                    found = [e for e in self.client.list_endpoints() if e.get("name") == name]
                except ServerlessError as exc:
                    raise DeployError(redact(str(exc), self.settings)) from exc
                if found:
                    dep = self._save(dep, endpoint_id=str(found[0]["id"]))
            leftover = self._teardown(dep)
            if leftover:
                raise DeployError(redact(
                    f"An earlier, interrupted deployment could not be removed ({leftover}); "
                    f"delete {endpoint_name(dep)} in the RunPod console and try again.",
                    self.settings))
            log.warning("removed endpoint %s left by an interrupted deploy", dep.endpoint_id)
            self._save(dep, status="failed", removed_at=utcnow())

    def _approved_spec(self, project_id: int) -> dict[str, Any]:
        with self.db.session() as s:
            spec_row = s.exec(
                select(TaskSpecRow)
                .where(TaskSpecRow.project_id == project_id, TaskSpecRow.approved)
                .order_by(col(TaskSpecRow.version).desc(), col(TaskSpecRow.id).desc())
            ).first()
        return dict(spec_row.spec or {}) if spec_row else {}

    def _held_out(self, project_id: int, run_id: int | None) -> tuple[str, list[Example], int]:
        """(system prompt, sample of held-out examples, max output tokens) for the run."""
        spec = self._approved_spec(project_id)
        with self.db.session() as s:
            run = s.get(Run, run_id) if run_id is not None else None
            q = select(Example).where(Example.project_id == project_id)
            if run is not None and run.dataset_id is not None:
                q = q.where(Example.dataset_id == run.dataset_id)
            rows = list(s.exec(q.order_by(col(Example.id))).all())
        system = str(spec.get("system_prompt") or "")
        max_tokens = min(int(spec.get("max_output_tokens") or 512), MAX_MODEL_LEN // 2)
        rows.sort(key=lambda e: _SPLIT_ORDER.get(e.split, len(_SPLIT_ORDER)))  # stable: ids stay ordered
        return system, rows[: max(BIG_MODEL_SAMPLE, SMOKE_REQUESTS)], max_tokens

    def _smoke(self, endpoint_id: str, messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
        """Queue one chat request and poll it to COMPLETED without a worker error;
        DeployError otherwise."""
        payload = {"messages": messages, "sampling_params": {"max_tokens": max_tokens}}
        job_id = self.client.submit(endpoint_id, payload)
        deadline = self.clock() + self.ready_timeout_s
        last: dict[str, Any] = {}
        while True:
            last = self.client.status(endpoint_id, job_id)
            state = JobStatus.parse(last.get("status"))
            if state is TERMINAL_OK:
                return self._checked_output(last)
            if state in TERMINAL_BAD:
                err = str(last.get("error") or "no error message")[:300]
                raise DeployError(f"The smoke request ended {state.value}: {err}")
            if state not in PENDING:
                raise DeployError(f"The smoke request returned an unknown status {last.get('status')!r}.")
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

    @staticmethod
    def _checked_output(job: dict[str, Any]) -> dict[str, Any]:
        """The COMPLETED job, or DeployError when its output is a worker error."""
        err = worker_error(job.get("output"))
        if err is not None:
            raise DeployError(
                "The model server on the endpoint answered the smoke request with an error "
                f"instead of a reply: {err[:300]}"
            )
        return job

    def _workers_text(self, endpoint_id: str) -> str:
        try:
            w = self.client.health(endpoint_id).get("workers", {})
        except ServerlessError:
            return "unknown"
        return ", ".join(f"{k} {v}" for k, v in sorted(w.items())) or "none"

    def big_model_cost_per_1k(self, project_id: int, run_id: int | None = None) -> float | None:
        """USD for 1k requests on the big model, from Claude's counts of held-out examples.

        None without a token counter or examples. Raises what the counter raises.
        """
        system, examples, _ = self._held_out(project_id, run_id)
        return self._big_model_cost(system, examples)

    def _big_model_cost(self, system: str, examples: list[Example]) -> float | None:
        counter = self.token_counter
        sample = examples[:BIG_MODEL_SAMPLE]
        if counter is None or not sample:
            return None
        model = self.settings.tuner_claude_model
        tins: list[int] = []
        touts: list[int] = []
        for e in sample:
            answer = e.reference if e.reference is not None else e.response
            tin = counter.count_tokens(system, [{"role": "user", "content": e.prompt}], model=model)
            both = [{"role": "user", "content": e.prompt + REFERENCE_SEPARATOR + answer}]
            tins.append(tin)
            touts.append(max(0, counter.count_tokens(system, both, model=model) - tin))
        return big_model_cost_per_1k(model, tins, touts)

    def _big_model_cost_safe(self, system: str, examples: list[Example]) -> float | None:
        # The endpoint is already healthy: a failed (free) count must not tear it down.
        try:
            return self._big_model_cost(system, examples)
        except Exception as exc:  # noqa: BLE001 - any counter failure only loses the comparison
            log.warning("big-model cost not measured: %s", redact(str(exc), self.settings))
            return None

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
            raise DeployError(redact(f"Could not remove {endpoint_name(dep)}: {leftover}", self.settings))
        return self._save(dep, status="removed", removed_at=utcnow())

    def _teardown(self, dep: Deployment) -> str:
        """Delete the endpoint (the only part that bills) and hand the template to the
        background cleaner; returns '' or why the endpoint could not be deleted."""
        problem = ""
        if dep.endpoint_id:
            try:
                self.client.delete_endpoint(dep.endpoint_id)
            except ServerlessError as exc:
                problem = f"endpoint {dep.endpoint_id}: {exc}"
                log.error("deploy teardown: %s", redact(problem, self.settings))
        if dep.template_id:
            self.templates.schedule(template_name(dep), template_id=dep.template_id,
                                    deployment_id=dep.id)
        return problem

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


