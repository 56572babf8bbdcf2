"""ClaudeClient against the loopback FakeAnthropic, through the real anthropic SDK."""

from __future__ import annotations

import json

import pytest
from pydantic import BaseModel
from sqlmodel import select

from agent.spec import DEFINE_SYSTEM, DefineTurn
from jobs.claude import ClaudeAPIError, ClaudeClient
from jobs.llm import LLMOutputError
from storage import spend
from storage.db import Database
from storage.models import SpendEntry
from storage.settings import Settings
from tests.fakes.anthropic_fake import (
    API_KEY,
    FakeAnthropic,
    Reply,
    schema_title,
    system_text,
)


class Verdict(BaseModel):
    winner: str
    reason: str


@pytest.fixture()
def db(project_db):
    return project_db


def _client(fake: FakeAnthropic, db: Database, key: str = API_KEY) -> ClaudeClient:
    settings = Settings(
        _env_file=None, anthropic_api_key=key, anthropic_base_url=fake.base_url
    )
    return ClaudeClient(settings, db, max_retries=0)


def test_structured_parse_ok_and_wire_format(db):
    def responder(req):
        assert schema_title(req) == "Verdict"
        return json.dumps({"winner": "A", "reason": "clearer"})

    with FakeAnthropic.running(responder) as fake:
        out = _client(fake, db).structured(
            system="judge", messages=[{"role": "user", "content": "compare"}],
            schema=Verdict, purpose="judge", project_id=1, max_tokens=300,
        )
        reqs = fake.message_requests
    assert out == Verdict(winner="A", reason="clearer")
    assert len(reqs) == 1
    req = reqs[0]
    assert req["output_config"]["format"]["type"] == "json_schema"
    assert set(req["output_config"]["format"]["schema"]["required"]) == {"winner", "reason"}
    assert "temperature" not in req and "top_p" not in req and "tool_choice" not in req
    assert req["model"] == "claude-sonnet-4-6" and req["max_tokens"] == 300


def test_nested_schema_routed_by_system_marker(db):
    def responder(req):
        if system_text(req).startswith("[tuner:define]"):
            return json.dumps({"ready": False, "question": "What language?", "spec": None})
        return "nope"

    with FakeAnthropic.running(responder) as fake:
        turn = _client(fake, db).structured(
            system=DEFINE_SYSTEM, messages=[{"role": "user", "content": "summarise tickets"}],
            schema=DefineTurn, purpose="define",
        )
    assert turn.ready is False and turn.question == "What language?"


def test_malformed_twice_then_valid(db):
    replies = iter(["{not json", json.dumps({"winner": "A"}), json.dumps({"winner": "B", "reason": "r"})])

    with FakeAnthropic.running(lambda req: next(replies)) as fake:
        out = _client(fake, db).structured(
            system="s", messages=[{"role": "user", "content": "q"}], schema=Verdict,
            purpose="judge", project_id=1,
        )
        reqs = fake.message_requests
    assert out.winner == "B"
    assert len(reqs) == 3
    # each retry carries the bad reply and a corrective note
    assert [m["role"] for m in reqs[2]["messages"]] == ["user", "assistant", "user", "assistant", "user"]
    assert "not valid JSON" in reqs[1]["messages"][-1]["content"]
    assert "schema error" in reqs[2]["messages"][-1]["content"]
    # every attempt is in the ledger
    with db.session() as s:
        rows = s.query(SpendEntry).all()
    assert len(rows) == 3 and all(r.detail == "judge" and r.project_id == 1 for r in rows)


def test_refusal_and_max_tokens_are_retried(db):
    replies = iter([Reply("", "refusal"), Reply('{"winner": "A", "rea', "max_tokens"),
                    Reply(json.dumps({"winner": "A", "reason": "ok"}))])
    with FakeAnthropic.running(lambda req: next(replies)) as fake:
        out = _client(fake, db).structured(
            system="s", messages=[{"role": "user", "content": "q"}], schema=Verdict, purpose="p"
        )
        assert len(fake.message_requests) == 3
    assert out.reason == "ok"


def test_always_malformed_raises_after_three(db):
    with FakeAnthropic.running(lambda req: "[]") as fake:
        with pytest.raises(LLMOutputError) as ei:
            _client(fake, db).structured(
                system="s", messages=[{"role": "user", "content": "q"}], schema=Verdict,
                purpose="sample",
            )
        assert len(fake.message_requests) == 3
    msg = str(ei.value)
    assert "Verdict" in msg and "3 attempts" in msg and API_KEY not in msg


def test_wrong_key_gives_clear_error(db):
    with FakeAnthropic.running(lambda req: "{}") as fake:
        client = _client(fake, db, key="sk-wrong")
        with pytest.raises(ClaudeAPIError, match="401") as ei:
            client.structured(system="s", messages=[{"role": "user", "content": "q"}],
                              schema=Verdict, purpose="p")
        assert "sk-wrong" not in str(ei.value)
        with pytest.raises(ClaudeAPIError, match="ANTHROPIC_API_KEY"):
            client.ping()
        assert fake.message_requests == []


def test_ping_ok(db):
    with FakeAnthropic.running(lambda req: "{}") as fake:
        assert "claude-sonnet-4-6" in _client(fake, db).ping()


def test_missing_key_is_clear(db):
    c = ClaudeClient(Settings(_env_file=None, anthropic_api_key=None), db)
    with pytest.raises(ClaudeAPIError, match="ANTHROPIC_API_KEY is not set"):
        c.ping()


def test_usage_recorded_with_cost(db):
    with FakeAnthropic.running(lambda req: json.dumps({"winner": "A", "reason": "x" * 400})) as fake:
        _client(fake, db).structured(
            system="s", messages=[{"role": "user", "content": "q"}], schema=Verdict,
            purpose="generate", project_id=1, model="claude-haiku-4-5",
        )
    with db.session() as s:
        (row,) = s.query(SpendEntry).all()
    assert row.kind == "claude_tokens" and row.detail == "generate"
    assert row.quantity > 100  # output ~ 100 tokens of the 400-char reason
    assert row.usd == pytest.approx(spend.total(db, project_id=1))
    assert row.usd > 0


def test_injected_sdk_client_is_used(db):
    import anthropic

    with FakeAnthropic.running(lambda req: json.dumps({"winner": "B", "reason": "r"})) as fake:
        sdk = anthropic.Anthropic(api_key=API_KEY, base_url=fake.base_url, max_retries=0)
        settings = Settings(_env_file=None, anthropic_api_key=None)  # not needed when injected
        out = ClaudeClient(settings, db, client=sdk).structured(
            system="s", messages=[{"role": "user", "content": "q"}], schema=Verdict,
            purpose="judge", max_tokens=16000,
        )
    assert out.winner == "B"


def test_rate_limited_requests_are_retried_by_sdk(db):
    with FakeAnthropic.running(
        lambda req: json.dumps({"winner": "A", "reason": "r"}), rate_limit_per_s=2
    ) as fake:
        settings = Settings(_env_file=None, anthropic_api_key=API_KEY, anthropic_base_url=fake.base_url)
        client = ClaudeClient(settings, db, max_retries=3)
        for _ in range(3):
            client.structured(system="s", messages=[{"role": "user", "content": "q"}],
                              schema=Verdict, purpose="p")
        assert fake.rate_limited >= 1 and len(fake.message_requests) == 3


def test_count_tokens_through_sdk_is_free_and_measured(db):
    from tests.fakes.anthropic_fake import MESSAGE_OVERHEAD_TOKENS, count_text_tokens

    system = "You are a terse support agent; answer in English."
    ask = [{"role": "user", "content": "My invoice #4411 is wrong -- who can fix it?"}]
    answer = "Billing can: reply with the invoice number and we'll re-issue it today."
    with FakeAnthropic.running(lambda req: "{}") as fake:
        client = _client(fake, db)
        tin = client.count_tokens(system, ask)
        full = client.count_tokens(system, ask + [{"role": "assistant", "content": answer}],
                                   model="claude-haiku-4-5")
        bare = client.count_tokens("", ask)
        reqs = fake.count_requests
        assert fake.message_requests == []
    # numbers are the fake tokenizer's counts of exactly what was sent
    expected_in = count_text_tokens(system) + MESSAGE_OVERHEAD_TOKENS + count_text_tokens(ask[0]["content"])
    assert tin == expected_in
    assert full - tin == MESSAGE_OVERHEAD_TOKENS + count_text_tokens(answer)
    assert bare == tin - count_text_tokens(system)
    # wire format: the count_tokens route, model defaulted from settings, no generation fields
    assert [r["model"] for r in reqs] == ["claude-sonnet-4-6", "claude-haiku-4-5", "claude-sonnet-4-6"]
    assert reqs[0]["system"] == system and "system" not in reqs[2]
    assert all("max_tokens" not in r and "output_config" not in r for r in reqs)
    # counting is free: nothing lands in the spend ledger
    with db.session() as s:
        assert s.exec(select(SpendEntry)).all() == []


def test_count_tokens_errors_are_clear(db):
    import anthropic

    with FakeAnthropic.running(lambda req: "{}") as fake:
        with pytest.raises(ClaudeAPIError, match="401") as ei:
            _client(fake, db, key="sk-wrong").count_tokens("s", [{"role": "user", "content": "q"}])
        assert "sk-wrong" not in str(ei.value)
        with pytest.raises(ClaudeAPIError, match="400: .*messages.0.role"):
            _client(fake, db).count_tokens("s", [{"role": "system", "content": "q"}])
        # the fake, like the API, rejects generation-only fields on this route
        sdk = anthropic.Anthropic(api_key=API_KEY, base_url=fake.base_url, max_retries=0)
        with pytest.raises(anthropic.BadRequestError, match="max_tokens: Extra inputs"):
            sdk.messages.count_tokens(model="claude-sonnet-4-6", messages=[{"role": "user", "content": "q"}],
                                      extra_body={"max_tokens": 10})
        assert fake.count_requests == []


def test_fake_rejects_unknown_model_ids_as_the_api_does(db):
    """404 not_found_error "model: <id>" for an id outside the SDK's model list, on both routes."""
    import anthropic

    from tests.fakes.anthropic_fake import KNOWN_MODELS

    bad = "claude-sonnet-9-9"
    assert bad not in KNOWN_MODELS
    ask = [{"role": "user", "content": "q"}]
    with FakeAnthropic.running(lambda req: json.dumps({"winner": "A", "reason": "r"})) as fake:
        sdk = anthropic.Anthropic(api_key=API_KEY, base_url=fake.base_url, max_retries=0)
        with pytest.raises(anthropic.NotFoundError) as ei:
            sdk.messages.create(model=bad, max_tokens=10, messages=ask)
        assert ei.value.status_code == 404
        assert ei.value.body["error"] == {"type": "not_found_error", "message": f"model: {bad}"}
        assert ei.value.body["type"] == "error" and ei.value.body["request_id"].startswith("req_")
        with pytest.raises(anthropic.NotFoundError, match=f"model: {bad}"):
            sdk.messages.count_tokens(model=bad, messages=ask)
        client = _client(fake, db)
        with pytest.raises(ClaudeAPIError, match=f"404: not_found_error: model: {bad}"):
            client.structured(system="s", messages=ask, schema=Verdict, purpose="p", model=bad)
        with pytest.raises(ClaudeAPIError, match="404"):
            client.count_tokens("s", ask, model=bad)
        assert fake.requests == []  # refused requests are not served
        client.structured(system="s", messages=ask, schema=Verdict, purpose="p")  # the default is real


def test_fake_rejects_prefill_on_models_without_it(db):
    """A conversation ending in an assistant turn is a 400 on claude-sonnet-4-6 (no prefill),
    on /v1/messages and /v1/messages/count_tokens; a 4.5 model still accepts it."""
    import anthropic

    from tests.fakes.anthropic_fake import PREFILL_UNSUPPORTED

    prefill = [{"role": "user", "content": "Answer A or B."}, {"role": "assistant", "content": "The answer is"}]
    with FakeAnthropic.running(lambda req: " A") as fake:
        sdk = anthropic.Anthropic(api_key=API_KEY, base_url=fake.base_url, max_retries=0)
        for call in (lambda m: sdk.messages.create(model=m, max_tokens=10, messages=prefill),
                     lambda m: sdk.messages.count_tokens(model=m, messages=prefill)):
            with pytest.raises(anthropic.BadRequestError) as ei:
                call("claude-sonnet-4-6")
            assert ei.value.body["error"] == {"type": "invalid_request_error", "message": PREFILL_UNSUPPORTED}
            call("claude-haiku-4-5")  # supports prefill: accepted
        with pytest.raises(ClaudeAPIError, match="400: invalid_request_error: This model does not support"):
            _client(fake, db).count_tokens("s", prefill)


def test_configured_model_ids_are_real():
    """Every Claude id the settings default to is one the SDK (and so the API) knows."""
    from tests.fakes.anthropic_fake import KNOWN_MODELS

    s = Settings(_env_file=None)
    assert {s.tuner_claude_model, s.tuner_judge_model} <= KNOWN_MODELS
