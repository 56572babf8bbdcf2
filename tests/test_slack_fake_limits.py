"""FakeSlack refuses what Slack refuses: Block Kit limits, message size, failure injection.

Every payload goes through the real slack_sdk WebClient, so what is checked is what our
code would send on the wire. Each limit is probed just inside (accepted) and just outside
(refused with Slack's error and response shape).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError

from tests.fakes.slack_fake import BOT_TOKEN, FakeSlack

CH = "C0LIMITS"
EMOJI = "😀"  # one code point, two UTF-16 units


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeSlack]:
    with FakeSlack() as f:
        yield f


@pytest.fixture
def client(fake: FakeSlack) -> WebClient:
    return WebClient(token=BOT_TOKEN, base_url=fake.base_url)


def sec(text: str, **extra: Any) -> dict[str, Any]:
    return {"type": "section", "text": {"type": "mrkdwn", "text": text}, **extra}


def btn(action_id: str = "a", text: str = "Go", value: str = "v") -> dict[str, Any]:
    return {"type": "button", "action_id": action_id,
            "text": {"type": "plain_text", "text": text}, "value": value}


def post(client: WebClient, blocks: list[dict[str, Any]], text: str = "t") -> dict[str, Any]:
    return client.chat_postMessage(channel=CH, text=text, blocks=blocks).data  # type: ignore[return-value]


def refused(client: WebClient, blocks: list[dict[str, Any]], text: str = "t") -> dict[str, Any]:
    with pytest.raises(SlackApiError) as e:
        client.chat_postMessage(channel=CH, text=text, blocks=blocks)
    return e.value.response.data  # type: ignore[return-value]


def modal(blocks: list[dict[str, Any]] | None = None, **over: Any) -> dict[str, Any]:
    v: dict[str, Any] = {"type": "modal", "title": {"type": "plain_text", "text": "Title"},
                         "blocks": blocks if blocks is not None else [sec("hi")]}
    v.update(over)
    return {k: x for k, x in v.items() if x is not None}


def open_refused(client: WebClient, view: dict[str, Any]) -> dict[str, Any]:
    with pytest.raises(SlackApiError) as e:
        client.views_open(trigger_id="trig.1", view=view)
    return e.value.response.data  # type: ignore[return-value]


# ---------------------------------------------------------------------- per-block limits
@pytest.mark.parametrize("ok,bad", [
    ([sec("x" * 3000)], [sec("x" * 3001)]),
    ([sec(EMOJI * 1500)], [sec(EMOJI * 1500 + "x")]),  # counted in UTF-16 units
    ([{"type": "section", "fields": [{"type": "mrkdwn", "text": "f"}] * 10}],
     [{"type": "section", "fields": [{"type": "mrkdwn", "text": "f"}] * 11}]),
    ([{"type": "section", "fields": [{"type": "mrkdwn", "text": "f" * 2000}]}],
     [{"type": "section", "fields": [{"type": "mrkdwn", "text": "f" * 2001}]}]),
    ([{"type": "header", "text": {"type": "plain_text", "text": "h" * 150}}],
     [{"type": "header", "text": {"type": "plain_text", "text": "h" * 151}}]),
    ([{"type": "actions", "elements": [btn(text="b" * 75)]}],
     [{"type": "actions", "elements": [btn(text="b" * 76)]}]),
    ([{"type": "actions", "elements": [btn(value="v" * 2000)]}],
     [{"type": "actions", "elements": [btn(value="v" * 2001)]}]),
    ([{"type": "actions", "elements": [btn(action_id="a" * 255)]}],
     [{"type": "actions", "elements": [btn(action_id="a" * 256)]}]),
    ([{"type": "actions", "elements": [btn(action_id=f"a{i}") for i in range(25)]}],
     [{"type": "actions", "elements": [btn(action_id=f"a{i}") for i in range(26)]}]),
    ([{"type": "context", "elements": [{"type": "mrkdwn", "text": "c"}] * 10}],
     [{"type": "context", "elements": [{"type": "mrkdwn", "text": "c"}] * 11}]),
    ([sec("x", block_id="b" * 255)], [sec("x", block_id="b" * 256)]),
    ([sec("x" * 60) for _ in range(50)], [sec("x" * 60) for _ in range(51)]),
    ([sec("one")], [sec("   ")]),  # whitespace only is empty (harsher reading)
    ([sec("a", accessory=btn("e1")), sec("b", accessory=btn("e2"))],
     [sec("a", accessory=btn("e")), sec("b", accessory=btn("e"))]),  # action_id unique
    ([sec("a", block_id="x"), sec("b", block_id="y")],
     [sec("a", block_id="x"), sec("b", block_id="x")]),  # block_id unique
    ([sec("a")], [{"type": "input", "label": {"type": "plain_text", "text": "l"},
                   "element": {"type": "plain_text_input"}}]),  # no input blocks in messages
    ([sec("a")], [{"type": "carousel_of_doom"}]),  # unknown types are not waved through
    ([{"type": "actions", "elements": [{**btn(), "style": "danger"}]}],
     [{"type": "actions", "elements": [{**btn(), "style": "green"}]}]),
])
def test_block_limits(client: WebClient, ok: list[dict], bad: list[dict]) -> None:
    assert post(client, ok)["ok"] is True
    body = refused(client, bad)
    assert body["error"] == "invalid_blocks"
    # Slack's shape: errors plus response_metadata.messages with json pointers
    assert body["errors"] and all("[json-pointer:/blocks" in m for m in body["errors"])
    assert [m.startswith("[ERROR] ") for m in body["response_metadata"]["messages"]] == \
        [True] * len(body["errors"])


def test_invalid_blocks_names_the_field(client: WebClient) -> None:
    body = refused(client, [sec("ok"), sec("x" * 3001)])
    assert body["errors"] == ["must be less than 3001 characters [json-pointer:/blocks/1/text/text]"]


# ---------------------------------------------------------------------- whole-message limits
def test_blocks_text_total_over_12000_is_msg_blocks_too_long(client: WebClient) -> None:
    # each block is fine; together they are too much (slackapi/bolt-js#2509, #2867)
    five = [sec("x" * 2300) for _ in range(5)]  # 11,500 text + 5 x 125 container overhead
    assert refused(client, five)["error"] == "msg_blocks_too_long"
    assert post(client, [sec("x" * 2200) for _ in range(5)])["ok"] is True  # 11,625
    values = [{"type": "actions", "elements": [btn(f"a{i}", value="v" * 2000)
                                               for i in range(6)]}]
    assert refused(client, values)["error"] == "msg_blocks_too_long"  # values count too


def test_text_limits(client: WebClient, fake: FakeSlack) -> None:
    assert client.chat_postMessage(channel=CH, text="x" * 40_000)["ok"]
    with pytest.raises(SlackApiError) as e:
        client.chat_postMessage(channel=CH, text="x" * 40_001)
    assert e.value.response["error"] == "msg_too_long"
    with pytest.raises(SlackApiError) as e:
        client.chat_postMessage(channel=CH, text=" ")
    assert e.value.response["error"] == "no_text"
    with pytest.raises(SlackApiError) as e:
        client.chat_postEphemeral(channel=CH, user="U1", text="t", blocks=[sec("x" * 3001)])
    assert e.value.response["error"] == "invalid_blocks"
    # chat.update takes at most 4,000 bytes of text (effect-ts text.ts updateTextBytes)
    ts = client.chat_postMessage(channel=CH, text="short")["ts"]
    assert client.chat_update(channel=CH, ts=ts, text="é" * 2000)["ok"]  # 4,000 bytes
    with pytest.raises(SlackApiError) as e:
        client.chat_update(channel=CH, ts=ts, text="é" * 2001)
    assert e.value.response["error"] == "msg_too_long"
    with pytest.raises(SlackApiError) as e:
        client.chat_update(channel=CH, ts=ts, text="t", blocks=[sec("x" * 3001)])
    assert e.value.response["error"] == "invalid_blocks"
    (msg,) = [m for m in fake.messages if m["ts"] == ts]
    assert msg["text"] == "é" * 2000  # refused updates change nothing


# ---------------------------------------------------------------------- views
def _input(initial: str | None = None, **el: Any) -> dict[str, Any]:
    element: dict[str, Any] = {"type": "plain_text_input", "action_id": "t", **el}
    if initial is not None:
        element["initial_value"] = initial
    return {"type": "input", "block_id": "in", "label": {"type": "plain_text", "text": "L"},
            "element": element}


SUBMIT = {"type": "plain_text", "text": "Send"}


@pytest.mark.parametrize("ok,bad", [
    (modal(), modal(title={"type": "plain_text", "text": "t" * 25})),
    (modal(title={"type": "plain_text", "text": "t" * 24}), modal(title=None)),
    (modal(submit={"type": "plain_text", "text": "s" * 24}),
     modal(submit={"type": "plain_text", "text": "s" * 25})),
    (modal(close={"type": "plain_text", "text": "c" * 24}),
     modal(close={"type": "plain_text", "text": "c" * 25})),
    (modal(private_metadata="m" * 3000), modal(private_metadata="m" * 3001)),
    (modal(callback_id="c" * 255), modal(callback_id="c" * 256)),
    (modal([sec("x", block_id=f"b{i}") for i in range(100)]),
     modal([sec("x", block_id=f"b{i}") for i in range(101)])),
    (modal([_input("x" * 10, max_length=10)], submit=SUBMIT),
     modal([_input("x" * 11, max_length=10)], submit=SUBMIT)),
    (modal([_input("x" * 3000)], submit=SUBMIT), modal([_input("x" * 3001)], submit=SUBMIT)),
    (modal([_input(EMOJI * 1500)], submit=SUBMIT),
     modal([_input(EMOJI * 1501)], submit=SUBMIT)),
    (modal([_input(max_length=3000)], submit=SUBMIT),
     modal([_input(max_length=3001)], submit=SUBMIT)),
    (modal([_input()], submit=SUBMIT), modal([_input()])),  # submit is required with inputs
    (modal([_input(), {**_input(), "block_id": "in2", "element": {
        "type": "plain_text_input", "action_id": "t2"}}], submit=SUBMIT),
     modal([_input(), {**_input(), "block_id": "in2"}], submit=SUBMIT)),  # action_id unique
])
def test_modal_limits(client: WebClient, ok: dict, bad: dict) -> None:
    assert client.views_open(trigger_id="trig.1", view=ok)["ok"]
    body = open_refused(client, bad)
    # views.* answer invalid_arguments with the reasons (slack-api-ref views.open.json)
    assert body["error"] == "invalid_arguments"
    assert all(m.startswith("[ERROR] ") and "[json-pointer:/view" in m
               for m in body["response_metadata"]["messages"])


def test_home_tab_limits_and_other_view_methods(client: WebClient, fake: FakeSlack) -> None:
    home = {"type": "home", "blocks": [sec("x", block_id=f"b{i}") for i in range(100)]}
    assert client.views_publish(user_id="U1", view=home)["ok"]
    home["blocks"].append(sec("one too many"))
    with pytest.raises(SlackApiError) as e:
        client.views_publish(user_id="U1", view=home)
    assert e.value.response["error"] == "invalid_arguments"
    with pytest.raises(SlackApiError) as e:
        client.views_push(trigger_id="trig.2", view=modal(title=None))
    assert e.value.response["error"] == "invalid_arguments"
    with pytest.raises(SlackApiError) as e:
        client.views_update(view_id="V1", view=modal([sec("x" * 3001)]))
    assert e.value.response["error"] == "invalid_arguments"
    assert client.views_update(view_id="V1", view=modal())["ok"]
    big = {"type": "home", "blocks": [sec("x" * 2900, block_id=f"b{i}") for i in range(100)]}
    with pytest.raises(SlackApiError) as e:  # 290 kB of view
        client.views_publish(user_id="U1", view=big)
    assert e.value.response["error"] == "view_too_large"
    assert "update" in [v["kind"] for v in fake.views]


# ---------------------------------------------------------------------- injected failures
def test_inject_any_error_then_recovers(client: WebClient, fake: FakeSlack) -> None:
    fake.inject("chat.postMessage", "channel_not_found", times=2, warning="x")
    for _ in range(2):
        with pytest.raises(SlackApiError) as e:
            client.chat_postMessage(channel=CH, text="hi")
        assert e.value.response["error"] == "channel_not_found"
        assert e.value.response["warning"] == "x"
    assert client.chat_postMessage(channel=CH, text="hi")["ok"]
    fake.inject("views.open", "expired_trigger_id")
    with pytest.raises(SlackApiError) as e:
        client.views_open(trigger_id="trig.3", view=modal())
    assert e.value.response["error"] == "expired_trigger_id"


def test_inject_rate_limit_with_retry_after(client: WebClient, fake: FakeSlack) -> None:
    fake.inject("chat.update", retry_after=1.5)
    ts = client.chat_postMessage(channel=CH, text="a")["ts"]
    with pytest.raises(SlackApiError) as e:
        client.chat_update(channel=CH, ts=ts, text="b")
    assert e.value.response.status_code == 429
    assert e.value.response.headers["Retry-After"] in ("1.5", ["1.5"])
    assert e.value.response["error"] == "ratelimited"
    assert client.chat_update(channel=CH, ts=ts, text="b")["ok"]


def test_rate_limit_retry_handler_waits_retry_after(fake: FakeSlack) -> None:
    """The production client (bot.app.make_client) honours Retry-After."""
    from bot.app import make_client
    from storage.settings import Settings

    settings = Settings(_env_file=None, slack_bot_token=BOT_TOKEN,  # type: ignore[call-arg]
                        tuner_slack_api_url=fake.base_url)
    c = make_client(settings)
    fake.inject("chat.postMessage", retry_after=1)
    t0 = time.monotonic()
    assert c.chat_postMessage(channel=CH, text="after a wait")["ok"]
    assert time.monotonic() - t0 >= 0.9
