"""Deploy a trained run's merged model (on the HF Hub) to a RunPod serverless endpoint.

Flow: template (worker-vllm image, MODEL_NAME=<hf repo>) -> endpoint (tuner-..., workers
0..1) -> smoke requests via /run, each polled until COMPLETED (a scale-from-zero endpoint
only gets a worker once a job is queued, so "healthy" = the first smoke job done) -> costs
-> Deployment(status="healthy"). On any failure the endpoint and template are deleted so
nothing is left billing, the Deployment is marked failed and DeployError raised.

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
      out_i = count(system, [user: prompt_i, assistant: reference_i]) - in_i
  where reference_i is the example's big-model reference output (its response when none;
  the assistant turn's few framing tokens are included), then
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

from jobs.export_report import no_model_reason
from jobs.serverless import PENDING, TERMINAL_BAD, TERMINAL_OK, ServerlessClient, ServerlessError
from storage import spend
from storage.db import Database
from storage.redact import redact
from storage.models import Deployment, Example, Run, TaskSpecRow, utcnow
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
SMOKE_PROMPT = "Reply with one short sentence: are you ready?"
SMOKE_REQUESTS = 3  # smoke jobs whose execution time is averaged for the fine-tuned cost
BIG_MODEL_SAMPLE = 8  # held-out examples whose tokens Claude counts for the big-model cost
MAX_MODEL_LEN = 2048
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
        gpu_ids: str = DEFAULT_GPU_IDS,
        ready_timeout_s: float = 900.0,
        poll_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        token_counter: TokenCounter | None = None,
    ) -> None:
        self.db = db
        self.token_counter = token_counter
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
                msg += f" Clean-up also failed ({leftover}); delete {endpoint_name(dep)} in the RunPod console."
            raise DeployError(msg) from exc

    def _bring_up(self, dep: Deployment) -> Deployment:
        env = {"MODEL_NAME": dep.model_ref, "MAX_MODEL_LEN": str(MAX_MODEL_LEN), "GPU_MEMORY_UTILIZATION": "0.90"}
        if self.settings.hf_token is not None and self.settings.hf_token.get_secret_value():
            env["HF_TOKEN"] = self.settings.hf_token.get_secret_value()
        tpl = self.client.create_template(template_name(dep), self.settings.tuner_vllm_image, env)
        self._save(dep, template_id=tpl)
        eid = self.client.create_endpoint(
            endpoint_name(dep), tpl, gpu_ids=self.gpu_ids, workers_min=0, workers_max=1
        )
        self._save(dep, endpoint_id=eid)
        system, examples, max_tokens = self._held_out(dep.project_id, dep.run_id)
        prompts = [e.prompt for e in examples[:SMOKE_REQUESTS]] or [SMOKE_PROMPT]
        price = self.price_per_s()
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

    def price_per_s(self) -> float:
        """Flex worker USD/s of the first GPU pool asked for (AMPERE_24's when unknown)."""
        pool = self.gpu_ids.split(",")[0].strip()
        return SERVERLESS_PRICE_PER_S.get(pool, SERVERLESS_PRICE_PER_S[DEFAULT_GPU_IDS])

    def _held_out(self, project_id: int, run_id: int | None) -> tuple[str, list[Example], int]:
        """(system prompt, sample of held-out examples, max output tokens) for the run."""
        with self.db.session() as s:
            spec_row = s.exec(
                select(TaskSpecRow)
                .where(TaskSpecRow.project_id == project_id, TaskSpecRow.approved)
                .order_by(col(TaskSpecRow.version).desc(), col(TaskSpecRow.id).desc())
            ).first()
            run = s.get(Run, run_id) if run_id is not None else None
            q = select(Example).where(Example.project_id == project_id)
            if run is not None and run.dataset_id is not None:
                q = q.where(Example.dataset_id == run.dataset_id)
            rows = list(s.exec(q.order_by(col(Example.id))).all())
        spec = (spec_row.spec or {}) if spec_row else {}
        system = str(spec.get("system_prompt") or "")
        max_tokens = min(int(spec.get("max_output_tokens") or 512), MAX_MODEL_LEN // 2)
        rows.sort(key=lambda e: _SPLIT_ORDER.get(e.split, len(_SPLIT_ORDER)))  # stable: ids stay ordered
        return system, rows[: max(BIG_MODEL_SAMPLE, SMOKE_REQUESTS)], max_tokens

    def _smoke(self, endpoint_id: str, messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
        """Queue one chat request and poll it to COMPLETED; DeployError otherwise."""
        payload = {"messages": messages, "sampling_params": {"max_tokens": max_tokens}}
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
            ask = [{"role": "user", "content": e.prompt}]
            answer = e.reference if e.reference is not None else e.response
            tin = counter.count_tokens(system, ask, model=model)
            full = counter.count_tokens(system, ask + [{"role": "assistant", "content": answer}], model=model)
            tins.append(tin)
            touts.append(max(0, full - tin))
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


