"""Bot in HTTP mode against FakeSlack: signatures, fast acks, dedup, buttons, modals, /tuner."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
from sqlmodel import select

from bot import blocks as B
from bot.app import EVENTS_PATH, create_app, make_http_server
from bot.handlers import ALREADY_HANDLED, NOT_AUTHORISED, Services
from bot.worker import ThreadWorker
from storage import spend
from storage.db import Database
from storage.models import Deployment, Project, Run
from storage.settings import Settings
from tests.fakes.slack_fake import (
    APP_TOKEN, BOT_TOKEN, SIGNING_SECRET, TEAM_ID, FakeSlack, block_action, mention_pair,
    message_event, post_signed, slash_command, view_submission,
)

CH = "C0TUNING"


@dataclass
class ScriptedRunner:
    """Stands in for agent/runner.py AgentRunner at the bot boundary: records calls, keeps
    pending interrupts, and answers resume() the way the real one does (False when stale)."""

    db: Database
    calls: list[tuple[str, Any]] = field(default_factory=list)
    interrupts: dict[str, list[str]] = field(default_factory=dict)
    payloads: dict[str, dict[str, Any]] = field(default_factory=dict)  # interrupt id -> payload
    block: threading.Event | None = None
    resume_block: threading.Event | None = None
    entered: list[str] = field(default_factory=list)  # replies that reached the runner

    def start(self, *, team: str, channel: str, thread_ts: str, user: str, text: str) -> None:
        tid = f"{team}:{channel}:{thread_ts}"
        with self.db.session() as s:
            if s.exec(select(Project).where(Project.thread_id == tid)).first() is None:
                s.add(Project(thread_id=tid, team_id=team, channel_id=channel,
                              thread_ts=thread_ts, created_by=user, name=text[:20]))
                s.commit()
        self.calls.append(("start", (tid, user, text)))

    def reply(self, thread_id: str, user: str, text: str) -> bool:
        self.entered.append(text)
        if self.block is not None:
            self.block.wait(30)
        self.calls.append(("reply", (thread_id, user, text)))
        return True

    def resume(self, thread_id: str, interrupt_id: str, value: dict[str, Any]) -> bool:
        self.calls.append(("resume", (thread_id, interrupt_id, value)))
        if self.resume_block is not None:  # a long step (training) behind the click
            self.resume_block.wait(10)
        pending = self.interrupts.get(thread_id, [])
        if interrupt_id not in pending:
            return False
        pending.remove(interrupt_id)
        return True

    def import_file(self, thread_id: str, user: str, filename: str, content: bytes, *,
                    comment: str = "", upload_id: str = "") -> bool:
        self.calls.append(("import", (thread_id, user, filename, content)))
        if comment:
            self.calls.append(("import_comment", comment))
        return True

    def pending(self, thread_id: str) -> list[tuple[str, Any]]:
        return [(i, self.payloads.get(i, {})) for i in self.interrupts.get(thread_id, [])]

    def of(self, kind: str) -> list[Any]:
        return [v for k, v in self.calls if k == kind]


@dataclass
class StopRecorder:
    stopped: list[int] = field(default_factory=list)
    event: threading.Event = field(default_factory=threading.Event)

    def request_stop(self, run_id: int) -> None:
        self.stopped.append(run_id)
        self.event.set()


@dataclass
class Bot:
    fake: FakeSlack
    db: Database
    runner: ScriptedRunner
    worker: ThreadWorker
    training: StopRecorder
    url: str

    def post(self, payload: dict, **kw: Any) -> Any:
        return post_signed(self.url, payload, **kw)

    def idle(self) -> None:
        """Let bolt's listener threads hand off, then wait for the per-thread worker."""
        time.sleep(0.15)
        assert self.worker.wait_idle(5)
        time.sleep(0.05)
        assert self.worker.wait_idle(5)


def make_settings(fake: FakeSlack, tmp_path: Any, **kw: Any) -> Settings:
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        slack_bot_token=BOT_TOKEN, slack_app_token=APP_TOKEN,
        slack_signing_secret=SIGNING_SECRET, tuner_slack_api_url=fake.base_url,
        database_url=f"sqlite:///{tmp_path}/tuner.db", **kw,
    )


@pytest.fixture
def make_bot(tmp_path: Any):
    started: list[Any] = []

    def factory(scheduler: Any = None, max_queued: int = 1000, **settings_kw: Any) -> Bot:
        fake = FakeSlack().start()
        settings = make_settings(fake, tmp_path, **settings_kw)
        db = Database(settings.database_url)
        runner = ScriptedRunner(db)
        worker = ThreadWorker(max_workers=4, max_queued=max_queued)
        training = StopRecorder()
        app = create_app(settings, runner, Services(db=db, training=training, worker=worker,
                                                    scheduler=scheduler))
        server = make_http_server(app, 0, host="127.0.0.1")
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        started.append((fake, server, worker))
        url = f"http://127.0.0.1:{server.server_address[1]}{EVENTS_PATH}"
        return Bot(fake, db, runner, worker, training, url)

    yield factory
    for fake, server, worker in started:
        server.shutdown()
        server.server_close()
        worker.shutdown(wait=False)
        fake.stop()


def test_creating_app_calls_auth_test(make_bot) -> None:
    bot = make_bot()
    assert [c.token for c in bot.fake.calls_to("auth.test")][:1] == [BOT_TOKEN]


def test_bad_signature_is_rejected(make_bot) -> None:
    bot = make_bot()
    app_mention, _ = mention_pair("U1", CH, "100.000001", "make me a classifier")
    r = bot.post(app_mention, bad_signature=True)
    assert r.status == 401
    stale = bot.post(app_mention, timestamp=int(time.time()) - 3600)
    assert stale.status == 401
    bot.idle()
    assert bot.runner.of("start") == []


def test_good_signature_acks_fast_and_starts_once(make_bot) -> None:
    bot = make_bot()
    app_mention, message = mention_pair("U1", CH, "100.000001", "make me a classifier")
    r = bot.post(app_mention)
    assert r.status == 200
    assert r.elapsed_s < 1.0
    # Slack's second delivery of the same mention and a retry of the first
    assert bot.post(message).status == 200
    assert bot.post(app_mention, retry_num=1).status == 200
    bot.idle()
    assert bot.runner.of("start") == [(f"{TEAM_ID}:{CH}:100.000001", "U1", "make me a classifier")]


def test_message_delivered_before_app_mention_still_starts_once(make_bot) -> None:
    bot = make_bot()
    app_mention, message = mention_pair("U1", CH, "100.000002", "summarise tickets")
    assert bot.post(message).status == 200
    assert bot.post(app_mention).status == 200
    bot.idle()
    assert len(bot.runner.of("start")) == 1


def test_concurrent_double_delivery_starts_once(make_bot) -> None:
    bot = make_bot()
    app_mention, message = mention_pair("U1", CH, "100.000003", "x")
    results: list[int] = []
    threads = [threading.Thread(target=lambda p=p: results.append(bot.post(p).status))
               for p in (app_mention, message, app_mention, message)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    bot.idle()
    assert results == [200] * 4
    assert len(bot.runner.of("start")) == 1


def test_thread_replies_go_to_runner_and_other_chatter_is_ignored(make_bot) -> None:
    bot = make_bot()
    app_mention, _ = mention_pair("U1", CH, "200.000001", "start")
    bot.post(app_mention)
    bot.idle()
    tid = f"{TEAM_ID}:{CH}:200.000001"
    bot.post(message_event("U1", CH, "200.000002", "it labels tickets", thread_ts="200.000001"))
    bot.post(message_event("U1", CH, "300.000001", "lunch?"))  # top level, no mention
    bot.post(message_event("U1", CH, "301.000002", "hi", thread_ts="301.000001"))  # other thread
    bot.post(message_event("U1", CH, "200.000003", "edited", thread_ts="200.000001",
                           subtype="message_changed"))
    bot.post(message_event("U9", CH, "200.000004", "from a bot", thread_ts="200.000001",
                           bot_id="B999"))
    bot.idle()
    assert bot.runner.of("reply") == [(tid, "U1", "it labels tickets")]
    assert len(bot.runner.of("start")) == 1


def test_channel_allow_list_explains_once(make_bot) -> None:
    bot = make_bot(tuner_allowed_channels="C0ALLOWED")
    app_mention, message = mention_pair("U1", CH, "400.000001", "hello")
    bot.post(app_mention)
    bot.post(message)
    bot.idle()
    msgs = bot.fake.wait_for(lambda: bot.fake.thread(CH, "400.000001"))
    time.sleep(0.2)
    msgs = bot.fake.thread(CH, "400.000001")
    assert len(msgs) == 1 and "not enabled in this channel" in msgs[0]["text"]
    assert bot.runner.of("start") == []


def test_stale_click_gets_already_handled(make_bot) -> None:
    bot = make_bot()
    tid = f"{TEAM_ID}:{CH}:500.000001"
    bot.runner.interrupts[tid] = ["int-2"]
    value = B.encode_value("int-1", tid)  # an old card
    r = bot.post(block_action(B.SPEC_APPROVE, value, user="U1", channel=CH), kind="interactive")
    assert r.status == 200
    eph = bot.fake.wait_for(lambda: bot.fake.ephemerals)
    assert eph[0]["text"] == ALREADY_HANDLED and eph[0]["user"] == "U1"
    assert eph[0]["thread_ts"] == "500.000001"
    assert bot.runner.interrupts[tid] == ["int-2"]


def test_double_click_resumes_once(make_bot) -> None:
    bot = make_bot()
    tid = f"{TEAM_ID}:{CH}:510.000001"
    bot.runner.interrupts[tid] = ["int-1"]
    card = bot.fake._m_chat_postMessage(  # the card as the presenter posted it
        {"channel": CH, "thread_ts": "510.000001", "text": "spec",
         "blocks": B.spec_card("int-1", tid, {"name": "x"}).messages[0].blocks})["message"]
    click = block_action(B.SPEC_APPROVE, B.encode_value("int-1", tid), user="U1", channel=CH,
                         message=card)
    assert bot.post(click, kind="interactive").status == 200
    assert bot.post(click, kind="interactive").status == 200
    bot.idle()
    resumes = bot.runner.of("resume")
    assert resumes == [(tid, "int-1", {"action": "approve", "user": "U1"})]
    assert bot.runner.interrupts[tid] == []
    assert [e["text"] for e in bot.fake.ephemerals] == [ALREADY_HANDLED]
    # the card lost its buttons and says who approved it
    updated = bot.fake.wait_for(lambda: card.get("edits") and card)
    assert all(b["type"] != "actions" for b in updated["blocks"])
    assert "Approved by <@U1>" in json.dumps(updated["blocks"])


def test_launch_card_is_closed_while_training_runs(make_bot) -> None:
    bot = make_bot()
    tid = f"{TEAM_ID}:{CH}:520.000001"
    bot.runner.interrupts[tid] = ["int-L"]
    bot.runner.resume_block = threading.Event()
    card = bot.fake._m_chat_postMessage(
        {"channel": CH, "thread_ts": "520.000001", "text": "launch?",
         "blocks": [{"type": "actions", "elements": [
             {"type": "button", "action_id": B.LAUNCH, "text": {"type": "plain_text",
              "text": "Launch"}, "value": B.encode_value("int-L", tid)}]}]})["message"]
    click = block_action(B.LAUNCH, B.encode_value("int-L", tid), user="U1", channel=CH,
                         message=card)
    try:
        assert bot.post(click, kind="interactive").status == 200
        updated = bot.fake.wait_for(lambda: card.get("edits") and card)
        bot.fake.wait_for(lambda: bot.runner.of("resume"))
        assert not bot.runner.resume_block.is_set()  # the "training" is still running
        assert all(b["type"] != "actions" for b in updated["blocks"])
        assert "Launched by <@U1>" in json.dumps(updated["blocks"])
    finally:
        bot.runner.resume_block.set()
    bot.idle()


def test_unauthorised_launch_is_refused(make_bot) -> None:
    bot = make_bot(tuner_allowed_users="UADMIN")
    tid = f"{TEAM_ID}:{CH}:600.000001"
    bot.runner.interrupts[tid] = ["int-9"]
    value = B.encode_value("int-9", tid)
    bot.post(block_action(B.LAUNCH, value, user="UINTRUDER", channel=CH), kind="interactive")
    eph = bot.fake.wait_for(lambda: bot.fake.ephemerals)
    assert eph[0]["text"] == NOT_AUTHORISED
    bot.idle()
    assert bot.runner.of("resume") == []
    bot.post(block_action(B.LAUNCH, value, user="UADMIN", channel=CH), kind="interactive")
    bot.idle()
    assert bot.runner.of("resume") == [(tid, "int-9", {"action": "launch", "user": "UADMIN"})]


def test_change_button_opens_modal_and_submission_resumes(make_bot) -> None:
    bot = make_bot()
    tid = f"{TEAM_ID}:{CH}:700.000001"
    bot.runner.interrupts[tid] = ["int-3"]
    bot.post(block_action(B.SAMPLES_REGENERATE, B.encode_value("int-3", tid), user="U1",
                          channel=CH), kind="interactive")
    opened = bot.fake.wait_for(lambda: [v for v in bot.fake.views if v["kind"] == "open"])
    view = opened[0]["view"]
    assert view["callback_id"] == B.FEEDBACK_CALLBACK
    r = bot.post(view_submission(view, user="U1", text="shorter answers"), kind="interactive")
    assert r.status == 200
    bot.idle()
    assert bot.runner.of("resume") == [
        (tid, "int-3", {"action": "regenerate", "text": "shorter answers", "user": "U1"})]
    # an empty submission is rejected in the modal itself
    r = bot.post(view_submission(view, user="U1", text="  "), kind="interactive")
    assert json.loads(r.body)["response_action"] == "errors"


def test_change_button_on_stale_card_does_not_open_modal(make_bot) -> None:
    bot = make_bot()
    tid = f"{TEAM_ID}:{CH}:710.000001"
    bot.post(block_action(B.SPEC_CHANGE, B.encode_value("gone", tid), user="U1", channel=CH),
             kind="interactive")
    eph = bot.fake.wait_for(lambda: bot.fake.ephemerals)
    assert eph[0]["text"] == ALREADY_HANDLED
    assert bot.fake.views == []


SAMPLES = [{"prompt": f"Ticket {k}: printer on fire", "response": f"label {k}"} for k in range(3)]


def _edit_submission(view: dict, user: str, prompt: str, response: str) -> dict:
    """A view_submission of the sample editor as Slack sends it (two input blocks)."""
    payload = view_submission(view, user=user, text="")
    payload["view"]["state"]["values"] = {
        B.EDIT_PROMPT_BLOCK: {B.EDIT_INPUTS[B.EDIT_PROMPT_BLOCK]:
                              {"type": "plain_text_input", "value": prompt}},
        B.EDIT_RESPONSE_BLOCK: {B.EDIT_INPUTS[B.EDIT_RESPONSE_BLOCK]:
                                {"type": "plain_text_input", "value": response}},
    }
    return payload


def test_samples_card_has_an_edit_button_per_sample() -> None:
    tid = f"{TEAM_ID}:{CH}:720.000001"
    (msg,) = B.ask_card("int-5", tid, {"kind": "samples", "examples": SAMPLES, "round": 2,
                                       "edited": [1]}).messages
    blocks = msg.blocks
    edits = [b["accessory"] for b in blocks if "accessory" in b]
    # unique per message, as Slack requires; the handler routes them all
    assert [e["action_id"] for e in edits] == [f"{B.SAMPLES_EDIT}:{n}" for n in range(3)]
    assert all(B.SAMPLES_EDIT_RE.match(e["action_id"]) for e in edits)
    assert [B.decode_value(e["value"]) for e in edits] == [("int-5", tid)] * 3
    assert [B.decode_index(e["value"]) for e in edits] == [0, 1, 2]
    marked = [b["text"]["text"] for b in blocks if "edited by you" in json.dumps(b)]
    assert len(marked) == 1 and "Ticket 1:" in marked[0]


def test_edit_button_opens_prefilled_modal_and_submission_resumes(make_bot) -> None:
    bot = make_bot()
    tid = f"{TEAM_ID}:{CH}:730.000001"
    bot.runner.interrupts[tid] = ["int-4"]
    bot.runner.payloads["int-4"] = {"kind": "samples", "examples": SAMPLES, "round": 1}
    card = bot.fake._m_chat_postMessage(
        {"channel": CH, "thread_ts": "730.000001", "text": "samples",
         "blocks": B.samples_card("int-4", tid, SAMPLES).messages[0].blocks})["message"]
    edit = [b["accessory"] for b in card["blocks"] if "accessory" in b][2]
    r = bot.post(block_action(edit["action_id"], edit["value"], user="U1", channel=CH,
                              message=card),
                 kind="interactive")
    assert r.status == 200
    opened = bot.fake.wait_for(lambda: [v for v in bot.fake.views if v["kind"] == "open"])
    view = opened[0]["view"]
    assert view["callback_id"] == B.EDIT_CALLBACK
    assert json.loads(view["private_metadata"]) == {"i": "int-4", "t": tid, "n": 2}
    inputs = {b["block_id"]: b["element"] for b in view["blocks"] if b["type"] == "input"}
    assert inputs[B.EDIT_PROMPT_BLOCK]["initial_value"] == "Ticket 2: printer on fire"
    assert inputs[B.EDIT_RESPONSE_BLOCK]["initial_value"] == "label 2"
    assert all(e["multiline"] and e["type"] == "plain_text_input" for e in inputs.values())
    assert bot.runner.of("resume") == []  # opening the editor answers nothing yet

    # an emptied field is refused in the modal itself, naming the field
    r = bot.post(_edit_submission(view, "U1", "Ticket 2: toner", "  "), kind="interactive")
    assert json.loads(r.body) == {"response_action": "errors",
                                  "errors": {B.EDIT_RESPONSE_BLOCK: "This can't be empty."}}
    r = bot.post(_edit_submission(view, "U1", " Ticket 2: the printer smokes ", "hardware\n"),
                 kind="interactive")
    assert r.status == 200
    bot.idle()
    assert bot.runner.of("resume") == [(tid, "int-4", {
        "action": "edit", "index": 2, "prompt": "Ticket 2: the printer smokes",
        "response": "hardware", "user": "U1"})]
    assert bot.fake.ephemerals == []

    # the same modal submitted again (its interrupt is answered now): already handled
    bot.post(_edit_submission(view, "U1", "again", "again"), kind="interactive")
    eph = bot.fake.wait_for(lambda: bot.fake.ephemerals)
    assert eph[0]["text"] == ALREADY_HANDLED and eph[0]["thread_ts"] == "730.000001"
    assert len(bot.runner.of("resume")) == 1 and bot.runner.interrupts[tid] == []


def test_edit_button_on_stale_card_does_not_open_modal(make_bot) -> None:
    bot = make_bot()
    tid = f"{TEAM_ID}:{CH}:740.000001"
    bot.runner.interrupts[tid] = ["int-new"]
    bot.runner.payloads["int-new"] = {"kind": "samples", "examples": SAMPLES, "round": 2}
    bot.post(block_action(B.SAMPLES_EDIT, B.encode_value("int-old", tid, 0), user="U1",
                          channel=CH), kind="interactive")
    eph = bot.fake.wait_for(lambda: bot.fake.ephemerals)
    assert eph[0]["text"] == ALREADY_HANDLED and eph[0]["user"] == "U1"
    assert bot.fake.views == [] and bot.runner.of("resume") == []


def test_approving_samples_strips_the_edit_buttons(make_bot) -> None:
    bot = make_bot()
    tid = f"{TEAM_ID}:{CH}:750.000001"
    bot.runner.interrupts[tid] = ["int-6"]
    card = bot.fake._m_chat_postMessage(
        {"channel": CH, "thread_ts": "750.000001", "text": "samples",
         "blocks": B.samples_card("int-6", tid, SAMPLES).messages[0].blocks})["message"]
    bot.post(block_action(B.SAMPLES_APPROVE, B.encode_value("int-6", tid), user="U1",
                          channel=CH, message=card), kind="interactive")
    bot.idle()
    updated = bot.fake.wait_for(lambda: card.get("edits") and card)
    text = json.dumps(updated["blocks"])
    assert B.SAMPLES_EDIT not in text and "Ticket 2: printer on fire" in text
    assert "Approved by <@U1>" in text


def test_stop_button_does_not_wait_for_busy_thread(make_bot) -> None:
    bot = make_bot()
    app_mention, _ = mention_pair("U1", CH, "800.000001", "start")
    bot.post(app_mention)
    bot.idle()
    bot.runner.block = threading.Event()  # the thread's worker is now stuck in reply()
    bot.post(message_event("U1", CH, "800.000002", "busy", thread_ts="800.000001"))
    msg = {"ts": "800.000009", "thread_ts": "800.000001", "text": "training", "blocks": []}
    bot.post(block_action(B.STOP_RUN, "7", user="U1", channel=CH, message=msg),
             kind="interactive")
    assert bot.training.event.wait(3), "stop was queued behind the busy thread"
    assert bot.training.stopped == [7]
    bot.runner.block.set()
    bot.idle()


def test_file_share_downloads_with_bot_token_and_imports(make_bot) -> None:
    bot = make_bot()
    app_mention, _ = mention_pair("U1", CH, "900.000001", "start")
    bot.post(app_mention)
    bot.idle()
    content = b'{"prompt": "a", "response": "b"}\n'
    f = bot.fake.add_file("data.jsonl", content)
    bot.post(message_event("U1", CH, "900.000002", "", thread_ts="900.000001",
                           subtype="file_share", files=[f]))
    bot.idle()
    assert bot.runner.of("import") == [
        (f"{TEAM_ID}:{CH}:900.000001", "U1", "data.jsonl", content)]
    # url_private_download redirects to a second Slack path, which needs the token too
    assert bot.fake.downloads == [(f["id"], f"Bearer {BOT_TOKEN}")] * 2


def test_file_from_untrusted_host_is_not_fetched(make_bot) -> None:
    bot = make_bot()
    bot.post(mention_pair("U1", CH, "910.000001", "start")[0])
    bot.idle()
    f = {"id": "F1", "name": "x.jsonl", "size": 3,
         "url_private": "http://169.254.169.254/latest/meta-data"}
    bot.post(message_event("U1", CH, "910.000002", "", thread_ts="910.000001",
                           subtype="file_share", files=[f]))
    bot.idle()
    assert bot.runner.of("import") == []
    msgs = bot.fake.wait_for(lambda: bot.fake.thread(CH, "910.000001"))
    assert "points outside Slack (169.254.169.254), so it was not fetched" in msgs[-1]["text"]


def test_tuner_status_lists_projects_runs_deployments_and_spend(make_bot) -> None:
    bot = make_bot()
    with bot.db.session() as s:
        p = Project(thread_id=f"{TEAM_ID}:{CH}:1.0", team_id=TEAM_ID, channel_id=CH,
                    thread_ts="1.0", created_by="U1", name="ticket-labeller", status="training")
        s.add(p)
        s.commit()
        s.refresh(p)
        s.add(Run(project_id=p.id, status="running", best_eval_loss=0.4321))
        s.add(Deployment(project_id=p.id, endpoint_id="ep-old", status="removed"))
        s.add(Deployment(project_id=p.id, endpoint_id="ep-123", status="healthy",
                         cost_per_1k_usd=0.0123))
        s.commit()
    spend.record(bot.db, kind="claude_tokens", usd=1.25, project_id=p.id)
    spend.record(bot.db, kind="pod_seconds", usd=0.5, project_id=p.id)
    r = bot.post(slash_command("status", user="U1", channel=CH), kind="command")
    assert r.status == 200
    body = json.loads(r.body)
    assert body["response_type"] == "ephemeral"
    text = body["text"]
    assert "ticket-labeller" in text and "training" in text
    assert "run 1 running" in text and "0.4321" in text
    assert "ep-123" in text and "$0.0123/1k" in text and "ep-old" not in text
    assert "$1.75" in text and "claude_tokens $1.25" in text and "pod_seconds $0.50" in text
    help_body = json.loads(bot.post(slash_command("help", user="U1", channel=CH),
                                    kind="command").body)
    assert "/tuner status" in help_body["text"]


def test_app_home_opened_publishes_summary(make_bot) -> None:
    bot = make_bot()
    spend.record(bot.db, kind="endpoint", usd=2.0)
    ev = {"type": "app_home_opened", "user": "U1", "channel": "D1", "tab": "home",
          "event_ts": "1.0"}
    from tests.fakes.slack_fake import event_callback

    assert bot.post(event_callback(ev)).status == 200
    pub = bot.fake.wait_for(lambda: [v for v in bot.fake.views if v["kind"] == "publish"])
    assert pub[0]["user_id"] == "U1" and pub[0]["view"]["type"] == "home"
    assert "$2.00" in json.dumps(pub[0]["view"])


def test_tuner_nightly_on_off_schedules_the_project(make_bot, tmp_path) -> None:
    from jobs.scheduler import build_scheduler, job_id

    url = f"sqlite:///{tmp_path}/tuner.db"
    scheduler = build_scheduler(Settings(_env_file=None, database_url=url), url)  # type: ignore[call-arg]
    scheduler.start(paused=True)
    try:
        bot = make_bot(scheduler=scheduler, tuner_allowed_users="U1")
        with bot.db.session() as s:
            p = Project(thread_id=f"{TEAM_ID}:{CH}:2.0", team_id=TEAM_ID, channel_id=CH,
                        thread_ts="2.0", created_by="U1")
            s.add(p)
            s.commit()
            s.refresh(p)

        def cmd(text: str, user: str = "U1") -> str:
            r = bot.post(slash_command(text, user=user, channel=CH), kind="command")
            return json.loads(r.body)["text"]

        assert "not authorised" in cmd(f"nightly on {p.id}", user="U2")
        assert scheduler.get_job(job_id(p.id)) is None
        assert "is on" in cmd(f"nightly on {p.id}")
        job = scheduler.get_job(job_id(p.id))
        assert job is not None and job.args == (p.id,)
        with bot.db.session() as s:
            assert s.get(Project, p.id).nightly_enabled
        assert "Usage" in cmd("nightly maybe")
        assert "No project 999" in cmd("nightly on 999")
        assert "is off" in cmd(f"nightly off {p.id}")
        assert scheduler.get_job(job_id(p.id)) is None
    finally:
        scheduler.shutdown(wait=False)


def test_long_running_threads_do_not_starve_other_projects(make_bot) -> None:
    """Training runs block their thread's work for hours: as many busy projects as the
    worker has threads must not leave a new mention unanswered."""
    bot = make_bot()  # ThreadWorker(max_workers=4)
    for k in range(4):
        bot.post(mention_pair("U1", CH, f"950.00000{k}", "start")[0])
    bot.idle()
    bot.runner.block = threading.Event()  # every thread's reply() now runs "for hours"
    try:
        for k in range(4):
            bot.post(message_event("U1", CH, f"950.10000{k}", "train", thread_ts=f"950.00000{k}"))
        time.sleep(0.2)
        bot.post(mention_pair("U2", CH, "960.000001", "another project")[0])
        bot.fake.wait_for(lambda: len(bot.runner.of("start")) == 5, 3)
    finally:
        bot.runner.block.set()
    bot.idle()


def test_file_shared_while_thread_is_busy_is_imported_without_waiting(make_bot) -> None:
    """A file dropped while the thread's run trains (its work blocked for hours) reaches
    the runner now: import_file itself decides to add it for the next retrain."""
    bot = make_bot()
    bot.post(mention_pair("U1", CH, "970.000001", "start")[0])
    bot.idle()
    bot.runner.block = threading.Event()
    try:
        bot.post(message_event("U1", CH, "970.000002", "busy", thread_ts="970.000001"))
        time.sleep(0.2)
        content = b'{"prompt": "a", "response": "b"}\n'
        f = bot.fake.add_file("more.jsonl", content)
        bot.post(message_event("U1", CH, "970.000003", "", thread_ts="970.000001",
                               subtype="file_share", files=[f]))
        bot.fake.wait_for(lambda: bot.runner.of("import"), 3)
        assert bot.runner.of("import") == [
            (f"{TEAM_ID}:{CH}:970.000001", "U1", "more.jsonl", content)]
    finally:
        bot.runner.block.set()
    bot.idle()


def test_mention_in_a_project_thread_goes_to_start(make_bot) -> None:
    """A mention inside a project's thread reaches runner.start, which answers a pending
    question or starts over once the project finished ("Mention me again to start over");
    plain replies still go to runner.reply."""
    bot = make_bot()
    bot.post(mention_pair("U1", CH, "980.000001", "triage")[0])
    bot.idle()
    app_mention, message = mention_pair("U1", CH, "980.000002", "summarise instead",
                                        thread_ts="980.000001")
    bot.post(app_mention)
    bot.post(message)
    bot.idle()
    tid = f"{TEAM_ID}:{CH}:980.000001"
    assert bot.runner.of("start") == [(tid, "U1", "triage"), (tid, "U1", "summarise instead")]
    assert bot.runner.of("reply") == []


def test_reply_also_sent_to_channel_is_still_an_answer(make_bot) -> None:
    """'Also send to #channel' replies arrive with subtype thread_broadcast."""
    bot = make_bot()
    bot.post(mention_pair("U1", CH, "990.000001", "triage")[0])
    bot.idle()
    bot.post(message_event("U1", CH, "990.000002", "labels: bug, billing",
                           thread_ts="990.000001", subtype="thread_broadcast"))
    bot.idle()
    assert bot.runner.of("reply") == [(f"{TEAM_ID}:{CH}:990.000001", "U1", "labels: bug, billing")]


def test_saturated_worker_tells_the_user_instead_of_dropping(make_bot) -> None:
    from bot.handlers import OVERLOADED

    bot = make_bot(max_queued=1)
    bot.runner.start(team=TEAM_ID, channel=CH, thread_ts="540.000001", user="U1", text="x")
    bot.runner.block = threading.Event()  # the first reply occupies the only queue slot
    try:
        bot.post(message_event("U1", CH, "540.000002", "first", thread_ts="540.000001"))
        # Bolt runs event listeners off the request thread: wait until the first reply holds
        # the queue slot, or the second event can overtake it.
        bot.fake.wait_for(lambda: bot.runner.entered, timeout=30)
        bot.post(message_event("U1", CH, "540.000003", "second", thread_ts="540.000001"))
        eph = bot.fake.wait_for(lambda: bot.fake.ephemerals)
        assert eph[0]["text"] == OVERLOADED and eph[0]["user"] == "U1"
    finally:
        bot.runner.block.set()
    bot.idle()
    assert [c[1][2] for c in bot.runner.calls if c[0] == "reply"] == ["first"]


def test_correction_is_not_queued_behind_a_busy_thread(make_bot) -> None:
    bot = make_bot()
    tid = f"{TEAM_ID}:{CH}:550.000001"
    bot.runner.start(team=TEAM_ID, channel=CH, thread_ts="550.000001", user="U1", text="x")
    bot.runner.interrupts[tid] = ["int-T"]
    bot.runner.resume_block = threading.Event()  # the Launch click "trains" for a while
    try:
        bot.post(block_action(B.LAUNCH, B.encode_value("int-T", tid), user="U1", channel=CH))
        bot.fake.wait_for(lambda: bot.runner.of("resume"))
        bot.post(message_event("U1", CH, "550.000002", "correction: 2+2 => 4",
                               thread_ts="550.000001"))
        bot.post(message_event("U1", CH, "550.000003", "just chatting",
                               thread_ts="550.000001"))
        bot.fake.wait_for(lambda: bot.runner.of("reply"))
        time.sleep(0.3)
        assert bot.runner.of("reply") == [(tid, "U1", "correction: 2+2 => 4")]  # chat waits
    finally:
        bot.runner.resume_block.set()
    bot.idle()
    assert [r[2] for r in bot.runner.of("reply")] == ["correction: 2+2 => 4", "just chatting"]
