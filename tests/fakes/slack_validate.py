"""Block Kit validation for FakeSlack: refuse what the real Slack API refuses.

FakeSlack calls `check_message` for chat.postMessage / chat.update / chat.postEphemeral
and `check_view` for views.open / views.update / views.push / views.publish. Each returns
None when Slack would accept the payload, else the error response Slack sends.

Where a limit is documented it is cited next to its check. Where Slack's behaviour is
unclear the harsher reading is taken (and says so):
- lengths are counted in UTF-16 code units (an emoji counts 2). Slack's server-side count
  is undocumented; its clients and HTML `maxlength` count UTF-16 code units
  (https://developer.mozilla.org/docs/Web/HTML/Attributes/maxlength), never fewer than
  the code points Python counts.
- text that is only whitespace counts as empty.
- action_id and block_id must be unique in the whole message or view (Slack documents
  "unique among all other action_ids in the containing block" and "block_id should be
  unique for each message"; slack-php/slack-php-block-kit#3 applies both per surface).
- any block or element type this module does not know is refused, so a new kind of block
  in the bot is never accepted unchecked.
"""

from __future__ import annotations

import json
from typing import Any

# https://docs.slack.dev/reference/block-kit/blocks: "up to 50 blocks in each message,
# and 100 blocks in modals or Home tabs"
MESSAGE_BLOCKS = 50
VIEW_BLOCKS = 100
# text object: "minimum length is 1 and maximum length is 3000 characters"
# https://docs.slack.dev/reference/block-kit/composition-objects/text-object
TEXT_MAX = 3000
# section fields: "Maximum number of items is 10. Maximum length for the text in each item
# is 2000 characters." https://docs.slack.dev/reference/block-kit/blocks/section-block
FIELDS_MAX, FIELD_TEXT_MAX = 10, 2000
# header: plain_text, "Maximum length for the text in this field is 150 characters"
# https://docs.slack.dev/reference/block-kit/blocks/header-block
HEADER_MAX = 150
# context: "An array of image elements and text objects. Maximum number of items is 10."
# https://docs.slack.dev/reference/block-kit/blocks/context-block
CONTEXT_MAX = 10
# actions: "There is a maximum of 25 elements in each action block."
# https://api.slack.com/reference/block-kit/blocks (slack_sdk ActionsBlock.elements_max_length)
ACTIONS_MAX = 25
# block_id / action_id: "Maximum length for this field is 255 characters" (section-block
# docs; slack_sdk models/blocks/blocks.py block_id_max_length, block_elements.py
# action_id_max_length)
ID_MAX = 255
# button: text 75, value 2000, url 3000 (slack_sdk models/blocks/block_elements.py
# ButtonElement.text_max_length / value_max_length / url_max_length;
# https://docs.slack.dev/reference/block-kit/block-elements/button-element)
BUTTON_TEXT_MAX, BUTTON_VALUE_MAX, URL_MAX = 75, 2000, 3000
BUTTON_STYLES = ("primary", "danger")
# input: label and hint "Maximum length for the text in this field is 2000 characters"
# https://docs.slack.dev/reference/block-kit/blocks/input-block
LABEL_MAX = 2000
# plain_text_input: min_length 0..3000, max_length 1..3000, placeholder 150
# https://docs.slack.dev/reference/block-kit/block-elements/plain-text-input-element,
# slack_sdk block_elements.py placeholder_max_length. initial_value has no documented cap:
# harsher reading, it must fit max_length (or 3000 when none is given).
INPUT_MAX, PLACEHOLDER_MAX = 3000, 150
# image element/block: image_url 3000, alt_text 2000 (slack_sdk ImageElement / ImageBlock)
ALT_TEXT_MAX = 2000
# modal: title 24 (required), close 24, submit 24 (required with an input block),
# private_metadata 3000, callback_id 255. https://docs.slack.dev/reference/views/modal-views
# (slack_sdk models/views View validators apply the same to Home tabs)
TITLE_MAX, METADATA_MAX = 24, 3000
# views.*: "view_too_large: Error returned if the provided view is greater than 250kb."
# (slack-ruby/slack-api-ref methods/views/views.open.json)
VIEW_BYTES_MAX = 250 * 1024
# chat.postMessage `text`: Slack truncates past 40,000 characters with a warning
# (https://api.slack.com/changelog/2018-04-truncating-really-long-messages) and documents
# msg_too_long "Message text is too long" (slack-ruby/slack-api-ref chat.postMessage.json).
# Harsher reading: refuse.
MESSAGE_TEXT_MAX = 40_000
# chat.update refuses a `text` over 4,000 UTF-8 bytes with msg_too_long (observed by
# effect-ts, packages/chat/slack/src/internal/text.ts "updateTextBytes").
UPDATE_TEXT_BYTES_MAX = 4000
# msg_blocks_too_long: a message whose blocks hold too much text in total, even with each
# block in its limits (slackapi/bolt-js#2509: markdown-only blocks fail past 13,297
# characters and one divider lowers that by 125; a Slack engineer there: "12,000 text
# characters with a buffer for block containers"; slackapi/bolt-js#2867: 11,341 characters
# of `.text` were still refused). Harsher reading: every string in the blocks (texts,
# values, ids) plus 125 per block must stay within 12,000.
BLOCKS_TEXT_MAX = 12_000
BLOCK_OVERHEAD = 125


def u16(s: str) -> int:
    """Length as Slack's clients count it: UTF-16 code units."""
    return len(s.encode("utf-16-le")) // 2


def blocks_size(blocks: list[Any]) -> int:
    """What msg_blocks_too_long measures (see BLOCKS_TEXT_MAX)."""
    def walk(v: Any, key: str = "") -> int:
        if isinstance(v, str):
            return 0 if key in ("type", "style") else u16(v)
        if isinstance(v, dict):
            return sum(walk(x, k) for k, x in v.items())
        if isinstance(v, list):
            return sum(walk(x, key) for x in v)
        return 0

    return walk(blocks) + BLOCK_OVERHEAD * len(blocks)


class _Checker:
    """Walks one message's or view's blocks and collects Slack-style error strings."""

    def __init__(self, surface: str) -> None:
        self.surface = surface  # "message" | "modal" | "home"
        self.errors: list[str] = []
        self.action_ids: set[str] = set()
        self.block_ids: set[str] = set()

    def fail(self, ptr: str, msg: str) -> None:
        # the real response: "must be less than 3001 characters [json-pointer:/blocks/0/text/text]"
        # (invalid_blocks body quoted at https://brainxx.org/blog/fixing-slack-api-error-message)
        self.errors.append(f"{msg} [json-pointer:{ptr}]")

    # ------------------------------------------------------------------ primitives
    def string(self, v: Any, ptr: str, *, max_len: int, min_len: int = 1) -> None:
        if not isinstance(v, str):
            self.fail(ptr, "must be a string")
        elif len(v.strip()) < min_len:
            self.fail(ptr, f"must be more than {min_len - 1} characters")
        elif u16(v) > max_len:
            self.fail(ptr, f"must be less than {max_len + 1} characters")

    def text(self, obj: Any, ptr: str, *, max_len: int = TEXT_MAX, plain: bool = False) -> None:
        allowed = ("plain_text",) if plain else ("plain_text", "mrkdwn")
        if not isinstance(obj, dict) or obj.get("type") not in allowed:
            self.fail(ptr, f"must be a text object of type {' or '.join(allowed)}")
            return
        self.string(obj.get("text"), ptr + "/text", max_len=min(max_len, TEXT_MAX))

    def ident(self, v: Any, ptr: str, seen: set[str], what: str) -> None:
        if v is None:
            return
        self.string(v, ptr, max_len=ID_MAX)
        if isinstance(v, str):
            if v in seen:
                self.fail(ptr, f"duplicate {what} {v!r}")
            seen.add(v)

    def url(self, v: Any, ptr: str) -> None:
        if v is not None:
            self.string(v, ptr, max_len=URL_MAX)

    # ------------------------------------------------------------------ elements
    def element(self, e: Any, ptr: str, allowed: tuple[str, ...]) -> None:
        kind = e.get("type") if isinstance(e, dict) else None
        if kind not in allowed:
            self.fail(ptr, f"element type {kind!r} is not allowed here")
            return
        getattr(self, "_el_" + kind)(e, ptr)

    def _el_button(self, e: dict, ptr: str) -> None:
        self.text(e.get("text"), ptr + "/text", max_len=BUTTON_TEXT_MAX, plain=True)
        self.ident(e.get("action_id"), ptr + "/action_id", self.action_ids, "action_id")
        if e.get("value") is not None:
            self.string(e["value"], ptr + "/value", max_len=BUTTON_VALUE_MAX)
        self.url(e.get("url"), ptr + "/url")
        if e.get("style") is not None and e["style"] not in BUTTON_STYLES:
            self.fail(ptr + "/style", "must be one of primary, danger")

    def _el_image(self, e: dict, ptr: str) -> None:
        self.url(e.get("image_url"), ptr + "/image_url")
        self.string(e.get("alt_text"), ptr + "/alt_text", max_len=ALT_TEXT_MAX)

    def _el_plain_text(self, e: dict, ptr: str) -> None:  # a context element
        self.text(e, ptr)

    def _el_mrkdwn(self, e: dict, ptr: str) -> None:
        self.text(e, ptr)

    def _el_plain_text_input(self, e: dict, ptr: str) -> None:
        self.ident(e.get("action_id"), ptr + "/action_id", self.action_ids, "action_id")
        lo, hi = e.get("min_length"), e.get("max_length")
        if hi is not None and not (isinstance(hi, int) and 1 <= hi <= INPUT_MAX):
            self.fail(ptr + "/max_length", f"must be between 1 and {INPUT_MAX}")
        if lo is not None and not (isinstance(lo, int) and 0 <= lo <= INPUT_MAX):
            self.fail(ptr + "/min_length", f"must be between 0 and {INPUT_MAX}")
        if isinstance(lo, int) and isinstance(hi, int) and lo > hi:
            self.fail(ptr + "/min_length", "must not exceed max_length")
        if e.get("initial_value") is not None:
            cap = hi if isinstance(hi, int) and 1 <= hi <= INPUT_MAX else INPUT_MAX
            self.string(e["initial_value"], ptr + "/initial_value", max_len=cap, min_len=0)
        if e.get("placeholder") is not None:
            self.text(e["placeholder"], ptr + "/placeholder", max_len=PLACEHOLDER_MAX, plain=True)

    # ------------------------------------------------------------------ blocks
    def block(self, b: Any, ptr: str) -> None:
        kind = b.get("type") if isinstance(b, dict) else None
        allowed: tuple[str, ...] = ("section", "divider", "header", "context", "actions", "image")
        if self.surface != "message":  # input blocks: modals and Home tabs
            allowed += ("input",)
        if kind not in allowed:
            self.fail(ptr, f"block type {kind!r} is not allowed here")
            return
        self.ident(b.get("block_id"), ptr + "/block_id", self.block_ids, "block_id")
        getattr(self, "_bl_" + kind)(b, ptr)

    def _bl_section(self, b: dict, ptr: str) -> None:
        if b.get("text") is None and not b.get("fields"):
            self.fail(ptr, "must provide text or fields")
        if b.get("text") is not None:
            self.text(b["text"], ptr + "/text")
        fields = b.get("fields")
        if fields is not None:
            if not isinstance(fields, list) or not 1 <= len(fields) <= FIELDS_MAX:
                self.fail(ptr + "/fields", f"must hold 1 to {FIELDS_MAX} items")
            else:
                for i, f in enumerate(fields):
                    self.text(f, f"{ptr}/fields/{i}", max_len=FIELD_TEXT_MAX)
        if b.get("accessory") is not None:
            self.element(b["accessory"], ptr + "/accessory", ("button", "image"))

    def _bl_divider(self, b: dict, ptr: str) -> None:
        pass

    def _bl_header(self, b: dict, ptr: str) -> None:
        self.text(b.get("text"), ptr + "/text", max_len=HEADER_MAX, plain=True)

    def _bl_image(self, b: dict, ptr: str) -> None:
        self._el_image(b, ptr)
        if b.get("title") is not None:
            self.text(b["title"], ptr + "/title", max_len=ALT_TEXT_MAX, plain=True)

    def _elements(self, b: dict, ptr: str, most: int, allowed: tuple[str, ...]) -> None:
        els = b.get("elements")
        if not isinstance(els, list) or not 1 <= len(els) <= most:
            self.fail(ptr + "/elements", f"must hold 1 to {most} items")
            return
        for i, e in enumerate(els):
            self.element(e, f"{ptr}/elements/{i}", allowed)

    def _bl_context(self, b: dict, ptr: str) -> None:
        self._elements(b, ptr, CONTEXT_MAX, ("image", "plain_text", "mrkdwn"))

    def _bl_actions(self, b: dict, ptr: str) -> None:
        self._elements(b, ptr, ACTIONS_MAX, ("button",))

    def _bl_input(self, b: dict, ptr: str) -> None:
        self.text(b.get("label"), ptr + "/label", max_len=LABEL_MAX, plain=True)
        if b.get("hint") is not None:
            self.text(b["hint"], ptr + "/hint", max_len=LABEL_MAX, plain=True)
        self.element(b.get("element"), ptr + "/element", ("plain_text_input",))

    def blocks(self, blocks: Any, ptr: str, most: int, *, required: bool) -> None:
        if not isinstance(blocks, list):
            self.fail(ptr, "must be an array of blocks")
            return
        if required and not blocks:
            self.fail(ptr, "must hold at least 1 block")
        if len(blocks) > most:
            self.fail(ptr, f"must hold at most {most} blocks")
        for i, b in enumerate(blocks):
            self.block(b, f"{ptr}/{i}")


def _parse(v: Any) -> Any:
    if isinstance(v, str):
        try:
            return json.loads(v)
        except ValueError:
            return v
    return v


def _refused(error: str, messages: list[str], *, with_errors: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"ok": False, "error": error,
                            "response_metadata": {"messages": [f"[ERROR] {m}" for m in messages]}}
    if with_errors:
        body["errors"] = list(messages)
    return body


def check_message(method: str, args: dict[str, Any]) -> dict[str, Any] | None:
    """None if Slack would accept this chat.* call's text and blocks, else its error body."""
    blocks = _parse(args.get("blocks"))
    text = args.get("text")
    if isinstance(text, str) and u16(text) > MESSAGE_TEXT_MAX:
        return {"ok": False, "error": "msg_too_long"}
    if method == "chat.update" and isinstance(text, str) \
            and len(text.encode()) > UPDATE_TEXT_BYTES_MAX:
        return {"ok": False, "error": "msg_too_long"}
    if not (isinstance(text, str) and text.strip()) and not blocks:
        return {"ok": False, "error": "no_text"}
    if blocks in (None, []):
        return None
    if not isinstance(blocks, list):
        # "invalid_blocks_format: The blocks is not a valid JSON object or doesn't match
        # the Block Kit syntax." (chat.postMessage errors)
        return {"ok": False, "error": "invalid_blocks_format"}
    c = _Checker("message")
    c.blocks(blocks, "/blocks", MESSAGE_BLOCKS, required=False)
    if c.errors:
        return _refused("invalid_blocks", c.errors, with_errors=True)
    if blocks_size(blocks) > BLOCKS_TEXT_MAX:
        return {"ok": False, "error": "msg_blocks_too_long"}
    return None


def check_view(view: Any) -> dict[str, Any] | None:
    """None if Slack would accept this view for views.*, else its error body.

    views.* answer schema failures with invalid_arguments and the reasons in
    response_metadata.messages (slack-ruby/slack-api-ref methods/views/views.open.json;
    "[ERROR] must be less than 24 characters [json-pointer:/view/title/text]" quoted in
    jeremeamia/slack-block-kit#3)."""
    view = _parse(view)
    if not isinstance(view, dict):
        return _refused("invalid_arguments", ["view must be a JSON object [json-pointer:/view]"],
                        with_errors=False)
    if len(json.dumps(view).encode()) > VIEW_BYTES_MAX:
        return {"ok": False, "error": "view_too_large"}
    kind = view.get("type")
    if kind not in ("modal", "home"):
        return _refused("invalid_arguments", ["type must be modal or home [json-pointer:/view/type]"],
                        with_errors=False)
    c = _Checker(kind)
    blocks = view.get("blocks")
    c.blocks(blocks, "/view/blocks", VIEW_BLOCKS, required=kind == "modal")
    if view.get("private_metadata") is not None:
        c.string(view["private_metadata"], "/view/private_metadata", max_len=METADATA_MAX,
                 min_len=0)
    if view.get("callback_id") is not None:
        c.string(view["callback_id"], "/view/callback_id", max_len=ID_MAX)
    if kind == "modal":
        c.text(view.get("title"), "/view/title", max_len=TITLE_MAX, plain=True)
        for key in ("submit", "close"):
            if view.get(key) is not None:
                c.text(view[key], f"/view/{key}", max_len=TITLE_MAX, plain=True)
        has_input = isinstance(blocks, list) and any(
            isinstance(b, dict) and b.get("type") == "input" for b in blocks)
        if has_input and view.get("submit") is None:
            c.fail("/view/submit", "is required when an input block is present")
    if c.errors:
        return _refused("invalid_arguments", c.errors, with_errors=False)
    return None
