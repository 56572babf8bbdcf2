"""Every card and message the bot builds is one Slack accepts, whatever it holds.

A worst-case generator (hand-rolled, deterministic: each flavour at the sizes the product
can produce) feeds every builder: responses at the spec's max output length (1024 tokens,
~4,800 characters), a 3,000-character system prompt, long names, 20+ samples, long error
texts and curl examples; in plain ASCII, mrkdwn control characters (* _ ~ ` > & < >, which
grow when escaped), emoji (2 UTF-16 units each), combining marks, CJK/RTL, one unbroken
token. Everything goes through the real SlackNotifier / slack_sdk WebClient to FakeSlack,
which refuses what Slack refuses (tests/fakes/slack_validate.py). Nothing may be refused,
every button must arrive, and no content may silently disappear.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections.abc import Iterator
from typing import Any

import pytest
from slack_sdk import WebClient

from agent.ports import Action
from bot import blocks as B
from bot import limits as L
from bot.home import home_view
from bot.layout import buttons_of
from bot.presenter import SlackNotifier
from storage.db import Database
from storage.models import Project
from tests.fakes.slack_fake import BOT_TOKEN, TEAM_ID, FakeSlack, block_action
from tests.fakes.slack_validate import check_message, check_view
from tests.test_bot_http import make_bot  # noqa: F401  (fixture)

CH = "C0BUDGET"
ROOT = "300.000001"
TID = f"{TEAM_ID}:{CH}:{ROOT}"

FLAVOURS = {
    "ascii": "The quick brown fox jumps over the lazy dog. ",
    "mrkdwn": "*b* _i_ ~s~ `c` ```f``` > q & < > &amp; <!channel> <@U1|x> <http://x|y> :tada: ",
    "escapes": "&<>",  # every character grows to 4-5 when escaped
    "emoji": "😀👩‍👩‍👧‍👦🏳️‍🌈👍🏽 ",
    "combining": "e\u0301 Z\u0364\u0354\u0367\u0311 a\u0308\u0356 ",
    "cjk_rtl": "漢字かな한국어 العربية עברית ",
    "unbroken": "x",
    "lines": "line\n",
}
RESPONSE = 4800  # ~1024 tokens, the spec's max output length
PROMPT = 1500
SYSTEM = 3000


def text(flavour: str, n: int) -> str:
    base = FLAVOURS[flavour]
    return (base * (n // len(base) + 1))[:n]


def mixed(n: int, seed: int) -> str:
    rng = random.Random(seed)
    out = ""
    while len(out) < n:
        out += text(rng.choice(list(FLAVOURS)), rng.randint(1, 300))
    return out[:n]


CASES = [*FLAVOURS, "mixed"]


def content(case: str, n: int, seed: int = 0) -> str:
    return mixed(n, seed) if case == "mixed" else text(case, n)


def samples(case: str, k: int, response: int = RESPONSE) -> list[dict[str, str]]:
    return [{"prompt": content(case, PROMPT, i), "response": content(case, response, i + 100)}
            for i in range(k)]


def payloads(case: str) -> list[dict[str, Any]]:
    long_name = content(case, 300)
    return [
        {"kind": "spec", "spec": {
            "name": long_name, "description": content(case, 3000), "inputs": [content(case, 800)] * 4,
            "output_requirements": content(case, 2000), "style": content(case, 1000),
            "system_prompt": content(case, SYSTEM), "example_count": 1000,
            "base_model": content(case, 200)}},
        {"kind": "samples", "examples": samples(case, 8), "round": 12, "edited": [0, 3, 7]},
        {"kind": "samples", "examples": samples(case, 25), "round": 1},
        {"kind": "launch", "estimate": {"gpu_type": content(case, 500), "cloud_type": long_name,
                                        "price_per_hour": 1e6, "est_minutes": 1e9, "est_usd": 1e9,
                                        "spent_usd": 1e9, "budget_usd": 0},
         "dataset": {"n_train": 10**12, "n_val": 10**12, "n_test": 10**12}},
        {"kind": "deploy", "run_id": 7, "text": content(case, 6000), "win_rate": 0.5,
         "ci_low": 0.1, "ci_high": 0.9},
        {"kind": "deployed", "deployment_id": 3, "text": content(case, 5000),
         "curl": content(case, 3000)},
        {"kind": "question", "text": content(case, 12_000)},
        {"kind": "retry", "text": "Data generation failed: " + content(case, 10_000)},
        {"kind": content(case, 100)},
    ]


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeSlack]:
    with FakeSlack() as f:
        yield f


@pytest.fixture
def db(tmp_path: Any) -> Database:
    return Database(f"sqlite:///{tmp_path}/budget.db")


def _notifier(fake: FakeSlack, db: Database) -> SlackNotifier:
    return SlackNotifier(WebClient(token=BOT_TOKEN, base_url=fake.base_url), db)


def _new_messages(fake: FakeSlack, start: int) -> list[dict[str, Any]]:
    with fake._lock:
        return list(fake.messages[start:])


def _all_text(messages: list[dict[str, Any]]) -> str:
    return json.dumps([m["blocks"] for m in messages], ensure_ascii=False)


def _visible(s: str) -> str:
    """What a reader sees, whitespace aside (for 'no content lost' checks)."""
    return "".join(L.escape(s).split())


# ---------------------------------------------------------------------- the property
@pytest.mark.parametrize("case", CASES)
def test_every_card_is_accepted_and_keeps_its_buttons(fake: FakeSlack, db: Database,
                                                     case: str) -> None:
    n = _notifier(fake, db)
    for i, payload in enumerate(payloads(case)):
        start = len(fake.messages)
        refused_before = len(fake.refused)
        n.ask(TID, f"int-{case}-{i}", payload)
        posted = _new_messages(fake, start)
        assert fake.refused[refused_before:] == [], (payload["kind"], fake.refused[-1:])
        assert posted and all(m.get("blocks") or m.get("files") for m in posted)
        cards = [m for m in posted if m.get("blocks")]
        expected = B.ask_card(f"int-{case}-{i}", TID, payload)
        assert len(cards) == len(expected.messages)
        # buttons: all on the last message of the card, with the interrupt's value
        buttons = [e for m in cards for b in m["blocks"] if b["type"] == "actions"
                   for e in b["elements"]]
        assert all(b["type"] != "actions" for m in cards[:-1] for b in m["blocks"])
        for e in buttons:
            assert B.decode_value(e["value"]) == (f"int-{case}-{i}", TID)
        want = {"spec": [B.SPEC_APPROVE, B.SPEC_CHANGE], "launch": [B.LAUNCH],
                "samples": [B.SAMPLES_APPROVE, B.SAMPLES_REGENERATE],
                "deploy": [B.DEPLOY, B.DEPLOY_SKIP], "deployed": [B.UNDEPLOY]}
        assert [e["action_id"] for e in buttons] == want.get(payload["kind"], [])
        if payload["kind"] == "samples":
            _check_samples(fake, cards, payload)
        if payload["kind"] == "spec":  # the whole system prompt is there, escaped
            assert _visible(payload["spec"]["system_prompt"]) in "".join(
                "".join(b["text"]["text"].removeprefix("```").removesuffix("```").split())
                for m in cards for b in m["blocks"] if b["type"] == "section")
        if payload["kind"] in ("question", "retry"):
            assert _visible(payload["text"]) == "".join(
                "".join(b["text"]["text"].split()) for m in cards for b in m["blocks"])


def _check_samples(fake: FakeSlack, cards: list[dict[str, Any]], payload: dict) -> None:
    examples = payload["examples"]
    edits = [b["accessory"] for m in cards for b in m["blocks"] if "accessory" in b]
    shown = min(len(examples), B.MAX_SAMPLES_SHOWN)
    assert [B.decode_index(e["value"]) for e in edits] == list(range(shown))
    assert len({e["action_id"] for e in edits}) == shown
    # these are long: previews are cut, so all samples come in full as a JSONL file
    full = B.samples_file(examples, payload.get("round", 1)).content
    assert [f for f in fake.files.values() if f.get("content") == full
            and f.get("thread_ts") == ROOT]
    rows = [json.loads(x) for x in full.decode().splitlines()]
    assert rows == [{"prompt": e["prompt"], "response": e["response"]} for e in examples]
    assert "in full are in" in _all_text(cards[:1])


@pytest.mark.parametrize("case", CASES)
def test_progress_say_and_error_are_accepted(fake: FakeSlack, db: Database, case: str) -> None:
    n = _notifier(fake, db)
    start, refused_before = len(fake.messages), len(fake.refused)
    stop = Action("stop_run", content(case, 200), "9", "danger")
    for size in (100, 5000, 50_000):  # posted once, then edited in place
        n.progress(TID, f"run:{case}", content(case, size), [stop])
    n.say(TID, content(case, 30_000))
    n.error(TID, content(case, 50_000))
    assert fake.refused[refused_before:] == []
    posted = _new_messages(fake, start)
    progress = posted[0]
    assert progress["edits"] == 2
    (btn,) = [e for b in progress["blocks"] if b["type"] == "actions" for e in b["elements"]]
    assert (btn["action_id"], btn["value"]) == ("stop_run", "9")
    said = "".join(m["text"] for m in posted[1:])
    long_say = content(case, 30_000)
    if L.slack_len(long_say) < 35_000:  # nothing lost: in the thread ...
        assert "".join(long_say.split()) in "".join(said.split())
    else:  # ... or, past ten messages, in a file next to them
        assert [f for f in fake.files.values() if f.get("content") == long_say.encode()]
    error = ":warning: " + content(case, 50_000)
    assert [f for f in fake.files.values() if f.get("content") == error.encode()]
    assert "message.txt, attached here" in said


@pytest.mark.parametrize("case", CASES)
def test_modals_and_home_are_accepted(fake: FakeSlack, db: Database, case: str) -> None:
    client = WebClient(token=BOT_TOKEN, base_url=fake.base_url)
    assert client.views_open(trigger_id="t.1", view=B.feedback_modal(
        "int-" + "9" * 40, TID, "regenerate", content(case, 200)))["ok"]
    fits = {"prompt": content(case, 1400), "response": content(case, 1490)}
    assert B.fits_editor(fits)
    for index in (0, 19, 10**6):
        assert client.views_open(trigger_id="t.2", view=B.sample_edit_modal(
            "int-1", TID, index, fits))["ok"]
    # too long for the editor box as Slack counts (UTF-16 units): the handler says so
    # instead of opening a modal Slack would refuse
    too_long = {"prompt": "p", "response": content(case, 3001)}
    assert not B.fits_editor(too_long)
    assert check_view(B.sample_edit_modal("int-1", TID, 0, too_long)) is not None
    with db.session() as s:
        for k in range(400):
            s.add(Project(thread_id=f"T:C:{k}", team_id="T", channel_id="C", thread_ts=str(k),
                          created_by="U", name=content(case, 300, k)))
        s.commit()
    assert client.views_publish(user_id="U1", view=home_view(db))["ok"]


def test_eight_long_samples_are_split_not_lost() -> None:
    """~15,000 characters of samples do not fit one message (msg_blocks_too_long): they
    come as several messages, each accepted, all shown in full, buttons on the last."""
    examples = [{"prompt": f"Write an SEO meta description for product {k}: " + "x" * 250,
                 "response": ("Discover our premium product with fast shipping. " * 34)[:1650]}
                for k in range(8)]
    card = B.ask_card("int-seo", TID, {"kind": "samples", "examples": examples})
    assert card.attachment is None  # nothing had to be shortened
    assert len(card.messages) >= 2
    assert all(check_message("chat.postMessage", {"text": m.text, "blocks": m.blocks}) is None
               for m in card.messages)
    everything = json.dumps([m.blocks for m in card.messages])
    for ex in examples:
        assert json.dumps(ex["response"])[1:-1] in everything
    assert [e["action_id"] for e in card.messages[-1].blocks[-1]["elements"]] == \
        [B.SAMPLES_APPROVE, B.SAMPLES_REGENERATE]
    # the old single card is refused by Slack's total-text limit
    single = [b for m in card.messages for b in m.blocks if b["type"] != "actions"]
    assert check_message("chat.postMessage", {"text": "x", "blocks": single + [
        card.messages[-1].blocks[-1]]})["error"] == "msg_blocks_too_long"


# ---------------------------------------------------------------------- refused -> reduced
@pytest.mark.parametrize("error", ["invalid_blocks", "msg_blocks_too_long", "msg_too_long"])
def test_refused_card_is_logged_and_reposted_reduced_with_its_buttons(
        fake: FakeSlack, db: Database, caplog: pytest.LogCaptureFixture, error: str) -> None:
    n = _notifier(fake, db)
    start = len(fake.messages)
    fake.inject("chat.postMessage", error, response_metadata={
        "messages": ["[ERROR] must be less than 3001 characters [json-pointer:/blocks/3/text/text]"]})
    few = [{"prompt": f"p{k} & <x>", "response": "r"} for k in range(3)]
    with caplog.at_level(logging.WARNING):
        n.ask(TID, "int-r", {"kind": "samples", "examples": few})
    (msg,) = _new_messages(fake, start)
    assert error in caplog.text and "json-pointer:/blocks/3/text/text" in caplog.text
    assert "shortened copy" in msg["blocks"][0]["text"]["text"]
    els = [e for b in msg["blocks"] if b["type"] == "actions" for e in b["elements"]]
    assert [e["action_id"] for e in els] == [
        f"{B.SAMPLES_EDIT}:0", f"{B.SAMPLES_EDIT}:1", f"{B.SAMPLES_EDIT}:2",
        B.SAMPLES_APPROVE, B.SAMPLES_REGENERATE]
    full = B.ask_card("int-r", TID, {"kind": "samples", "examples": few})
    assert [e["value"] for e in els] == [e["value"] for e in buttons_of(full.messages[-1].blocks)]
    assert [e["text"]["text"] for e in els][:3] == ["Edit 1", "Edit 2", "Edit 3"]


def test_refused_progress_update_is_retried_reduced(fake: FakeSlack, db: Database,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    n = _notifier(fake, db)
    start = len(fake.messages)
    n.progress(TID, "run:r", "step 1", [Action("stop_run", "Stop", "5", "danger")])
    fake.inject("chat.update", "msg_blocks_too_long")
    n.progress(TID, "run:r", "step 2", [Action("stop_run", "Stop", "5", "danger")])
    (msg,) = _new_messages(fake, start)
    assert msg["edits"] == 1 and msg["text"] == "step 2"
    assert "shortened copy" in json.dumps(msg["blocks"])
    (btn,) = [e for b in msg["blocks"] if b["type"] == "actions" for e in b["elements"]]
    assert (btn["action_id"], btn["value"]) == ("stop_run", "5")
    assert "msg_blocks_too_long" in caplog.text


def test_card_refused_twice_says_so_in_the_thread(fake: FakeSlack, db: Database) -> None:
    n = _notifier(fake, db)
    start = len(fake.messages)
    fake.inject("chat.postMessage", "invalid_blocks", times=2)
    n.ask(TID, "int-x", {"kind": "launch", "estimate": {}, "dataset": {}})
    (msg,) = _new_messages(fake, start)
    assert msg["text"].startswith(":warning: Slack refused to show a card here (invalid_blocks)")


def test_other_errors_are_not_retried(fake: FakeSlack, db: Database) -> None:
    n = _notifier(fake, db)
    calls = len(fake.calls_to("chat.postMessage"))
    fake.inject("chat.postMessage", "channel_not_found")
    n.ask(TID, "int-y", {"kind": "launch", "estimate": {}, "dataset": {}})
    assert len(fake.calls_to("chat.postMessage")) == calls + 1


# ---------------------------------------------------------------------- clicking them
@pytest.mark.parametrize("case", ["escapes", "emoji", "mixed"])
def test_worst_case_cards_can_be_clicked_and_closed(make_bot: Any, case: str) -> None:  # noqa: F811
    """The primary button of every worst-case card works over the wire, and the card's
    'done' edit (handlers._resume) is accepted by Slack too."""
    bot = make_bot()
    client = WebClient(token=BOT_TOKEN, base_url=bot.fake.base_url)
    n = SlackNotifier(client, bot.db)
    primary = {"spec": B.SPEC_APPROVE, "samples": B.SAMPLES_APPROVE, "launch": B.LAUNCH,
               "deploy": B.DEPLOY, "deployed": B.UNDEPLOY}
    clicked = []
    for i, payload in enumerate(p for p in payloads(case) if p["kind"] in primary):
        iid = f"int-click-{i}"
        clicked.append(iid)
        bot.runner.interrupts.setdefault(TID, []).append(iid)
        start = len(bot.fake.messages)
        n.ask(TID, iid, payload)
        last = _new_messages(bot.fake, start)[-1]
        (btn,) = [e for b in last["blocks"] if b["type"] == "actions" for e in b["elements"]
                  if e["action_id"] == primary[payload["kind"]]]
        bot.post(block_action(btn["action_id"], btn["value"], user="U1", channel=CH,
                              message=last), kind="interactive")
        bot.fake.wait_for(lambda m=last: m.get("edits"), 10)
        assert all(b["type"] != "actions" for b in last["blocks"])
    bot.idle()
    assert bot.fake.refused == []
    assert [iid for _, iid, _ in bot.runner.of("resume")] == clicked


# ---------------------------------------------------------------------- the arithmetic
@pytest.mark.parametrize("case", CASES)
def test_split_and_clip_keep_text_whole_and_measured(case: str) -> None:
    raw = content(case, 20_000)
    escaped = L.escape(raw)
    chunks = L.split(escaped, 2900)
    assert all(0 < L.slack_len(c) <= 2900 for c in chunks)
    assert "".join("".join(chunks).split()) == "".join(escaped.split())  # nothing lost
    for c in chunks:  # no entity cut in two
        assert not re.search(r"&(?!amp;|lt;|gt;)", c)
    short, cut = L.clip_escaped(raw, 1000)
    assert cut and L.slack_len(short) <= 1000 and short.endswith(L.ELLIPSIS)
    assert escaped.startswith(short[:-1].rstrip())


def test_combining_marks_and_surrogates_stay_with_their_base() -> None:
    s = "e\u0301" * 10
    for n in range(2, 12):
        c = L.clip(s, n)
        assert c.replace("…", "").count("e") == c.replace("…", "").count("\u0301")
    emoji = "😀" * 10
    assert L.slack_len(emoji) == 20 and L.clip(emoji, 5) == "😀😀…"
    assert L.split(emoji, 5) == ["😀😀", "😀😀", "😀😀", "😀😀", "😀😀"]
