"""Socket Mode transport and the SlackNotifier presenter, both against FakeSlack."""

from __future__ import annotations

import json
from typing import Any

import pytest
from slack_bolt.adapter.socket_mode import SocketModeHandler
from slack_sdk import WebClient
from sqlmodel import select
from slack_sdk.errors import SlackApiError

from agent.ports import Action
from bot import blocks as B
from bot.app import create_app
from bot.handlers import ALREADY_HANDLED, Services
from bot.presenter import SlackNotifier
from bot.worker import ThreadWorker
from storage.db import Database
from storage.models import MessageRef
from storage.settings import Settings
from tests.fakes.slack_fake import (
    APP_TOKEN, BOT_TOKEN, TEAM_ID, FakeSlack, block_action, mention_pair, slash_command,
)
from tests.test_bot_http import ScriptedRunner

CH = "C0TUNING"
TID = f"{TEAM_ID}:{CH}:100.000001"


@pytest.fixture
def fake():
    f = FakeSlack().start()
    yield f
    f.stop()


@pytest.fixture
def db(tmp_path: Any) -> Database:
    return Database(f"sqlite:///{tmp_path}/tuner.db")


def _notifier(fake: FakeSlack, db: Database) -> SlackNotifier:
    return SlackNotifier(WebClient(token=BOT_TOKEN, base_url=fake.base_url), db)


# ---------------------------------------------------------------------- Socket Mode
def test_socket_mode_mention_click_and_command(fake: FakeSlack, db: Database, tmp_path) -> None:
    settings = Settings(_env_file=None, slack_bot_token=BOT_TOKEN,  # type: ignore[call-arg]
                        slack_app_token=APP_TOKEN, tuner_slack_api_url=fake.base_url,
                        database_url=f"sqlite:///{tmp_path}/tuner.db")
    runner = ScriptedRunner(db)
    worker = ThreadWorker(max_workers=2)
    app = create_app(settings, runner, Services(db=db, worker=worker))
    handler = SocketModeHandler(app, APP_TOKEN)
    handler.connect()
    try:
        fake.wait_socket()
        assert fake.calls_to("apps.connections.open")[0].token == APP_TOKEN

        app_mention, message = mention_pair("U1", CH, "100.000001", "classify tickets")
        e1 = fake.push("events_api", app_mention)
        e2 = fake.push("events_api", message)
        assert fake.wait_ack(e1)["envelope_id"] == e1
        fake.wait_ack(e2)
        fake.wait_for(lambda: runner.of("start"))
        assert worker.wait_idle(5)
        assert runner.of("start") == [(TID, "U1", "classify tickets")]

        e3 = fake.push("interactive", block_action(
            B.SAMPLES_APPROVE, B.encode_value("stale", TID), user="U1", channel=CH))
        fake.wait_ack(e3)
        eph = fake.wait_for(lambda: fake.ephemerals)
        assert eph[0]["text"] == ALREADY_HANDLED

        e4 = fake.push("slash_commands", slash_command("status", user="U1", channel=CH))
        ack = fake.wait_ack(e4)
        assert ack["payload"]["response_type"] == "ephemeral"
        assert "classify tickets" in ack["payload"]["text"]
    finally:
        handler.close()
        worker.shutdown(wait=False)


def test_socket_mode_rejects_wrong_app_token(fake: FakeSlack, db: Database, tmp_path) -> None:
    settings = Settings(_env_file=None, slack_bot_token=BOT_TOKEN,  # type: ignore[call-arg]
                        tuner_slack_api_url=fake.base_url)
    app = create_app(settings, ScriptedRunner(db), Services(db=db))
    handler = SocketModeHandler(app, "xapp-wrong")
    with pytest.raises(SlackApiError) as e:
        handler.connect()
    assert e.value.response["error"] == "invalid_auth"


def test_create_app_with_bad_bot_token_fails(fake: FakeSlack, db: Database) -> None:
    settings = Settings(_env_file=None, slack_bot_token="xoxb-bad",  # type: ignore[call-arg]
                        tuner_slack_api_url=fake.base_url)
    with pytest.raises(Exception) as e:
        create_app(settings, ScriptedRunner(db), Services(db=db))
    assert "invalid_auth" in str(e.value)


# ---------------------------------------------------------------------- presenter
def test_progress_posts_once_then_edits_and_survives_restart(fake: FakeSlack, db: Database) -> None:
    n = _notifier(fake, db)
    n.progress(TID, "train", "step 1/100", [Action("stop_run", "Stop", "7", "danger")])
    n.progress(TID, "train", "step 50/100")
    assert len(fake.calls_to("chat.postMessage")) == 1
    assert len(fake.calls_to("chat.update")) == 1
    thread = fake.thread(CH, "100.000001")
    assert len(thread) == 1 and thread[0]["text"] == "step 50/100"
    assert thread[0]["thread_ts"] == "100.000001"
    first_blocks = fake.calls_to("chat.postMessage")[0].args["blocks"]
    btn = first_blocks[1]["elements"][0]
    assert (btn["action_id"], btn["value"], btn["style"]) == ("stop_run", "7", "danger")

    restarted = _notifier(fake, db)  # new process, same DB
    restarted.progress(TID, "train", "done")
    assert len(fake.calls_to("chat.postMessage")) == 1
    assert fake.thread(CH, "100.000001")[0]["text"] == "done"
    # another key is another message
    restarted.progress(TID, "eval", "judging")
    assert len(fake.thread(CH, "100.000001")) == 2


def test_progress_reposts_when_message_was_deleted(fake: FakeSlack, db: Database) -> None:
    n = _notifier(fake, db)
    n.progress(TID, "train", "a")
    with fake._lock:
        fake.messages.clear()
    n.progress(TID, "train", "b")
    msgs = fake.thread(CH, "100.000001")
    assert [m["text"] for m in msgs] == ["b"]
    with db.session() as s:
        refs = s.exec(select(MessageRef)).all()
    assert [r.ts for r in refs] == [msgs[0]["ts"]]


def test_progress_update_failing_transiently_does_not_post_a_duplicate(fake: FakeSlack,
                                                                       db: Database) -> None:
    n = _notifier(fake, db)
    n.progress(TID, "train", "step 1/100")
    fake.fail["chat.update"] = "ratelimited"
    n.progress(TID, "train", "step 2/100")  # lost; the next update catches up
    n.progress(TID, "train", "step 3/100")
    msgs = fake.thread(CH, "100.000001")
    assert [m["text"] for m in msgs] == ["step 3/100"]
    assert len(fake.calls_to("chat.postMessage")) == 1


def test_rate_limited_messages_are_retried_not_lost(fake: FakeSlack, db: Database,
                                                   tmp_path) -> None:
    """Slack answers 429 + Retry-After when a thread gets busy: the production client
    (make_client) waits and retries instead of dropping the message."""
    from bot.app import make_client

    settings = Settings(_env_file=None, slack_bot_token=BOT_TOKEN,  # type: ignore[call-arg]
                        tuner_slack_api_url=fake.base_url)
    n = SlackNotifier(make_client(settings), db)
    fake.ratelimit["chat.postMessage"] = 2
    n.say(TID, "Dataset ready")
    assert [m["text"] for m in fake.thread(CH, "100.000001")] == ["Dataset ready"]
    assert len(fake.calls_to("chat.postMessage")) == 3


def test_upload_uses_three_step_v2_flow_into_thread(fake: FakeSlack, db: Database) -> None:
    n = _notifier(fake, db)
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 10
    n.upload(TID, "loss.png", png, "Eval loss", comment="run 3")
    methods = [c.method for c in fake.calls]
    i = methods.index("files.getUploadURLExternal")
    assert methods[i:i + 3] == ["files.getUploadURLExternal", "upload",
                                "files.completeUploadExternal"]
    (f,) = [f for f in fake.files.values() if f.get("content")]
    assert f["content"] == png and f["title"] == "Eval loss"
    assert (f["channel"], f["thread_ts"], f["initial_comment"]) == (CH, "100.000001", "run 3")


def test_say_and_error_post_in_thread_without_secrets(fake: FakeSlack, db: Database) -> None:
    n = _notifier(fake, db)
    n.say(TID, "hello")
    n.error(TID, "RunPod said 401 for key rpa_ABCDEF123 and Bearer abc.def; xoxb-1-2-3 too")
    texts = [m["text"] for m in fake.thread(CH, "100.000001")]
    assert texts[0] == "hello"
    assert texts[1].startswith(":warning:")
    for secret in ("rpa_ABCDEF123", "abc.def", "xoxb-1-2-3"):
        assert secret not in texts[1]


def test_top_level_thread_id_posts_to_channel(fake: FakeSlack, db: Database) -> None:
    _notifier(fake, db).say(f"{TEAM_ID}:{CH}:", "nightly report")
    call = fake.calls_to("chat.postMessage")[0]
    assert call.args["channel"] == CH and "thread_ts" not in call.args


def test_slack_errors_do_not_crash(fake: FakeSlack, db: Database, caplog) -> None:
    n = _notifier(fake, db)
    fake.fail["chat.postMessage"] = "ratelimited"
    n.say(TID, "lost")
    n.progress(TID, "k", "x")  # posts fine now (failure was once)
    assert "ratelimited" in caplog.text and BOT_TOKEN not in caplog.text
    bad = SlackNotifier(WebClient(token="xoxb-wrong", base_url=fake.base_url), db)
    bad.upload(TID, "a.txt", b"a", "a")
    assert "invalid_auth" in caplog.text and "xoxb-wrong" not in caplog.text


@pytest.mark.parametrize("payload,buttons", [
    ({"kind": "spec", "spec": {"name": "labeller", "description": "labels tickets",
                               "inputs": ["ticket"], "system_prompt": "You label.",
                               "example_count": 1000, "base_model": "llama"}},
     [B.SPEC_APPROVE, B.SPEC_CHANGE]),
    ({"kind": "samples", "round": 2,
      "examples": [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(8)]},
     [B.SAMPLES_APPROVE, B.SAMPLES_REGENERATE]),
    ({"kind": "launch", "estimate": {"gpu_type": "NVIDIA RTX A5000", "cloud_type": "SECURE",
                                     "price_per_hour": 0.29, "est_minutes": 30, "est_usd": 0.15,
                                     "spent_usd": 1.0, "budget_usd": 50.0,
                                     "price_is_live": True},
      "dataset": {"n_train": 900, "n_val": 50, "n_test": 50}}, [B.LAUNCH]),
    ({"kind": "deploy", "run_id": 3, "win_rate": 0.62, "ci_low": 0.55, "ci_high": 0.69},
     [B.DEPLOY, B.DEPLOY_SKIP]),
    ({"kind": "deployed", "deployment_id": 4, "curl": "curl https://x"}, [B.UNDEPLOY]),
    ({"kind": "question", "text": "What inputs does it get?"}, []),
])
def test_ask_renders_cards_with_interrupt_id(fake: FakeSlack, db: Database,
                                              payload: dict, buttons: list[str]) -> None:
    _notifier(fake, db).ask(TID, "int-42", payload)
    (msg,) = fake.thread(CH, "100.000001")
    blocks = msg["blocks"]
    assert len(blocks) <= 50
    elements = [e for b in blocks if b["type"] == "actions" for e in b["elements"]]
    assert [e["action_id"] for e in elements] == buttons
    for e in elements:
        assert B.decode_value(e["value"]) == ("int-42", TID)
    text = json.dumps(blocks)
    if payload["kind"] == "launch":
        assert "900 train" in text and "$0.29/h" in text and "$1.00 spent of $50.00" in text
        assert "NVIDIA RTX A5000 (SECURE)" in text and "~30 min, ~$0.15" in text and "live price" in text
    if payload["kind"] == "question":
        assert msg["text"] == "What inputs does it get?"
    if payload["kind"] == "samples":
        assert "p7" in text and "round 2" in text


# ---------------------------------------------------------------------- end to end
def _card(fake: FakeSlack, action_id: str) -> list[dict]:
    with fake._lock:
        return [m for m in fake.messages
                if any(e.get("action_id") == action_id for b in m.get("blocks") or []
                       if b.get("type") == "actions" for e in b["elements"])]


def test_real_runner_over_slack_wire(fake: FakeSlack, tmp_path) -> None:
    """Mention (twice + retry) -> one project; thread reply -> spec card; double click on
    Looks good -> resumed once; Approve -> data generated -> launch step explains that
    training is not configured. Real AgentRunner, ClaudeClient over FakeAnthropic."""
    import threading

    from sqlmodel import func

    from agent.context import AgentContext
    from agent.runner import AgentRunner
    from bot.app import EVENTS_PATH, make_http_server
    from jobs.claude import ClaudeClient
    from storage.models import Project
    from tests.fakes.anthropic_fake import API_KEY, FakeAnthropic
    from tests.fakes.slack_fake import SIGNING_SECRET, message_event, post_signed
    from tests.test_graph import ScriptedClaude

    claude = ScriptedClaude(questions=1, example_count=40)
    with FakeAnthropic.running(claude) as anth:
        settings = Settings(_env_file=None, slack_bot_token=BOT_TOKEN,  # type: ignore[call-arg]
                            slack_signing_secret=SIGNING_SECRET,
                            tuner_slack_api_url=fake.base_url, anthropic_api_key=API_KEY,
                            anthropic_base_url=anth.base_url,
                            database_url=f"sqlite:///{tmp_path}/e2e.db")
        db = Database(settings.database_url)
        client = WebClient(token=BOT_TOKEN, base_url=fake.base_url)
        llm = ClaudeClient(settings, db, max_retries=0)
        runner = AgentRunner(AgentContext(db=db, settings=settings, llm=llm,
                                          notifier=SlackNotifier(client, db),
                                          progress_interval_s=0.05))
        worker = ThreadWorker(max_workers=4)
        app = create_app(settings, runner, Services(db=db, worker=worker), client=client)
        server = make_http_server(app, 0, host="127.0.0.1")
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}{EVENTS_PATH}"
        try:
            app_mention, message = mention_pair("U1", CH, "100.000001", "triage tickets")
            for p, retry in ((app_mention, None), (message, None), (app_mention, 1)):
                assert post_signed(url, p, retry_num=retry).status == 200
            fake.wait_for(lambda: any(m["text"] == "Question 1?"
                                      for m in fake.thread(CH, "100.000001")), 15)
            assert worker.wait_idle(10)
            with db.session() as s:
                assert s.exec(select(func.count()).select_from(Project)).one() == 1
            assert [m["text"] for m in fake.thread(CH, "100.000001")].count("Question 1?") == 1

            post_signed(url, message_event("U1", CH, "100.000002", "a ticket in, one label out",
                                           thread_ts="100.000001"))
            (spec,) = fake.wait_for(lambda: _card(fake, B.SPEC_APPROVE), 15)
            btn = next(e for b in spec["blocks"] if b["type"] == "actions" for e in b["elements"]
                       if e["action_id"] == B.SPEC_APPROVE)
            click = block_action(B.SPEC_APPROVE, btn["value"], user="U1", channel=CH,
                                 message=spec)
            assert post_signed(url, click, kind="interactive").status == 200
            assert post_signed(url, click, kind="interactive").status == 200
            (samples,) = fake.wait_for(lambda: _card(fake, B.SAMPLES_APPROVE), 15)
            eph = fake.wait_for(lambda: fake.ephemerals, 10)
            assert eph[0]["text"] == ALREADY_HANDLED
            btn = next(e for b in samples["blocks"] if b["type"] == "actions"
                       for e in b["elements"] if e["action_id"] == B.SAMPLES_APPROVE)
            post_signed(url, block_action(B.SAMPLES_APPROVE, btn["value"], user="U1",
                                          channel=CH, message=samples), kind="interactive")
            warn = fake.wait_for(lambda: [m for m in fake.thread(CH, "100.000001")
                                          if "not configured" in m["text"]], 30)
            assert warn[0]["text"].startswith(":warning:")
            assert API_KEY not in json.dumps(fake.messages)
        finally:
            server.shutdown()
            server.server_close()
            worker.wait_idle(10)
            worker.shutdown(wait=False)
            runner.close()
