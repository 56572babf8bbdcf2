"""Laying content out in messages Slack accepts: sections, packing, the reduced fallback.

Cards are built as content "units" (blocks that belong together) plus a tail (the
buttons). `pack` fills messages up to Slack's block count and text budget and puts the
tail on the last one, so a card too big for one message becomes several and the buttons
always arrive. `reduced` is the last resort when Slack still refuses a message: a short
text and every button of the original, same action ids and values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bot import limits as L


@dataclass(frozen=True)
class Message:
    text: str  # the notification / fallback text
    blocks: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Attachment:
    filename: str
    content: bytes
    title: str


@dataclass(frozen=True)
class Card:
    """One card: the messages to post, in order, and maybe a file that goes with them."""

    messages: list[Message]
    attachment: Attachment | None = None


def section(text: str) -> dict[str, Any]:
    """One section of mrkdwn (already escaped where it holds user content)."""
    return {"type": "section", "text": {"type": "mrkdwn", "text": L.clip(text, L.SECTION_MAX)
                                        if text.strip() else "-"}}


def sections(text: str) -> list[dict[str, Any]]:
    """As many sections as the text needs; nothing is cut."""
    return [section(chunk) for chunk in L.split(text, L.SECTION_MAX)] or [section("-")]


def code_sections(escaped: str, title: str = "") -> list[dict[str, Any]]:
    """A code block split over sections, each chunk fenced on its own."""
    chunks = L.split(escaped, L.SECTION_MAX - 8) or ["-"]
    out = [section(f"```{c}```") for c in chunks]
    if title:
        out.insert(0, section(title))
    return out


def fallback(text: str) -> str:
    """A message's `text` (notifications, screen readers): short enough for any method."""
    return L.clip(text.strip() or "-", L.FALLBACK_MAX)


def _fits(blocks: list[dict[str, Any]], tail: list[dict[str, Any]]) -> bool:
    return (len(blocks) + len(tail) <= L.MESSAGE_BLOCKS_MAX
            and L.blocks_weight(blocks) + L.blocks_weight(tail) <= L.BLOCKS_BUDGET)


def pack(units: list[list[dict[str, Any]]], tail: list[dict[str, Any]], text: str) -> list[Message]:
    """Units in as few messages as fit; a unit stays whole unless it is bigger than a
    message on its own. The tail (buttons) ends the last message."""
    parts: list[list[dict[str, Any]]] = []
    cur: list[dict[str, Any]] = []
    for unit in units:
        if _fits(cur + unit, tail):
            cur += unit
            continue
        if cur and _fits(unit, tail):  # starts the next message whole
            parts.append(cur)
            cur = []
        for block in unit:  # (bigger than a message: it is split wherever it falls)
            if cur and not _fits(cur + [block], tail):
                parts.append(cur)
                cur = []
            cur.append(block)
    parts.append(cur + tail)
    n = len(parts)
    label = fallback(text)
    return [Message(label if n == 1 else fallback(f"{text} ({i}/{n})"), blocks)
            for i, blocks in enumerate(parts, 1)]


def buttons_of(blocks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every button of a message: in actions blocks and as section accessories."""
    found: list[dict[str, Any]] = []
    for b in blocks:
        if b.get("type") == "actions":
            found += [e for e in b.get("elements") or [] if e.get("type") == "button"]
        acc = b.get("accessory")
        if isinstance(acc, dict) and acc.get("type") == "button":
            found.append(acc)
    return found


def _plain_button(b: dict[str, Any], label: str) -> dict[str, Any]:
    out = {"type": "button", "action_id": b.get("action_id"),
           "text": {"type": "plain_text", "text": L.plain(label, L.BUTTON_TEXT_MAX)}}
    for key in ("value", "style", "url"):
        if b.get(key) is not None:
            out[key] = b[key]
    return {k: v for k, v in out.items() if v is not None}


def reduced(msg: Message, note: str) -> Message:
    """The message cut to a short text plus all its buttons (same ids and values)."""
    buttons = buttons_of(msg.blocks)
    labels = [str((b.get("text") or {}).get("text") or "Button") for b in buttons]
    seen: dict[str, int] = {}
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
    count: dict[str, int] = {}
    relabelled = []
    for b, label in zip(buttons, labels):
        count[label] = count.get(label, 0) + 1
        relabelled.append(_plain_button(b, f"{label} {count[label]}" if seen[label] > 1 else label))
    head = L.clip(msg.text or "-", 1500)
    blocks = [section(f"{head}\n_{note}_")]
    for i in range(0, len(relabelled), L.ACTIONS_MAX):
        blocks.append({"type": "actions", "elements": relabelled[i:i + L.ACTIONS_MAX]})
    return Message(fallback(msg.text), blocks[:L.MESSAGE_BLOCKS_MAX])


def single(text: str, tail: list[dict[str, Any]]) -> Message:
    """Text and buttons in exactly one message (a progress message is edited in place):
    the text is shortened when it cannot fit."""
    blocks: list[dict[str, Any]] = []
    for block in sections(text):
        if not _fits(blocks + [block], tail + [section(L.ELLIPSIS)]):
            blocks.append(section("_(shortened)_"))
            break
        blocks.append(block)
    return Message(fallback(text), blocks + tail)


def text_chunks(text: str, most: int = 10) -> tuple[list[str], bool]:
    """A plain-text post as messages Slack shows whole (it splits past 4,000 characters
    and refuses 40,000), and whether it was too long for `most` messages: then the last
    one says so and the caller attaches the full text as a file."""
    chunks = L.split(text, L.TEXT_CHUNK) or [text or "-"]
    if len(chunks) <= most:
        return chunks, False
    rest = sum(L.slack_len(c) for c in chunks[most - 1:])
    note = f"… ({rest} more characters: the full text is in {OVERFLOW_FILE}, attached here)"
    return [*chunks[:most - 1], note], True


OVERFLOW_FILE = "message.txt"
