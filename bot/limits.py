"""Slack's text limits and the arithmetic that keeps every message inside them.

Slack refuses a message (invalid_blocks, msg_blocks_too_long, msg_too_long) rather than
shortening it, and a refused card is a button nobody can click. So every builder measures
what it sends the way Slack counts it:
- in UTF-16 code units (an emoji is 2): Slack's clients count that way, and it is never
  less than the code points Python's len() counts;
- after escaping (& < > become &amp; &lt; &gt;), since Slack measures the text as sent;
- never cutting inside an entity (&amp;), a <...> token, a surrogate pair or before a
  combining mark, so a cut never changes what is left.
The budgets below sit under Slack's limits (see tests/fakes/slack_validate.py for the
limits themselves and their sources) to leave room for what Slack adds when it echoes
blocks back (block ids, emoji flags) and a button's card is later edited.
"""

from __future__ import annotations

import unicodedata
from typing import Any

SECTION_MAX = 2900  # section text: Slack's limit is 3000
FIELD_MAX = 1900  # section field / context element: 2000
HEADER_MAX = 150
BUTTON_TEXT_MAX = 75
MODAL_TITLE_MAX = 24
INPUT_MAX = 3000  # plain_text_input max_length / initial_value
MESSAGE_BLOCKS_MAX = 50
VIEW_BLOCKS_MAX = 100
ACTIONS_MAX = 25
BLOCK_OVERHEAD = 125  # what Slack counts per block towards msg_blocks_too_long
BLOCKS_BUDGET = 10_500  # all strings in a message's blocks + overhead: Slack refuses > 12,000
FALLBACK_MAX = 1000  # a message's `text` (notification); chat.update refuses > 4,000 bytes
TEXT_CHUNK = 3900  # a plain-text message; Slack splits past 4,000 and refuses > 40,000
ELLIPSIS = "…"


def slack_len(s: str) -> int:
    """Length as Slack counts it: UTF-16 code units."""
    return len(s.encode("utf-16-le")) // 2


def escape(v: Any) -> str:
    """User content as mrkdwn that shows literally (and can't mention anyone)."""
    return str(v).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _units(ch: str) -> int:
    return 2 if ord(ch) > 0xFFFF else 1


def _fit(s: str, start: int, n: int) -> int:
    """The largest end such that s[start:end] is at most n UTF-16 units."""
    total, i = 0, start
    while i < len(s):
        total += _units(s[i])
        if total > n:
            break
        i += 1
    return i


def _safe_cut(s: str, start: int, k: int) -> int:
    """Move a cut at k back so it splits no entity, <...> token or base+combining mark."""
    while k > start and unicodedata.combining(s[k]):
        k -= 1
    lt = s.rfind("<", start, k)
    if lt > start and s.find(">", lt, k) == -1:  # inside <@U123> or <http://x|label>
        k = lt
    amp = s.rfind("&", max(start, k - 5), k)
    if amp > start and s.find(";", amp, k) == -1:  # inside &amp; &lt; &gt;
        k = amp
    return k


def _cut(s: str, start: int, n: int) -> int:
    """Where the chunk starting at `start` ends: at a newline or space when one is near."""
    end = _fit(s, start, n)
    if end >= len(s):
        return end
    floor = start + (end - start) // 2
    for sep in ("\n", " "):
        k = s.rfind(sep, floor, end)
        if k > start:
            return _safe_cut(s, start, k + 1)
    return _safe_cut(s, start, end)


def split(text: str, n: int) -> list[str]:
    """mrkdwn in chunks of at most n units each; chunks that are only whitespace go."""
    chunks, i = [], 0
    while i < len(text):
        end = max(_cut(text, i, n), i + 1)
        chunks.append(text[i:end])
        i = end
    return [c for c in chunks if c.strip()]


def clip(text: str, n: int) -> str:
    """mrkdwn shortened to at most n units, ending in an ellipsis when it was cut."""
    if slack_len(text) <= n:
        return text
    end = _safe_cut(text, 0, _fit(text, 0, n - 1))
    return text[:end].rstrip() + ELLIPSIS


def clip_escaped(raw: Any, n: int) -> tuple[str, bool]:
    """User content escaped and shortened to n units; and whether it was shortened."""
    text = escape(raw)
    short = clip(text, n)
    return short, short != text


def plain(text: str, n: int) -> str:
    """A plain_text field (button label, title): never empty, at most n units."""
    return clip(" ".join(text.split()) or "-", n)


def blocks_weight(blocks: list[dict[str, Any]]) -> int:
    """What Slack's msg_blocks_too_long counts, read harshly: every string but the type
    names, plus a container overhead per block (slackapi/bolt-js#2509, #2867)."""
    def walk(v: Any, key: str = "") -> int:
        if isinstance(v, str):
            return 0 if key in ("type", "style") else slack_len(v)
        if isinstance(v, dict):
            return sum(walk(x, k) for k, x in v.items())
        if isinstance(v, list):
            return sum(walk(x, key) for x in v)
        return 0

    return walk(blocks) + BLOCK_OVERHEAD * len(blocks)
