"""Deploy to RunPod serverless through the real runpod SDK against a loopback fake."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlmodel import select

from jobs import catalog
from jobs.claude import ClaudeAPIError, ClaudeClient
from jobs.deploy import (
    BIG_MODEL_SAMPLE,
    REFERENCE_SEPARATOR,
    SMOKE_PROMPT,
    SMOKE_REQUESTS,
    DeployError,
    DeployService,
    curl_example,
    template_name,
)
from jobs.serve_plan import SERVERLESS_PRICE_PER_S
from jobs.serverless import ServerlessClient, TemplateInUse, gql_escape
from jobs.template_cleanup import TemplateCleaner
from storage import spend
from storage.db import Database
from storage.models import (
    Dataset,
    Deployment,
    Example,
    Project,
    Run,
    SpendEntry,
    TaskSpecRow,
    TemplateCleanup,
)
from storage.settings import Settings
from tests.fakes.anthropic_fake import (
    API_KEY,
    MESSAGE_OVERHEAD_TOKENS,
    FakeAnthropic,
    count_text_tokens,
)
from tests.fakes.runpod_serverless_fake import FakeServerless

RP_KEY = "rp-secret-key-123"
HF_KEY = "hf_secret_token_456"


def _settings(fake: FakeServerless, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("RUNPOD_API_KEY", RP_KEY)
    monkeypatch.setenv("HF_TOKEN", HF_KEY)
    monkeypatch.setenv("RUNPOD_API_BASE_URL", fake.base_url)
    monkeypatch.setenv("RUNPOD_ENDPOINT_BASE_URL", fake.endpoint_base_url)
    monkeypatch.setenv("TUNER_HF_NAMESPACE", "acme")
    return Settings(_env_file=None)


@pytest.fixture
def fake() -> Iterator[FakeServerless]:
    with FakeServerless.running(api_key=RP_KEY) as f:
        yield f


SYSTEM = "You triage support tickets: reply with the team and one short reason."
BASE_8B = "unsloth/Meta-Llama-3.1-8B-Instruct"
PRICE_48 = SERVERLESS_PRICE_PER_S["AMPERE_48"]  # the cheapest pool that holds an 8B in 16-bit


def _wait(cond: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll `cond` until truthy (background template retries run on their own thread)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _project_run(
    db: Database, artifact: str | None = "hf://acme/tuner-support-1", *, n_test: int = 10,
    with_examples: bool = True, base_model: str | None = BASE_8B,
) -> tuple[int, int]:
    """A project with an approved spec and a dataset: train/val examples first, then test ones."""
    spec: dict[str, Any] = {"system_prompt": SYSTEM, "max_output_tokens": 300}
    if base_model is not None:
        spec["base_model"] = base_model
    with db.session() as s:
        p = Project(thread_id="T:C:1.0", team_id="T", channel_id="C", thread_ts="1.0", created_by="U", name="support")
        s.add(p)
        s.commit()
        s.refresh(p)
        s.add(TaskSpecRow(project_id=p.id, approved=True, spec=spec))
        ds = Dataset(project_id=p.id)
        s.add(ds)
        s.commit()
        s.refresh(ds)
        rows: list[tuple[str, str, str, str | None]] = []
        if with_examples:
            rows += [("train", "train prompt?", "train answer.", None), ("val", "val prompt?", "val answer.", None)]
            for i in range(n_test):
                prompt = f"Ticket {i}: my login fails -- " + "error, " * i + "help!"
                response = f"Team: auth. Reason: login ({i})."
                reference = None if i % 2 else f"Team: auth; reason: the login service ({i}) " + "is down " * (i + 1)
                rows.append(("test", prompt, response, reference))
        for i, (split, prompt, response, ref) in enumerate(rows):
            s.add(Example(project_id=p.id, dataset_id=ds.id, prompt=prompt, response=response, reference=ref,
                          split=split, content_hash=f"h{i}"))
        r = Run(project_id=p.id, dataset_id=ds.id, status="succeeded", artifact_uri=artifact)
        s.add(r)
        s.commit()
        s.refresh(r)
        return p.id, r.id


def _test_examples(db: Database, pid: int) -> list[Example]:
    with db.session() as s:
        return list(s.exec(select(Example).where(Example.project_id == pid, Example.split == "test")
                           .order_by(Example.id)).all())


def _expected_big_model_per_1k(examples: list[Example], model: str) -> float:
    """From the fake tokenizer's counts: system + framed prompt in, the reference's own tokens out."""
    tins = [count_text_tokens(SYSTEM) + MESSAGE_OVERHEAD_TOKENS + count_text_tokens(e.prompt) for e in examples]
    touts = [count_text_tokens(e.reference if e.reference is not None else e.response) for e in examples]
    pin, pout = spend.CLAUDE_PRICES[model]
    n = len(examples)
    return (sum(tins) / n * pin + sum(touts) / n * pout) / 1e6 * 1000


@pytest.fixture
def claude() -> Iterator[FakeAnthropic]:
    with FakeAnthropic.running(lambda req: "unused") as f:
        yield f


def _counter(claude: FakeAnthropic, db: Database, key: str = API_KEY) -> ClaudeClient:
    settings = Settings(_env_file=None, anthropic_api_key=key, anthropic_base_url=claude.base_url)
    return ClaudeClient(settings, db, max_retries=0)


_CLEANERS: list[TemplateCleaner] = []


@pytest.fixture(autouse=True)
def _stop_cleaners(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Stop background template retries before the env (fake URLs) is undone."""
    yield
    while _CLEANERS:
        _CLEANERS.pop().close(timeout=10)


def _cleaner(db: Database, client: ServerlessClient, window_s: float = 30.0) -> TemplateCleaner:
    """Background template retries on a test's time scale (production: seconds to minutes)."""
    cleaner = TemplateCleaner(db, client, window_s=window_s, first_delay_s=0.02, max_delay_s=0.2)
    _CLEANERS.append(cleaner)
    return cleaner


def _service(db, fake, monkeypatch, *, window_s: float = 30.0, **kw) -> DeployService:
    settings = _settings(fake, monkeypatch)
    client = ServerlessClient(settings)
    kw.setdefault("templates", _cleaner(db, client, window_s))
    return DeployService(db, settings, client, poll_s=0.0, **kw)


def _cleanup_rows(db: Database) -> list[TemplateCleanup]:
    with db.session() as s:
        return list(s.exec(select(TemplateCleanup).order_by(TemplateCleanup.id)).all())


def test_deploy_happy_path(db, fake, monkeypatch, claude):
    fake.queue_polls, fake.progress_polls = 2, 2
    pid, rid = _project_run(db)

    # each smoke job takes longer than the last (1.5 s, 2.0 s, 2.5 s) so averaging shows
    def sleep(_s: float) -> None:
        fake.execution_ms = 1000 + 500 * len(fake.jobs)

    svc = _service(db, fake, monkeypatch, sleep=sleep, token_counter=_counter(claude, db))
    dep = svc.deploy(pid, rid)

    assert dep.status == "healthy" and dep.endpoint_id in fake.live_endpoints
    ep = fake.endpoints[dep.endpoint_id]
    assert ep["name"].startswith("tuner-") and ep["workersMin"] == 0 and ep["workersMax"] == 1
    tpl = fake.templates[dep.template_id]
    assert tpl["isServerless"] is True
    assert tpl["imageName"] == Settings(_env_file=None).tuner_vllm_image
    assert tpl["env"]["MODEL_NAME"] == "acme/tuner-support-1"
    assert tpl["env"]["HF_TOKEN"] == HF_KEY  # passed as env only
    assert tpl["env"]["MAX_MODEL_LEN"] == "2048" and tpl["env"]["GPU_MEMORY_UTILIZATION"] == "0.90"
    assert set(tpl["env"]) == {"MODEL_NAME", "HF_TOKEN", "MAX_MODEL_LEN", "GPU_MEMORY_UTILIZATION"}
    # sized for the spec's 8B base model: its 16-bit weights + caches on disk, 48 GB GPUs
    assert tpl["containerDiskInGb"] == catalog.lookup(BASE_8B).serve_disk_gb() >= 35
    assert ep["gpuIds"] == "AMPERE_48,ADA_48_PRO" and ep["allowedCudaVersions"] == "13.0"

    # three smoke jobs, one after another, each IN_QUEUE -> RUNNING -> IN_PROGRESS -> COMPLETED
    assert fake.status_log == ["IN_QUEUE", "IN_QUEUE", "RUNNING", "IN_PROGRESS", "IN_PROGRESS",
                               "COMPLETED"] * SMOKE_REQUESTS
    # ... on the first held-out (test split) prompts, with the spec's system prompt and output cap
    held = _test_examples(db, pid)
    payloads = [j.payload for j in fake.jobs.values()]
    assert [p["messages"] for p in payloads] == [
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": e.prompt}] for e in held[:SMOKE_REQUESTS]
    ]
    assert all(p["sampling_params"]["max_tokens"] == 300 for p in payloads)

    # fine-tuned cost: mean execution time x the first pool's (AMPERE_48) price, per 1k requests
    exec_s = [1.5, 2.0, 2.5]
    assert dep.cost_per_1k_usd == pytest.approx(PRICE_48 * sum(exec_s) / 3 * 1000)
    assert spend.by_kind(db, project_id=pid)["endpoint"] == pytest.approx(PRICE_48 * sum(exec_s))

    # big model: Claude's counts of the first BIG_MODEL_SAMPLE held-out examples, priced for
    # the default model (claude-sonnet-4-6: no prefill, so no request ends in an assistant turn)
    model = svc.settings.tuner_claude_model
    assert model == "claude-sonnet-4-6"
    assert dep.big_model_cost_per_1k_usd == pytest.approx(_expected_big_model_per_1k(held[:BIG_MODEL_SAMPLE], model))
    counted = claude.count_requests
    assert len(counted) == 2 * BIG_MODEL_SAMPLE and len(held) > BIG_MODEL_SAMPLE
    assert all(r["model"] == model and r["system"] == SYSTEM for r in counted)
    assert all([m["role"] for m in r["messages"]] == ["user"] for r in counted)
    assert counted[0]["messages"] == [{"role": "user", "content": held[0].prompt}]
    assert counted[1]["messages"] == [{"role": "user", "content": held[0].prompt + REFERENCE_SEPARATOR + held[0].reference}]
    assert counted[3]["messages"] == [{"role": "user", "content": held[1].prompt + REFERENCE_SEPARATOR + held[1].response}]
    # counting is free: the ledger has no Claude entry
    with db.session() as s:
        assert s.exec(select(SpendEntry).where(SpendEntry.kind == "claude_tokens")).all() == []

    curl = curl_example(dep, svc.client.endpoint_base_url)
    assert f"/{dep.endpoint_id}/openai/v1/chat/completions" in curl
    assert "$RUNPOD_API_KEY" in curl and RP_KEY not in curl and HF_KEY not in curl
    assert '"model": "acme/tuner-support-1"' in curl

    # the OpenAI-compatible route answers with usage for that model name
    chat = svc.client.chat(dep.endpoint_id, dep.model_ref, [{"role": "user", "content": "hi"}])
    assert chat["usage"]["completion_tokens"] == 16

    removed = svc.undeploy(dep.id)
    assert removed.status == "removed" and removed.removed_at is not None
    assert fake.live_endpoints == []
    _wait(lambda: fake.live_templates == [], what="the template to be deleted")


def test_few_held_out_examples_all_counted(db, fake, monkeypatch, claude):
    pid, rid = _project_run(db, n_test=2)
    svc = _service(db, fake, monkeypatch, token_counter=_counter(claude, db))
    dep = svc.deploy(pid, rid)
    with db.session() as s:
        val = s.exec(select(Example).where(Example.split == "val")).one()
    # sample = both test examples, then the val one (test first, then val, then train)
    sample = _test_examples(db, pid) + [val]
    assert len(fake.jobs) == SMOKE_REQUESTS == 3
    assert [j.payload["messages"][-1]["content"] for j in fake.jobs.values()] == [e.prompt for e in sample]
    assert len(claude.count_requests) == 2 * 4  # 2 test + val + train
    with db.session() as s:
        train = s.exec(select(Example).where(Example.split == "train")).one()
    assert dep.big_model_cost_per_1k_usd == pytest.approx(
        _expected_big_model_per_1k(sample + [train], svc.settings.tuner_claude_model))
    assert dep.cost_per_1k_usd == pytest.approx(PRICE_48 * 1.5 * 1000)


def test_without_examples_smoke_prompt_and_no_big_model_cost(db, fake, monkeypatch, claude):
    pid, rid = _project_run(db, with_examples=False)
    svc = _service(db, fake, monkeypatch, token_counter=_counter(claude, db))
    dep = svc.deploy(pid, rid)
    assert dep.status == "healthy" and dep.big_model_cost_per_1k_usd is None
    (job,) = fake.jobs.values()
    assert job.payload["messages"] == [{"role": "system", "content": SYSTEM}, {"role": "user", "content": SMOKE_PROMPT}]
    assert claude.count_requests == []


def test_no_counter_or_failed_count_leaves_big_model_cost_unknown(db, fake, monkeypatch, claude, caplog):
    pid, rid = _project_run(db, n_test=3)
    dep = _service(db, fake, monkeypatch).deploy(pid, rid)
    assert dep.status == "healthy" and dep.big_model_cost_per_1k_usd is None and dep.cost_per_1k_usd

    # a rejected key: the endpoint stays up (counting is only the comparison), nothing leaks
    svc = _service(db, fake, monkeypatch, token_counter=_counter(claude, db, key="sk-ant-wrong"))
    dep2 = svc.deploy(pid, rid)
    assert dep2.status == "healthy" and dep2.big_model_cost_per_1k_usd is None
    assert dep2.endpoint_id in fake.live_endpoints
    assert "big-model cost not measured" in caplog.text and "401" in caplog.text
    assert "sk-ant-wrong" not in caplog.text
    with pytest.raises(ClaudeAPIError, match="401"):
        svc.big_model_cost_per_1k(pid, rid)


def test_never_healthy_cleans_up(db, fake, monkeypatch):
    fake.healthy = False
    pid, rid = _project_run(db)
    t = [0.0]
    svc = _service(db, fake, monkeypatch, ready_timeout_s=60, clock=lambda: t[0],
                   sleep=lambda s: t.__setitem__(0, t[0] + 10))
    with pytest.raises(DeployError) as err:
        svc.deploy(pid, rid)
    text = str(err.value)
    assert "never became healthy within 60s" in text and "IN_QUEUE" in text and "throttled 1" in text
    assert HF_KEY not in text and RP_KEY not in text and "Clean-up" not in text
    assert fake.live_endpoints == []
    with db.session() as s:
        dep = s.exec(select(Deployment)).one()
    assert dep.status == "failed" and dep.endpoint_id and dep.removed_at is not None
    assert any(p.endswith("/cancel/" + next(iter(fake.jobs))) for _, p, _ in fake.requests)
    _wait(lambda: fake.live_templates == [], what="the template to be deleted")


@pytest.mark.parametrize("status", ["FAILED", "TIMED_OUT"])
def test_smoke_failed_cleans_up(db, fake, monkeypatch, status):
    fake.smoke_fails, fake.fail_status = True, status
    pid, rid = _project_run(db)
    svc = _service(db, fake, monkeypatch)
    with pytest.raises(DeployError, match=f"smoke request ended {status}") as err:
        svc.deploy(pid, rid)
    if status == "FAILED":
        assert "CUDA out of memory" in str(err.value)
    # the template is still "in use" right after its endpoint's deletion: not a clean-up failure
    assert "Clean-up" not in str(err.value)
    assert fake.live_endpoints == []
    with db.session() as s:
        assert s.exec(select(Deployment)).one().status == "failed"
    assert spend.total(db, kind="endpoint") == 0.0
    _wait(lambda: fake.live_templates == [], what="the template to be deleted")


def test_worker_error_output_fails_the_smoke_test(db, fake, monkeypatch):
    """worker-vllm reports engine errors as a COMPLETED job with [{"error": ...}] output."""
    fake.worker_error = "vLLM returned HTTP 500: engine core died (CUDA error: illegal memory access)"
    fake.template_in_use_s = 5.0
    pid, rid = _project_run(db)
    svc = _service(db, fake, monkeypatch)
    with pytest.raises(DeployError) as err:
        svc.deploy(pid, rid)
    text = str(err.value)
    assert "answered the smoke request with an error" in text and "engine core died" in text
    assert "Clean-up" not in text and RP_KEY not in text and HF_KEY not in text
    assert fake.status_log[-1] == "COMPLETED" and len(fake.jobs) == 1  # stopped at the first
    assert fake.live_endpoints == []  # nothing billing
    with db.session() as s:
        dep = s.exec(select(Deployment)).one()
    assert dep.status == "failed" and dep.removed_at is not None and dep.cost_per_1k_usd is None
    assert spend.total(db, kind="endpoint") == 0.0
    # the refused template is recorded, then deleted by the background retry
    (row,) = _cleanup_rows(db)
    assert row.template_name == template_name(dep) and row.deployment_id == dep.id
    _wait(lambda: fake.live_templates == [], timeout=60, what="the template to be deleted")
    assert fake.template_delete_refusals >= 1
    _wait(lambda: _cleanup_rows(db)[0].done_at is not None, what="the clean-up row to be done")


def test_worker_rejects_input_it_cannot_serve(db, fake, monkeypatch):
    """The fake's worker answers a max_tokens beyond MAX_MODEL_LEN as vLLM does (error output)."""
    settings = _settings(fake, monkeypatch)
    client = ServerlessClient(settings)
    tid = client.create_template("tuner-x", "img", {"MODEL_NAME": "m", "MAX_MODEL_LEN": "2048"})
    eid = client.create_endpoint("tuner-x", tid)
    job = client.submit(eid, {"messages": [{"role": "user", "content": "hi"}],
                              "sampling_params": {"max_tokens": 4096}})
    out = client.run_sync(eid, {"prompt_typo": "hi"})
    assert out["status"] == "COMPLETED" and "Job input must contain" in out["output"][0]["error"]["message"]
    for _ in range(5):
        st = client.status(eid, job)
    assert st["status"] == "COMPLETED" and "maximum context length" in st["output"][0]["error"]["message"]
    svc = DeployService(db, settings, client, poll_s=0.0, templates=_cleaner(db, client))
    with pytest.raises(DeployError, match="maximum context length"):
        svc._checked_output(st)


def test_running_status_is_pending(db, fake, monkeypatch):
    """RUNNING is a documented job status (a worker has the job): keep polling."""
    fake.queue_polls, fake.running_polls, fake.progress_polls = 1, 3, 0
    pid, rid = _project_run(db, n_test=1)
    dep = _service(db, fake, monkeypatch).deploy(pid, rid)
    assert dep.status == "healthy" and dep.endpoint_id in fake.live_endpoints
    assert fake.status_log[:5] == ["IN_QUEUE", "RUNNING", "RUNNING", "RUNNING", "COMPLETED"]


def test_undeploy_succeeds_while_the_template_is_still_in_use(db, fake, monkeypatch):
    """RunPod refuses the template for a while after its endpoint is deleted: Undeploy
    reports success once the endpoint is gone and the template follows in the background."""
    fake.template_in_use_s = 3.0
    pid, rid = _project_run(db, n_test=1)
    svc = _service(db, fake, monkeypatch)
    dep = svc.deploy(pid, rid)
    removed = svc.undeploy(dep.id)
    # returned without waiting out the refusal: the endpoint is gone, the template not yet
    assert removed.status == "removed" and removed.removed_at is not None
    assert fake.live_endpoints == [] and template_name(dep) in fake.live_templates
    with db.session() as s:
        assert s.get(Deployment, dep.id).status == "removed"
    assert svc.active(pid) == []
    _wait(lambda: fake.template_delete_refusals >= 1, what="a refused delete")
    _wait(lambda: fake.live_templates == [], timeout=60, what="the template to be deleted")
    (row,) = _cleanup_rows(db)
    _wait(lambda: _cleanup_rows(db)[0].done_at is not None, what="the clean-up row to be done")
    assert row.template_name == template_name(dep)
    assert svc.undeploy(dep.id).status == "removed"  # a second click changes nothing


def test_template_refused_past_the_retry_window_is_deleted_by_the_reaper_after_restart(
    db, fake, monkeypatch, tmp_path
):
    from jobs.reaper import Reaper
    from jobs.runpod_api import RunPodAPI
    from tests.fakes.runpod_fake import FakeRunPod

    fake.template_in_use_s = 3600.0  # longer than the background retries last
    pid, rid = _project_run(db, n_test=1)
    svc = _service(db, fake, monkeypatch, window_s=0.3)
    dep = svc.deploy(pid, rid)
    assert svc.undeploy(dep.id).status == "removed"
    _wait(lambda: _cleanup_rows(db)[0].attempts >= 1, what="a background attempt")
    svc.templates.close(timeout=10)  # the background retries gave up (window) or are stopped
    (row,) = _cleanup_rows(db)
    assert row.done_at is None and row.gave_up_at is None and row.attempts >= 1
    assert "in use" in row.last_error and template_name(dep) in fake.live_templates

    # the bot restarts: a new process, same database; RunPod stops counting the template as used
    fake.template_in_use_s = 0.0
    with FakeRunPod.running(run_pods=False, api_key=RP_KEY) as rp:
        rp.add_graphql_handler(fake.graphql)
        monkeypatch.setenv("RUNPOD_API_BASE_URL", rp.base_url)
        settings = Settings(_env_file=None)
        db2 = Database(db.url)
        client = ServerlessClient(settings)
        reaper = Reaper(db2, RunPodAPI(settings), 60, templates=_cleaner(db2, client))
        assert reaper.run_once() == []  # no pods; the template step ran in the same pass
    assert fake.live_templates == []
    (row,) = _cleanup_rows(db2)
    assert row.done_at is not None and row.attempts >= 2


def test_model_not_on_hub_is_explained(db, fake, monkeypatch):
    pid, rid = _project_run(db, artifact="/var/tuner/artifacts/run-1")
    svc = _service(db, fake, monkeypatch)
    with pytest.raises(DeployError, match="not on the Hugging Face Hub.*HF_TOKEN"):
        svc.deploy(pid, rid)
    assert fake.templates == {} and fake.endpoints == {}


def test_bare_repo_gets_namespace_and_values_are_escaped(db, fake, monkeypatch):
    pid, rid = _project_run(db, artifact='hf://model"with\\quote')
    svc = _service(db, fake, monkeypatch)
    dep = svc.deploy(pid, rid)
    # an unescaped quote would be a GraphQL syntax error on the fake (as on RunPod)
    assert fake.templates[dep.template_id]["env"]["MODEL_NAME"] == 'acme/model"with\\quote'
    assert gql_escape('a"b\\c\n') == 'a\\"b\\\\c\\n'
    svc.undeploy(dep.id)
    assert fake.live_endpoints == []
    _wait(lambda: template_name(dep) not in fake.live_templates, what="the template to be deleted")


def test_delete_refused_while_workers_set(fake, monkeypatch):
    """The fake enforces RunPod's rule, so the client's scale-to-zero step is exercised."""
    settings = _settings(fake, monkeypatch)
    client = ServerlessClient(settings)
    tid = client.create_template("tuner-x", "img", {})
    eid = client.create_endpoint("tuner-x", tid, workers_max=1)
    out = fake.graphql(f'mutation {{ deleteEndpoint(id: "{eid}") }}')
    assert out is not None and "must have min and max workers set to 0" in out["errors"][0]["message"]
    with pytest.raises(TemplateInUse, match="in use"):
        client.delete_template("tuner-x")  # still used by the endpoint
    client.delete_endpoint(eid)
    with pytest.raises(TemplateInUse, match="in use"):
        client.delete_template("tuner-x")  # RunPod's window after the endpoint's deletion
    assert fake.live_endpoints == [] and fake.live_templates == ["tuner-x"]
    fake.template_in_use_s = 0.0
    client.delete_template("tuner-x")
    assert fake.live_templates == []
    client.delete_template("tuner-x")  # already gone: a retry after a success is not an error


class _Killed(BaseException):
    """The bot process dying (kill -9 / restart) while it waits for the smoke job."""


def test_deploy_after_crash_mid_deploy_removes_the_leftover_endpoint(db, fake, monkeypatch):
    # The queued smoke job keeps a leftover endpoint trying to start GPU workers: a
    # restarted deploy (the graph re-runs the node) must not leave it behind.
    fake.queue_polls = 5
    pid, rid = _project_run(db)

    def die(_s: float) -> None:
        raise _Killed()

    with pytest.raises(_Killed):
        _service(db, fake, monkeypatch, sleep=die).deploy(pid, rid)
    (stale_ep,) = fake.live_endpoints
    with db.session() as s:
        stale = s.exec(select(Deployment)).one()
    assert stale.status == "creating"

    fake.queue_polls = 0
    dep = _service(db, fake, monkeypatch).deploy(pid, rid)
    assert dep.status == "healthy" and dep.id != stale.id
    assert fake.live_endpoints == [dep.endpoint_id] and stale_ep not in fake.live_endpoints
    _wait(lambda: fake.live_templates == [template_name(dep)], what="the stale template to be deleted")
    with db.session() as s:
        old = s.get(Deployment, stale.id)
    assert old.status == "failed" and old.removed_at is not None
