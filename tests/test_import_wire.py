"""Importing files over the real Slack wire: FakeSlack events -> bot handlers -> the real
runner and graph (Claude through FakeAnthropic) -> messages back in FakeSlack.

Every file is generated here. Cases from issue 14 (encodings, limits, progress, comments,
files on the starting mention, no re-posted question, no "..") and issue 8 (a download
answered with Slack's HTML sign-in page).
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import select

from bot.app import EVENTS_PATH, make_http_server
from bot.wiring import Wired, build
from storage.models import Dataset, Example
from storage.settings import Settings
from tests.datagen import catalog_pairs, to_jsonl
from tests.fakes.anthropic_fake import (
    API_KEY,
    FakeAnthropic,
    last_user_text,
    system_text,
)
from tests.fakes.slack_fake import (
    BOT_TOKEN,
    SIGNING_SECRET,
    TEAM_ID,
    FakeSlack,
    app_mention_with_files,
    file_share_event,
    mention_pair,
    message_event,
    post_signed,
)

CH = "C0IMPORT"
ROOT = "300.000001"
TID = f"{TEAM_ID}:{CH}:{ROOT}"
QUESTION = "What goes in and what comes out?"
TICKETS = "".join(json.dumps({"prompt": f"ticket {i}: printer {i} jammed on page {i * 7}",
                              "response": f"hardware {i}"}) + "\n" for i in range(30)).encode()


def define_claude(req: dict[str, Any]) -> str:
    """Asks one question, then (never reached in these tests) would write a spec."""
    assert system_text(req).startswith("[tuner:define]"), system_text(req)[:30]
    return json.dumps({"ready": False, "question": QUESTION, "spec": None})


@dataclass
class World:
    slack: FakeSlack
    claude: FakeAnthropic
    wired: Wired
    url: str

    def post(self, payload: dict[str, Any]) -> None:
        assert post_signed(self.url, payload).status == 200

    def thread(self) -> list[dict[str, Any]]:
        return self.slack.thread(CH, ROOT)

    def wait_text(self, needle: str, timeout: float = 60) -> dict[str, Any]:
        return self.slack.wait_for(lambda: next(
            (m for m in self.thread() if needle in (m.get("text") or "")), None), timeout)

    def texts(self) -> list[str]:
        return [m.get("text") or "" for m in self.thread()]

    def examples(self) -> list[Example]:
        with self.wired.db.session() as s:
            return list(s.exec(select(Example)))

    def idle(self) -> None:
        assert self.wired.services.worker.wait_idle(60)

    def start_project(self) -> None:
        self.post(mention_pair("U1", CH, ROOT, "label our support tickets")[0])
        self.wait_text(QUESTION)

    def share(self, name: str, content: bytes, text: str = "", ts: str = "300.000005",
              **file_kw: Any) -> dict[str, Any]:
        f = self.slack.add_file(name, content, **file_kw)
        self.post(file_share_event("U1", CH, ts, text, [f], thread_ts=ROOT))
        return f


@pytest.fixture()
def world(tmp_path: Path) -> Iterator[World]:
    with FakeSlack() as slack, FakeAnthropic.running(define_claude) as claude:
        settings = Settings(  # type: ignore[call-arg]
            _env_file=None, slack_bot_token=BOT_TOKEN, slack_signing_secret=SIGNING_SECRET,
            tuner_slack_api_url=slack.base_url, anthropic_api_key=API_KEY,
            anthropic_base_url=claude.base_url, database_url=f"sqlite:///{tmp_path}/tuner.db")
        wired = build(settings, artifacts_dir=tmp_path / "art")
        wired.runner.ctx.progress_interval_s = 0.0
        server = make_http_server(wired.app, 0, host="127.0.0.1")
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        try:
            yield World(slack, claude, wired,
                        f"http://127.0.0.1:{server.server_address[1]}{EVENTS_PATH}")
        finally:
            server.shutdown()
            server.server_close()
            wired.close()


def _cities_csv(encoding: str) -> bytes:
    rows = ["prompt,response"] + [f"Where is {c}?,In {k}." for c, k in (
        ("São Paulo", "Brazil"), ("Zürich", "Switzerland"), ("Kraków", "Poland"))]
    return ("\n".join(rows) + "\n").encode(encoding)


def test_legacy_encoded_csv_is_refused_and_the_question_is_not_asked_again(world: World) -> None:
    world.start_project()
    world.share("cities.csv", _cities_csv("cp1252"))
    err = world.wait_text("Couldn't import cities.csv")
    assert err["text"].startswith(":warning:")
    assert "line 2" in err["text"] and "byte 26 of the file" in err["text"]
    assert "Windows-1252" in err["text"] and "Save it as UTF-8" in err["text"]
    assert ".." not in err["text"]
    world.idle()
    assert world.examples() == []  # nothing stored, let alone with U+FFFD in it
    assert sum(QUESTION in t for t in world.texts()) == 1  # the question is not re-posted
    assert [i for i, _ in world.wired.runner.pending(TID)]  # ... and still answerable


def test_excel_csv_imports_intact(world: World) -> None:
    world.start_project()
    text = ("sep=;\r\nprompt;response\r\n"
            "\"Où est \"\"Besançon\"\"; la ville ?\";\"En France\r\nFranche-Comté\"\r\n"
            "Tromsø;Norge\r\n")
    world.share("villes.csv", ("\ufeff" + text).encode("utf-8"))
    world.wait_text("Imported villes.csv: 2 examples in")
    got = sorted((e.prompt, e.response) for e in world.examples())
    assert got == [('Où est "Besançon"; la ville ?', "En France\r\nFranche-Comté"),
                   ("Tromsø", "Norge")]


def test_a_comment_sent_with_a_file_is_about_the_file(world: World) -> None:
    world.start_project()
    note = "Here is our existing data, use it please"
    world.share("tickets.jsonl", TICKETS, text=note)
    summary = world.wait_text("Imported tickets.jsonl: 30 examples in")
    assert f"Your note with the file: “{note}”" in summary["text"]
    world.idle()
    define_turns = [last_user_text(r) for r in world.claude.message_requests
                    if system_text(r).startswith("[tuner:define]")]
    assert define_turns == ["label our support tickets"]  # the note answered nothing
    assert len(world.examples()) == 30


@pytest.mark.parametrize("delivery", ["file_share message only", "app_mention with files"])
def test_a_file_on_the_starting_mention_is_imported_into_the_new_project(
        world: World, delivery: str) -> None:
    f = world.slack.add_file("tickets.jsonl", TICKETS)
    text = "<@UBOT0001> label our support tickets"
    if delivery == "file_share message only":  # slackapi/bolt-python#925
        world.post(file_share_event("U1", CH, ROOT, text, [f]))
    else:
        world.post(app_mention_with_files("U1", CH, ROOT, "label our support tickets", [f]))
    world.wait_text(QUESTION)
    world.wait_text("Imported tickets.jsonl: 30 examples in")
    with world.wired.db.session() as s:
        ds = s.exec(select(Dataset)).one()
    assert ds.n_train + ds.n_val + ds.n_test == 30


def test_a_file_over_the_cap_is_refused_by_size_before_any_download(world: World) -> None:
    world.start_project()
    world.share("big.jsonl", TICKETS, size=21 * 1024 * 1024)
    msg = world.wait_text("big.jsonl is 21 MB")
    assert msg["text"] == ":warning: big.jsonl is 21 MB; the limit is 20 MB (TUNER_MAX_IMPORT_MB)."
    world.idle()
    assert world.slack.downloads == []
    # just over the cap is never rounded down to the limit itself
    world.share("edge.jsonl", TICKETS, size=20 * 1024 * 1024 + 1, ts="300.000006")
    assert "edge.jsonl is 20.1 MB; the limit is 20 MB" in world.wait_text("edge.jsonl")["text"]


def test_missing_files_read_scope_is_named_not_imported_as_html(world: World) -> None:
    world.start_project()
    world.slack.scopes.discard("files:read")
    world.share("tickets.jsonl", TICKETS)
    msg = world.wait_text("sign-in page")
    assert "lacks the files:read scope" in msg["text"] and "reinstall" in msg["text"]
    world.idle()
    assert world.examples() == [] and len(world.slack.downloads) == 1


def test_sign_in_page_with_a_valid_token_says_so(world: World) -> None:
    world.start_project()
    world.slack.login_page_downloads = True
    world.share("tickets.jsonl", TICKETS)
    msg = world.wait_text("sign-in page")
    assert "reinstall the app" in msg["text"]
    world.idle()
    assert world.examples() == []


def test_slack_connect_file_is_looked_up_with_files_info(world: World) -> None:
    world.start_project()
    world.share("tickets.jsonl", TICKETS, connect=True)
    world.wait_text("Imported tickets.jsonl: 30 examples in")
    assert world.slack.calls_to("files.info")


def test_network_failure_is_said_in_plain_words(world: World) -> None:
    world.start_project()
    with socket.socket() as s:  # a port nobody listens on, on the (fake) Slack host
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    world.share("tickets.jsonl", TICKETS,
                url_private_download=f"http://127.0.0.1:{port}/files-pri/x/tickets.jsonl")
    msg = world.wait_text("Couldn't reach Slack's file server")
    assert "network: " in msg["text"] and "share it again" in msg["text"]


def test_big_import_shows_one_progress_message_then_the_summary(world: World) -> None:
    world.start_project()
    pairs, planted = catalog_pairs(3000, seed=5)
    body = to_jsonl(pairs)
    assert len(body) >= 1_000_000  # agent/importing.py BIG_IMPORT_BYTES: progress shown
    world.share("catalog.jsonl", body)
    summary = world.wait_text("Imported catalog.jsonl: 3000 examples in", 120)
    assert f"exact {planted.exact}, near {planted.near}" in summary["text"]
    progress = [m for m in world.thread() if (m.get("text") or "").startswith("Importing")]
    assert len(progress) == 1  # one message, edited in place
    lines = progress[0]["text"].splitlines()
    assert lines[0] == f"Importing catalog.jsonl ({len(body) / 1e6:.1f} MB)"
    assert [ln.split(":")[0].split(" ")[1] for ln in lines[1:]] == [
        "parsed", "validated", "deduplicated", "stored"]
    assert progress[0].get("edits", 0) >= 4
    assert world.thread().index(progress[0]) < world.thread().index(summary)
    # training is not configured here: the retry card's sentence ends once, not with ".."
    retry = world.wait_text("Reply in this thread to try again")
    assert "restart the bot). Reply in this thread" in retry["text"], retry["text"]
    assert ".." not in retry["text"]


def test_reply_without_file_still_answers(world: World) -> None:
    """Control: a plain reply still goes to the question."""
    world.start_project()
    world.post(message_event("U1", CH, "300.000009", "tickets in, labels out", thread_ts=ROOT))
    world.slack.wait_for(lambda: len([r for r in world.claude.message_requests
                                      if system_text(r).startswith("[tuner:define]")]) == 2, 30)
