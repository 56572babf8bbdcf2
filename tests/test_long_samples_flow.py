"""Issue 8: eight SEO-length samples (~15,000 characters of card) through the real flow.

Real AgentRunner + graph + SlackNotifier + bolt handlers, Claude over FakeAnthropic,
Slack over FakeSlack (which refuses a message whose blocks hold more than 12,000
characters, as Slack does: slackapi/bolt-js#2509). The card must arrive (split over
messages), its Approve button must be clickable, and the project must go on.
"""

from __future__ import annotations

import json
import threading
from typing import Any

from slack_sdk import WebClient

from agent.context import AgentContext
from agent.runner import AgentRunner
from bot import blocks as B
from bot.app import EVENTS_PATH, create_app, make_http_server
from bot.handlers import Services
from bot.presenter import SlackNotifier
from bot.worker import ThreadWorker
from jobs.claude import ClaudeClient
from storage.db import Database
from storage.settings import Settings
from tests.fakes.anthropic_fake import API_KEY, FakeAnthropic
from tests.fakes.slack_fake import (
    BOT_TOKEN,
    SIGNING_SECRET,
    TEAM_ID,
    FakeSlack,
    block_action,
    mention_pair,
    message_event,
    post_signed,
)
from tests.test_graph import ScriptedClaude

CH = "C0SEO"
ROOT = "400.000001"


class SeoClaude(ScriptedClaude):
    """Writes product SEO copy: ~300-character prompts, ~1,650-character responses."""

    def _define(self, req: dict[str, Any]) -> str:
        if not any(m["role"] == "assistant" for m in req["messages"]):
            return json.dumps({"ready": False, "question": "Question 1?", "spec": None})
        return json.dumps({"ready": True, "question": None, "spec": {
            "name": "seo-writer", "description": "SEO copy for product pages",
            "inputs": "A product brief", "output_requirements": "Title, meta and body",
            "style": "persuasive", "system_prompt": "You write SEO copy & <meta> tags.",
            "example_count": self.example_count, "base_model": "unsloth/Llama-3.2-1B-Instruct",
            "max_output_tokens": 1024, "budget_usd": None}})

    def _example(self) -> dict[str, str]:
        with self.lock:
            self.counter += 1
            k = self.counter
        brief = (f"Product {k}: hand-made oak desk, 140 x 70 cm, oiled finish, cable tray, "
                 "ships flat-packed in 3 days; audience: remote workers & small studios. ")
        body = (f"Title: Oak Desk No. {k} – Hand-Made Home Office Desk | Free Shipping\n"
                "Meta: A solid oak desk built by hand for people who work from home <3. ")
        while len(body) < 1650:
            body += ("Every board is chosen for grain and strength, oiled by hand, and "
                     "finished with a cable tray that keeps your workspace calm. ")
        return {"prompt": "Write SEO copy for this brief: " + brief * 2, "response": body[:1650]}


def _esc(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _cards_with(fake: FakeSlack, action_id: str) -> list[dict[str, Any]]:
    with fake._lock:
        return [m for m in fake.messages
                if any(e.get("action_id") == action_id for b in m.get("blocks") or []
                       if b.get("type") == "actions" for e in b["elements"])]


def test_eight_seo_samples_arrive_can_be_approved_and_the_project_proceeds(tmp_path) -> None:
    claude = SeoClaude(questions=1, example_count=40)
    with FakeSlack() as fake, FakeAnthropic.running(claude) as anth:
        settings = Settings(_env_file=None, slack_bot_token=BOT_TOKEN,  # type: ignore[call-arg]
                            slack_signing_secret=SIGNING_SECRET, tuner_slack_api_url=fake.base_url,
                            anthropic_api_key=API_KEY, anthropic_base_url=anth.base_url,
                            database_url=f"sqlite:///{tmp_path}/seo.db")
        db = Database(settings.database_url)
        client = WebClient(token=BOT_TOKEN, base_url=fake.base_url)
        runner = AgentRunner(AgentContext(db=db, settings=settings,
                                          llm=ClaudeClient(settings, db, max_retries=0),
                                          notifier=SlackNotifier(client, db),
                                          progress_interval_s=0.05))
        worker = ThreadWorker(max_workers=4)
        app = create_app(settings, runner, Services(db=db, worker=worker), client=client)
        server = make_http_server(app, 0, host="127.0.0.1")
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}{EVENTS_PATH}"
        try:
            app_mention, _ = mention_pair("U1", CH, ROOT, "write SEO copy")
            post_signed(url, app_mention)
            fake.wait_for(lambda: any(m["text"] == "Question 1?" for m in fake.thread(CH, ROOT)), 15)
            post_signed(url, message_event("U1", CH, "400.000002", "briefs in, copy out",
                                           thread_ts=ROOT))
            (spec,) = fake.wait_for(lambda: _cards_with(fake, B.SPEC_APPROVE), 15)
            btn = next(e for b in spec["blocks"] if b["type"] == "actions" for e in b["elements"]
                       if e["action_id"] == B.SPEC_APPROVE)
            post_signed(url, block_action(B.SPEC_APPROVE, btn["value"], user="U1", channel=CH,
                                          message=spec), kind="interactive")

            # the card arrives: several messages, all accepted, every sample in full
            (last,) = fake.wait_for(lambda: _cards_with(fake, B.SAMPLES_APPROVE), 20)
            parts = [m for m in fake.thread(CH, ROOT)
                     if any(b.get("accessory", {}).get("action_id", "").startswith(B.SAMPLES_EDIT)
                            for b in m.get("blocks") or [])]
            assert len(parts) >= 2 and parts[-1] is last
            shown = json.dumps([m["blocks"] for m in parts])
            assert sum(len(b["text"]["text"]) for m in parts for b in m["blocks"]
                       if b["type"] == "section") > 15_000
            (pending,) = runner.pending(f"{TEAM_ID}:{CH}:{ROOT}")
            examples = pending[1]["examples"]
            assert len(examples) == 8
            for ex in examples:
                assert json.dumps(_esc(ex["response"]))[1:-1] in shown
            assert [r for r in fake.refused if r[0] == "chat.postMessage"] == []

            # Approve can be clicked, and the project proceeds to data generation
            btn = next(e for b in last["blocks"] if b["type"] == "actions" for e in b["elements"]
                       if e["action_id"] == B.SAMPLES_APPROVE)
            post_signed(url, block_action(B.SAMPLES_APPROVE, btn["value"], user="U1",
                                          channel=CH, message=last), kind="interactive")
            fake.wait_for(lambda: last.get("edits"), 15)  # the card is closed
            assert "Approved by <@U1>" in json.dumps(last["blocks"])
            warn = fake.wait_for(lambda: [m for m in fake.thread(CH, ROOT)
                                          if "not configured" in m["text"]], 60)
            assert warn[0]["text"].startswith(":warning:")
            assert fake.refused == []
        finally:
            server.shutdown()
            server.server_close()
            worker.wait_idle(10)
            worker.shutdown(wait=False)
            runner.close()
