"""SlackNotifier: the agent/ports.Notifier that shows agent and job events in a Slack thread.

Cards come from bot/blocks.py already inside Slack's limits; if Slack still refuses one
(invalid_blocks, msg_blocks_too_long, msg_too_long) it is logged and posted once more in a
reduced form that keeps every button, so no step waits for a click that cannot come.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError, SlackClientError
from sqlalchemy.exc import IntegrityError
from sqlmodel import select

from agent.ports import Action
from bot import blocks as B
from bot.layout import OVERFLOW_FILE, Message, reduced, text_chunks
from storage.db import Database
from storage.models import MessageRef
from storage.redact import redact

log = logging.getLogger(__name__)

# chat.update errors meaning the progress message can no longer be edited: post a new one
_GONE = {"message_not_found", "cant_update_message", "edit_window_closed", "channel_not_found"}
# errors meaning Slack will never take this message as it is (too long, malformed blocks)
_REFUSED = {"invalid_blocks", "invalid_blocks_format", "msg_blocks_too_long", "msg_too_long"}
_UNSHOWABLE = (":warning: Slack refused to show a card here ({error}), even shortened. "
               "The details are in the bot's log.")


def _reasons(e: SlackApiError) -> str:
    """Slack's explanation of a refusal (response_metadata.messages), for the log."""
    meta = e.response.get("response_metadata") or {}
    return redact("; ".join(str(m) for m in meta.get("messages") or [])[:2000]) or "-"


def split_thread_id(thread_id: str) -> tuple[str, str, str | None]:
    team, channel, ts = (thread_id.split(":", 2) + ["", ""])[:3]
    return team, channel, ts or None


class SlackNotifier:
    def __init__(self, client: WebClient, db: Database) -> None:
        self.client = client
        self.db = db
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._locks_guard = threading.Lock()

    # --- Notifier -------------------------------------------------------------
    def say(self, thread_id: str, text: str) -> None:
        chunks, overflow = text_chunks(text)
        for chunk in chunks:
            self.post(thread_id, chunk)
        if overflow:
            self.upload(thread_id, OVERFLOW_FILE, text.encode(), "Full message")

    def progress(
        self, thread_id: str, key: str, text: str, actions: list[Action] | None = None
    ) -> None:
        msg = B.progress_message(text, list(actions or []))
        with self._lock_for(thread_id, key):
            ref = self._ref(thread_id, key)
            if ref is not None:
                try:
                    self._send("chat_update", msg, channel=ref.channel_id, ts=ref.ts)
                    return
                except SlackApiError as e:
                    error = e.response.get("error")
                    log.warning("slack chat_update failed: %s", error)
                    if error not in _GONE:  # transient (rate limit, outage): the next
                        return              # update edits the same message
                except (SlackClientError, OSError) as e:
                    log.warning("slack chat_update failed: %s",
                                redact(type(e).__name__ + ": " + str(e)))
                    return
                # message gone (deleted / not found): post a fresh one below
            posted = self.post_message(thread_id, msg)
            if posted is not None:
                self._save_ref(thread_id, key, posted["channel"], posted["ts"], replace=ref)

    def upload(
        self, thread_id: str, filename: str, content: bytes, title: str, comment: str = ""
    ) -> None:
        _, channel, ts = split_thread_id(thread_id)
        kwargs: dict[str, Any] = dict(channel=channel, filename=filename, content=content,
                                      title=title)
        if ts:
            kwargs["thread_ts"] = ts
        if comment:
            kwargs["initial_comment"] = comment
        self._call("files_upload_v2", **kwargs)

    def error(self, thread_id: str, text: str) -> None:
        self.say(thread_id, f":warning: {redact(text)}")

    def ask(self, thread_id: str, interrupt_id: str, payload: dict[str, Any]) -> None:
        card = B.ask_card(interrupt_id, thread_id, payload)
        if card.attachment is not None:  # first, so the buttons end the thread
            a = card.attachment
            self.upload(thread_id, a.filename, a.content, a.title)
        for msg in card.messages:
            self.post_message(thread_id, msg)

    # --- helpers --------------------------------------------------------------
    def post(self, thread_id: str, text: str, blocks: list[dict] | None = None) -> str | None:
        resp = self.post_message(thread_id, Message(text, list(blocks or [])))
        return None if resp is None else str(resp["ts"])

    def post_message(self, thread_id: str, msg: Message) -> Any:
        """Post one message in the thread; None (logged) when Slack would not take it."""
        _, channel, ts = split_thread_id(thread_id)
        kwargs: dict[str, Any] = {"channel": channel}
        if ts:
            kwargs["thread_ts"] = ts
        try:
            return self._send("chat_postMessage", msg, **kwargs)
        except SlackApiError as e:
            error = e.response.get("error")
            log.warning("slack chat_postMessage failed: %s", error)
            if error in _REFUSED and msg.blocks:
                self._call("chat_postMessage", text=_UNSHOWABLE.format(error=error), **kwargs)
        except (SlackClientError, OSError) as e:
            log.warning("slack chat_postMessage failed: %s",
                        redact(type(e).__name__ + ": " + str(e)))
        return None

    def _send(self, method: str, msg: Message, **kwargs: Any) -> Any:
        """chat.postMessage / chat.update; a message Slack refuses as too big or malformed
        is logged and sent once more reduced to a short text and all of its buttons."""
        call = getattr(self.client, method)
        try:
            return call(text=msg.text, blocks=msg.blocks or None, **kwargs)
        except SlackApiError as e:
            error = e.response.get("error")
            if error not in _REFUSED:
                raise
            log.warning("slack %s refused a message (%s: %s); retrying it reduced", method,
                        error, _reasons(e))
        small = reduced(msg, "Slack refused the full card; this is a shortened copy.")
        return call(text=small.text, blocks=small.blocks, **kwargs)

    def _call(self, method: str, **kwargs: Any) -> Any:
        try:
            return getattr(self.client, method)(**kwargs)
        except SlackApiError as e:
            log.warning("slack %s failed: %s (%s)", method, e.response.get("error"), _reasons(e))
        except (SlackClientError, OSError) as e:
            log.warning("slack %s failed: %s", method, redact(type(e).__name__ + ": " + str(e)))
        return None

    def _lock_for(self, thread_id: str, key: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault((thread_id, key), threading.Lock())

    def _ref(self, thread_id: str, key: str) -> MessageRef | None:
        with self.db.session() as s:
            return s.exec(
                select(MessageRef).where(MessageRef.thread_id == thread_id, MessageRef.key == key)
            ).first()

    def _save_ref(
        self, thread_id: str, key: str, channel: str, ts: str, replace: MessageRef | None
    ) -> None:
        with self.db.session() as s:
            if replace is not None:
                row = s.get(MessageRef, replace.id)
                if row is not None:
                    row.channel_id, row.ts = channel, ts
                    s.add(row)
                    s.commit()
                    return
            s.add(MessageRef(thread_id=thread_id, key=key, channel_id=channel, ts=ts))
            try:
                s.commit()
            except IntegrityError:  # another process won the race; keep its message
                s.rollback()
