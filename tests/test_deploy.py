"""Deploy to RunPod serverless through the real runpod SDK against a loopback fake."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlmodel import select

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
from jobs.serverless import ServerlessClient, gql_escape
from storage import spend
from storage.db import Database
from storage.models import Dataset, Deployment, Example, Project, Run, SpendEntry, TaskSpecRow
from storage.settings import Settings
from tests.fakes.anthropic_fake import API_KEY, MESSAGE_OVERHEAD_TOKENS, FakeAnthropic, count_text_tokens
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


def _project_run(
    db: Database, artifact: str | None = "hf://acme/tuner-support-1", *, n_test: int = 10, with_examples: bool = True
) -> tuple[int, int]:
    """A project with an approved spec and a dataset: train/val examples first, then test ones."""
    with db.session() as s:
        p = Project(thread_id="T:C:1.0", team_id="T", channel_id="C", thread_ts="1.0", created_by="U", name="support")
        s.add(p)
        s.commit()
        s.refresh(p)
        s.add(TaskSpecRow(project_id=p.id, approved=True,
                          spec={"system_prompt": SYSTEM, "max_output_tokens": 300}))
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


def _service(db, fake, monkeypatch, **kw) -> DeployService:
    settings = _settings(fake, monkeypatch)
    return DeployService(db, settings, ServerlessClient(settings), poll_s=0.0, **kw)


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

    # three smoke jobs, one after another, each IN_QUEUE -> IN_PROGRESS -> COMPLETED via /status
    assert fake.status_log == ["IN_QUEUE", "IN_QUEUE", "IN_PROGRESS", "IN_PROGRESS", "COMPLETED"] * SMOKE_REQUESTS
    # ... on the first held-out (test split) prompts, with the spec's system prompt and output cap
    held = _test_examples(db, pid)
    payloads = [j.payload for j in fake.jobs.values()]
    assert [p["messages"] for p in payloads] == [
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": e.prompt}] for e in held[:SMOKE_REQUESTS]
    ]
    assert all(p["sampling_params"]["max_tokens"] == 300 for p in payloads)

    # fine-tuned cost: mean execution time x AMPERE_24 price, per 1k requests
    exec_s = [1.5, 2.0, 2.5]
    assert dep.cost_per_1k_usd == pytest.approx(0.00019 * sum(exec_s) / 3 * 1000)
    assert spend.by_kind(db, project_id=pid)["endpoint"] == pytest.approx(0.00019 * sum(exec_s))

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
    assert fake.live_endpoints == [] and fake.live_templates == []


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
    assert dep.cost_per_1k_usd == pytest.approx(0.00019 * 1.5 * 1000)


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
    assert HF_KEY not in text and RP_KEY not in text
    assert fake.live_endpoints == [] and fake.live_templates == []
    with db.session() as s:
        dep = s.exec(select(Deployment)).one()
    assert dep.status == "failed" and dep.endpoint_id and dep.removed_at is not None
    assert any(p.endswith("/cancel/" + next(iter(fake.jobs))) for _, p, _ in fake.requests)


def test_smoke_failed_cleans_up(db, fake, monkeypatch):
    fake.smoke_fails = True
    pid, rid = _project_run(db)
    svc = _service(db, fake, monkeypatch)
    with pytest.raises(DeployError, match="smoke request ended FAILED: CUDA out of memory"):
        svc.deploy(pid, rid)
    assert fake.live_endpoints == [] and fake.live_templates == []
    with db.session() as s:
        assert s.exec(select(Deployment)).one().status == "failed"
    assert spend.total(db, kind="endpoint") == 0.0


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
    assert template_name(dep) not in fake.live_templates and fake.live_endpoints == []


def test_delete_refused_while_workers_set(fake, monkeypatch):
    """The fake enforces RunPod's rule, so the client's scale-to-zero step is exercised."""
    settings = _settings(fake, monkeypatch)
    client = ServerlessClient(settings)
    tid = client.create_template("tuner-x", "img", {})
    eid = client.create_endpoint("tuner-x", tid, workers_max=1)
    out = fake.graphql(f'mutation {{ deleteEndpoint(id: "{eid}") }}')
    assert out is not None and "must have min and max workers set to 0" in out["errors"][0]["message"]
    client.delete_endpoint(eid)
    client.delete_template("tuner-x")
    assert fake.live_endpoints == [] and fake.live_templates == []


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
    assert fake.live_templates == [template_name(dep)]
    with db.session() as s:
        old = s.get(Deployment, stale.id)
    assert old.status == "failed" and old.removed_at is not None
