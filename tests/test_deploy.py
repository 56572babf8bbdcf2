"""Deploy to RunPod serverless through the real runpod SDK against a loopback fake."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlmodel import select

from jobs.deploy import DeployError, DeployService, curl_example, template_name
from jobs.serverless import ServerlessClient, gql_escape
from storage import spend
from storage.db import Database
from storage.models import Deployment, Example, Project, Run
from storage.settings import Settings
from tests.fakes.runpod_serverless_fake import FakeServerless

RP_KEY = "rp-secret-key-123"
HF_KEY = "hf_secret_token_456"


@pytest.fixture
def db(tmp_path) -> Database:
    return Database(f"sqlite:///{tmp_path / 't.db'}")


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


def _project_run(db: Database, artifact: str | None = "hf://acme/tuner-support-1") -> tuple[int, int]:
    with db.session() as s:
        p = Project(thread_id="T:C:1.0", team_id="T", channel_id="C", thread_ts="1.0", created_by="U", name="support")
        s.add(p)
        s.commit()
        s.refresh(p)
        for i in range(4):
            s.add(Example(project_id=p.id, prompt="q" * 400, response="a" * 200, content_hash=f"h{i}"))
        r = Run(project_id=p.id, status="succeeded", artifact_uri=artifact)
        s.add(r)
        s.commit()
        s.refresh(r)
        return p.id, r.id


def _service(db, fake, monkeypatch, **kw) -> DeployService:
    settings = _settings(fake, monkeypatch)
    return DeployService(db, settings, ServerlessClient(settings), poll_s=0.0, **kw)


def test_deploy_happy_path(db, fake, monkeypatch):
    fake.queue_polls, fake.progress_polls = 2, 2
    pid, rid = _project_run(db)
    svc = _service(db, fake, monkeypatch)
    dep = svc.deploy(pid, rid)

    assert dep.status == "healthy" and dep.endpoint_id in fake.live_endpoints
    ep = fake.endpoints[dep.endpoint_id]
    assert ep["name"].startswith("tuner-") and ep["workersMin"] == 0 and ep["workersMax"] == 1
    tpl = fake.templates[dep.template_id]
    assert tpl["isServerless"] is True
    assert tpl["imageName"] == Settings(_env_file=None).tuner_vllm_image
    assert tpl["env"]["MODEL_NAME"] == "acme/tuner-support-1"
    assert tpl["env"]["HF_TOKEN"] == HF_KEY  # passed as env only

    # the smoke job walked IN_QUEUE -> IN_PROGRESS -> COMPLETED via /status polls
    assert fake.status_log == ["IN_QUEUE", "IN_QUEUE", "IN_PROGRESS", "IN_PROGRESS", "COMPLETED"]
    # cost: 1.5 s execution on AMPERE_24 at 0.00019 $/s, per 1k requests
    assert dep.cost_per_1k_usd == pytest.approx(0.00019 * 1.5 * 1000)
    # big model: 100 in / 50 out tokens per request on sonnet (3/15 per M) x 1000
    assert dep.big_model_cost_per_1k_usd == pytest.approx((100 * 3 + 50 * 15) / 1e6 * 1000)
    assert spend.by_kind(db, project_id=pid)["endpoint"] == pytest.approx(0.00019 * 1.5)

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
