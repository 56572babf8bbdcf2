"""SlackNotifier: the agent/ports.Notifier that shows agent and job events in a Slack thread."""

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
from storage.db import Database
from storage.models import MessageRef
from storage.redact import redact

log = logging.getLogger(__name__)

# chat.update errors meaning the progress message can no longer be edited: post a new one
_GONE = {"message_not_found", "cant_update_message", "edit_window_closed", "channel_not_found"}

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
        self.post(thread_id, text)

    def progress(
        self, thread_id: str, key: str, text: str, actions: list[Action] | None = None
    ) -> None:
        _, channel, ts = split_thread_id(thread_id)
        blocks = [B.section(text), *B.action_buttons(list(actions or []))]
        with self._lock_for(thread_id, key):
            ref = self._ref(thread_id, key)
            if ref is not None:
                try:
                    self.client.chat_update(channel=ref.channel_id, ts=ref.ts, text=text,
                                            blocks=blocks)
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
            posted = self._call("chat_postMessage", channel=channel, thread_ts=ts, text=text,
                                blocks=blocks)
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
        self.post(thread_id, f":warning: {redact(text)}")

    def ask(self, thread_id: str, interrupt_id: str, payload: dict[str, Any]) -> None:
        text, blocks = B.ask_card(interrupt_id, thread_id, payload)
        self.post(thread_id, text, blocks)

    # --- helpers --------------------------------------------------------------
    def post(self, thread_id: str, text: str, blocks: list[dict] | None = None) -> str | None:
        _, channel, ts = split_thread_id(thread_id)
        kwargs: dict[str, Any] = dict(channel=channel, text=text)
        if ts:
            kwargs["thread_ts"] = ts
        if blocks:
            kwargs["blocks"] = blocks
        resp = self._call("chat_postMessage", **kwargs)
        return None if resp is None else str(resp["ts"])

    def _call(self, method: str, **kwargs: Any) -> Any:
        try:
            return getattr(self.client, method)(**kwargs)
        except SlackApiError as e:
            log.warning("slack %s failed: %s", method, e.response.get("error"))
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
