"""Bolt listeners. Each one acks at once and hands real work to the per-thread worker."""

from __future__ import annotations

import json
import logging
import re
import threading
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any, Protocol

from slack_bolt import Ack, App, BoltContext
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError
from sqlmodel import select

from agent.data import parse_correction
from bot import blocks as B
from bot.files import DownloadError, SlackFiles
from bot.home import HELP_TEXT, home_view, status_text
from storage.redact import redact
from bot.worker import ThreadWorker
from storage.db import Database
from storage.models import Project
from storage.settings import Settings

log = logging.getLogger(__name__)

# What the app listens to and needs; manifest.yml must match (tests/test_cli.py checks it).
EVENTS = ("app_mention", "message", "app_home_opened")
MANIFEST_BOT_EVENTS = ("app_mention", "message.channels", "message.groups", "app_home_opened")
COMMANDS = ("/tuner",)
REQUIRED_SCOPES = (
    "app_mentions:read",  # app_mention
    "channels:history",  # message.channels (thread replies)
    "groups:history",  # message.groups
    "chat:write",  # postMessage / update / postEphemeral
    "commands",  # /tuner
    "files:read",  # url_private download of imported .jsonl
    "files:write",  # charts via files_upload_v2
)
_MENTION_RE = re.compile(r"<@[A-Z0-9]+>")


class Runner(Protocol):
    """What the bot needs from agent/runner.py AgentRunner (blocking calls)."""

    def start(self, *, team: str, channel: str, thread_ts: str, user: str, text: str) -> None: ...
    def reply(self, thread_id: str, user: str, text: str) -> bool: ...
    def resume(self, thread_id: str, interrupt_id: str, value: dict[str, Any]) -> bool: ...
    def import_file(self, thread_id: str, user: str, filename: str, content: bytes, *,
                    comment: str = "", upload_id: str = "") -> bool: ...
    def pending(self, thread_id: str) -> list[tuple[str, Any]]: ...


class StopService(Protocol):
    def request_stop(self, run_id: int) -> Any: ...


@dataclass
class Services:
    db: Database
    training: StopService | None = None
    worker: ThreadWorker = field(default_factory=ThreadWorker)
    # human-readable notes about services that are not configured (shown by /tuner status)
    missing: list[str] = field(default_factory=list)
    # the nightly scheduler (None when training or judging is not configured)
    scheduler: Any | None = None


# resume values per button
_RESUME_ACTION = {
    B.SPEC_APPROVE: "approve",
    B.SAMPLES_APPROVE: "approve",
    B.LAUNCH: "launch",
    B.DEPLOY: "deploy",
    B.DEPLOY_SKIP: "skip",
    B.UNDEPLOY: "undeploy",
}
_DONE_LABEL = {
    "approve": ":white_check_mark: Approved",
    "launch": ":rocket: Launched",
    "deploy": ":rocket: Deploying",
    "skip": ":fast_forward: Skipped",
    "undeploy": ":wastebasket: Undeploying",
    "change": ":pencil2: Change requested",
    "regenerate": ":repeat: Regenerating",
    "edit": ":pencil2: Edited",
}
_NEEDS_AUTH = {B.LAUNCH, B.DEPLOY, B.UNDEPLOY, B.STOP_RUN}
_MODAL = {B.SPEC_CHANGE: ("change", "Change the spec"),
          B.SAMPLES_REGENERATE: ("regenerate", "Regenerate samples")}
OVERLOADED = "I'm overloaded right now and couldn't take that; please try again in a minute."
ALREADY_HANDLED = "That was already handled (or is out of date)."
NOT_AUTHORISED = "Sorry, you are not authorised to do that. Ask an admin to add you to TUNER_ALLOWED_USERS."


class Handlers:
    def __init__(self, settings: Settings, runner: Runner, services: Services) -> None:
        self.settings = settings
        self.runner = runner
        self.services = services
        self.db = services.db
        self.worker = services.worker
        self._started: set[str] = set()  # threads whose start is queued (no Project row yet)
        self._started_lock = threading.Lock()

    # ------------------------------------------------------------------ wiring
    def register(self, app: App) -> None:
        on_event = dict(zip(EVENTS, (self.on_app_mention, self.on_message, self.on_home_opened)))
        for name, fn in on_event.items():
            app.event(name)(fn)
        for action_id in (*_RESUME_ACTION, *_MODAL):
            app.action(action_id)(self.on_interrupt_action)
        app.action(B.SAMPLES_EDIT_RE)(self.on_sample_edit)  # samples_edit:<n> (and old cards)
        app.action(B.STOP_RUN)(self.on_stop_run)
        app.view(B.FEEDBACK_CALLBACK)(self.on_feedback_submit)
        app.view(B.EDIT_CALLBACK)(self.on_edit_submit)
        for cmd in COMMANDS:
            app.command(cmd)(self.on_command)

    # ------------------------------------------------------------------ events
    def on_app_mention(self, body: dict, event: dict, context: BoltContext, client: WebClient) -> None:
        self._on_any_message(body, event, context, client, mentioned=True)

    def on_message(self, body: dict, event: dict, context: BoltContext, client: WebClient) -> None:
        bot_uid = context.bot_user_id or ""
        mentioned = bool(bot_uid) and f"<@{bot_uid}>" in (event.get("text") or "")
        self._on_any_message(body, event, context, client, mentioned=mentioned)

    def _on_any_message(
        self, body: dict, event: dict, context: BoltContext, client: WebClient, *, mentioned: bool
    ) -> None:
        subtype = event.get("subtype")
        # thread_broadcast: a reply also sent to the channel (still a reply in the thread)
        if subtype not in (None, "file_share", "thread_broadcast") or event.get("bot_id") \
                or not event.get("user"):
            return
        if event.get("user") == context.bot_user_id:
            return
        channel, ts = event.get("channel", ""), event.get("ts", "")
        thread_ts = event.get("thread_ts")
        team = body.get("team_id") or event.get("team") or context.team_id or ""
        user, text = event["user"], _MENTION_RE.sub("", event.get("text") or "").strip()
        thread_id = f"{team}:{channel}:{thread_ts}" if thread_ts else None
        in_project = thread_id is not None and self._has_project(thread_id)
        if not in_project and not mentioned:
            return  # chatter outside our threads
        if not self._claim(body, channel, ts):
            return  # retry or the second delivery (app_mention + message) of one mention
        allowed = self.settings.allowed_channels
        if allowed and channel not in allowed:
            self._post(client, channel, thread_ts or ts,
                       "I'm not enabled in this channel. Ask an admin to add it to "
                       "TUNER_ALLOWED_CHANNELS.")
            return
        files = [f for f in event.get("files") or [] if isinstance(f, dict)]
        if in_project:
            assert thread_id is not None
            if files:  # the text sent with a file is a note about it, never an answer
                self._queue_imports(client, channel, user, thread_ts, thread_id, files, text)
            elif mentioned:  # a reply while it runs; starts over once the project finished
                self._queue((client, channel, user, thread_ts), thread_id, self.runner.start,
                            team=team, channel=channel, thread_ts=thread_ts, user=user,
                            text=text)
            elif text:
                # a correction is just stored: it must not wait behind a training run
                key = thread_id if parse_correction(text) is None else f"{thread_id}#import"
                self._queue((client, channel, user, thread_ts), key, self.runner.reply,
                            thread_id, user, text)
            return
        root = thread_ts or ts
        new_id = f"{team}:{channel}:{root}"
        with self._started_lock:
            self._started.add(new_id)
        self._queue((client, channel, user, root), new_id, self.runner.start, team=team,
                    channel=channel, thread_ts=root, user=user, text=text)
        for f in files:  # a file on the starting mention: imported once the project exists
            self._queue((client, channel, user, root), new_id, self._import, client, new_id,
                        user, f, "")

    def _queue_imports(self, client: WebClient, channel: str, user: str, thread_ts: str | None,
                       thread_id: str, files: list[dict], comment: str) -> None:
        """Own queue: the thread's queue may be blocked for hours by a training run;
        runner.import_file waits briefly for the thread, else keeps the data for the next
        retrain."""
        for f in files:
            self._queue((client, channel, user, thread_ts), f"{thread_id}#import",
                        self._import, client, thread_id, user, f, comment)

    def on_home_opened(self, event: dict, client: WebClient) -> None:
        if event.get("tab", "home") != "home":
            return
        user = event["user"]
        self.worker.run_now(self._publish_home, client, user)

    # ------------------------------------------------------------------ actions
    def on_interrupt_action(self, ack: Ack, body: dict, action: dict, client: WebClient) -> None:
        ack()
        user = body["user"]["id"]
        action_id = action["action_id"]
        try:
            interrupt_id, thread_id = B.decode_value(action.get("value", ""))
        except (ValueError, KeyError, TypeError):
            return
        channel = (body.get("channel") or {}).get("id") or thread_id.split(":")[1]
        _, _, thread_ts = (thread_id.split(":", 2) + ["", ""])[:3]
        if action_id in _NEEDS_AUTH and not self.settings.user_allowed(user):
            self._ephemeral(client, channel, user, thread_ts, NOT_AUTHORISED)
            return
        if action_id in _MODAL:
            kind, title = _MODAL[action_id]
            if not self._is_pending(thread_id, interrupt_id):
                self._ephemeral(client, channel, user, thread_ts, ALREADY_HANDLED)
                return
            try:
                client.views_open(trigger_id=body["trigger_id"],
                                  view=B.feedback_modal(interrupt_id, thread_id, kind, title))
            except SlackApiError as e:
                log.warning("views.open failed: %s", e.response.get("error"))
            return
        value: dict[str, Any] = {"action": _RESUME_ACTION[action_id], "user": user}
        message = body.get("message") or {}
        self._queue((client, channel, user, thread_ts), thread_id, self._resume, client,
                    thread_id, interrupt_id, value, channel, user, message)

    def on_sample_edit(self, ack: Ack, body: dict, action: dict, client: WebClient) -> None:
        """[Edit] on one sample: open a modal prefilled from the pending interrupt's payload."""
        ack()
        user = body["user"]["id"]
        try:
            value = action.get("value", "")
            interrupt_id, thread_id = B.decode_value(value)
            index = B.decode_index(value)
        except (ValueError, KeyError, TypeError):
            return
        channel = (body.get("channel") or {}).get("id") or thread_id.split(":")[1]
        _, _, thread_ts = (thread_id.split(":", 2) + ["", ""])[:3]
        payload = self._pending_payload(thread_id, interrupt_id)
        examples = (payload or {}).get("examples") or []
        if payload is None or not 0 <= index < len(examples):
            self._ephemeral(client, channel, user, thread_ts, ALREADY_HANDLED)
            return
        example = examples[index]
        if not B.fits_editor(example):
            self._ephemeral(client, channel, user, thread_ts,
                            f"Example {index + 1} is longer than Slack's {B.EDIT_MAX_CHARS}-"
                            "character edit box; use *Regenerate with feedback* instead.")
            return
        try:
            client.views_open(trigger_id=body["trigger_id"],
                              view=B.sample_edit_modal(interrupt_id, thread_id, index, example))
        except SlackApiError as e:
            log.warning("views.open failed: %s", e.response.get("error"))

    def on_stop_run(self, ack: Ack, body: dict, action: dict, client: WebClient) -> None:
        ack()
        user = body["user"]["id"]
        channel = (body.get("channel") or {}).get("id", "")
        msg = body.get("message") or {}
        thread_ts = msg.get("thread_ts") or msg.get("ts")
        if not self.settings.user_allowed(user):
            self._ephemeral(client, channel, user, thread_ts, NOT_AUTHORISED)
            return
        training = self.services.training
        if training is None:
            self._ephemeral(client, channel, user, thread_ts,
                            "Training is not configured (RUNPOD_API_KEY missing).")
            return
        try:
            run_id = int(action.get("value", ""))
        except ValueError:
            return
        # never queued behind the busy thread: the thread's worker is blocked on this run
        self.worker.run_now(training.request_stop, run_id)
        self._ephemeral(client, channel, user, thread_ts,
                        f"Stopping run {run_id}; the best checkpoint so far is kept.")

    def on_feedback_submit(self, ack: Ack, body: dict, view: dict, client: WebClient) -> None:
        values = view.get("state", {}).get("values", {})
        text = ((values.get(B.FEEDBACK_BLOCK) or {}).get(B.FEEDBACK_INPUT) or {}).get("value") or ""
        if not text.strip():
            ack(response_action="errors", errors={B.FEEDBACK_BLOCK: "Please write something."})
            return
        ack()
        try:
            meta = json.loads(view.get("private_metadata") or "{}")
            interrupt_id, thread_id, kind = str(meta["i"]), str(meta["t"]), str(meta["a"])
        except (ValueError, KeyError):
            return
        user = body["user"]["id"]
        channel = thread_id.split(":")[1]
        value = {"action": kind, "text": text.strip(), "user": user}
        thread_ts = thread_id.split(":", 2)[2] or None
        self._queue((client, channel, user, thread_ts), thread_id, self._resume, client,
                    thread_id, interrupt_id, value, channel, user, None)

    def on_edit_submit(self, ack: Ack, body: dict, view: dict, client: WebClient) -> None:
        values = view.get("state", {}).get("values", {})

        def typed(block: str) -> str:
            inputs = values.get(block) or {}  # keyed by action id (older modals: "text")
            typed_in = inputs.get(B.EDIT_INPUTS[block]) or next(iter(inputs.values()), None)
            return (typed_in or {}).get("value") or ""

        prompt, response = typed(B.EDIT_PROMPT_BLOCK).strip(), typed(B.EDIT_RESPONSE_BLOCK).strip()
        errors = {b: "This can't be empty." for b, t in
                  ((B.EDIT_PROMPT_BLOCK, prompt), (B.EDIT_RESPONSE_BLOCK, response)) if not t}
        if errors:
            ack(response_action="errors", errors=errors)
            return
        ack()
        try:
            meta = json.loads(view.get("private_metadata") or "{}")
            interrupt_id, thread_id, index = str(meta["i"]), str(meta["t"]), int(meta["n"])
        except (ValueError, KeyError, TypeError):
            return
        user = body["user"]["id"]
        channel = thread_id.split(":")[1]
        value = {"action": "edit", "index": index, "prompt": prompt, "response": response,
                 "user": user}
        thread_ts = thread_id.split(":", 2)[2] or None
        self._queue((client, channel, user, thread_ts), thread_id, self._resume, client,
                    thread_id, interrupt_id, value, channel, user, None)

    # ------------------------------------------------------------------ /tuner
    def on_command(self, ack: Ack, command: dict) -> None:
        words = (command.get("text") or "").strip().split()
        sub = words[0].lower() if words else "help"
        if sub == "status":
            text = status_text(self.db)
            if self.services.missing:
                text += "\n*Not configured*: " + "; ".join(self.services.missing)
            ack(response_type="ephemeral", text=text)
        elif sub == "nightly":
            ack(response_type="ephemeral", text=self._nightly(command.get("user_id", ""), words[1:]))
        else:
            ack(response_type="ephemeral", text=HELP_TEXT)

    def _nightly(self, user: str, args: list[str]) -> str:
        from jobs.scheduler import set_nightly

        if len(args) != 2 or args[0].lower() not in ("on", "off") or not args[1].isdigit():
            return "Usage: `/tuner nightly on|off <project id>` (ids are in `/tuner status`)."
        if not self.settings.user_allowed(user):
            return NOT_AUTHORISED
        if self.services.scheduler is None:
            return "Nightly retrains need Claude and RunPod to be configured (see `/tuner status`)."
        on = args[0].lower() == "on"
        project = set_nightly(self.db, int(args[1]), on, self.services.scheduler, self.settings)
        if project is None:
            return f"No project {args[1]}."
        when = f"{self.settings.tuner_nightly_hour_utc:02d}:00 UTC"
        return (f"Nightly retrain for project {project.id} is on (every day at {when})."
                if on else f"Nightly retrain for project {project.id} is off.")

    # ------------------------------------------------------------------ work (worker threads)
    def _resume(
        self, client: WebClient, thread_id: str, interrupt_id: str, value: dict[str, Any],
        channel: str, user: str, message: dict | None,
    ) -> None:
        _, _, thread_ts = (thread_id.split(":", 2) + ["", ""])[:3]
        if not self._is_pending(thread_id, interrupt_id):
            self._ephemeral(client, channel, user, thread_ts or None, ALREADY_HANDLED)
            return
        # Close the card first: the step behind it (a training run) may take hours, and
        # clicks on the thread are handled one at a time, so nothing resumes it meanwhile.
        if message and message.get("ts"):
            label = _DONE_LABEL.get(value["action"], "Done")
            kept = [{k: v for k, v in b.items() if k != "accessory"}  # per-sample [Edit]
                    for b in message.get("blocks") or [] if b.get("type") != "actions"]
            kept.append({"type": "context",
                         "elements": [{"type": "mrkdwn", "text": f"{label} by <@{user}>"}]})
            try:
                client.chat_update(channel=channel, ts=message["ts"],
                                   text=message.get("text") or label, blocks=kept)
            except SlackApiError as e:
                log.warning("chat.update failed: %s", e.response.get("error"))
        if not self.runner.resume(thread_id, interrupt_id, value):
            self._ephemeral(client, channel, user, thread_ts or None, ALREADY_HANDLED)

    def _import(self, client: WebClient, thread_id: str, user: str, f: dict,
                comment: str = "") -> None:
        """Check the size, download (bot/files.py) and hand the bytes to the runner."""
        channel = thread_id.split(":")[1]
        _, _, thread_ts = thread_id.split(":", 2)
        files = SlackFiles(self.settings, client)
        try:
            f = files.resolve(f)
            files.check_size(f)  # before any download
            content = files.download(f)
        except DownloadError as e:
            log.warning("import of file %s refused: %s", f.get("id"), redact(str(e)))
            self._post(client, channel, thread_ts, f":warning: {redact(str(e))}")
            return
        name = str(f.get("name") or f.get("title") or "upload.jsonl")
        self.runner.import_file(thread_id, user, name, content, comment=comment,
                                upload_id=str(f.get("id") or ""))

    def _publish_home(self, client: WebClient, user: str) -> None:
        try:
            client.views_publish(user_id=user, view=home_view(self.db))
        except SlackApiError as e:
            log.warning("views.publish failed: %s", e.response.get("error"))

    # ------------------------------------------------------------------ helpers
    def _queue(self, notice: tuple[WebClient, str, str, str | None], key: str,
               fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Hand work to the thread's queue; if the bot is saturated, say so instead of
        dropping it silently. `notice` = (client, channel, user, thread_ts)."""
        if not self.worker.submit(key, fn, *args, **kwargs):
            client, channel, user, thread_ts = notice
            log.warning("worker saturated; refused work for %s", key)
            self._ephemeral(client, channel, user, thread_ts, OVERLOADED)

    def _claim(self, body: dict, channel: str, ts: str) -> bool:
        event_id = body.get("event_id")
        if event_id and not self.db.claim(f"evt:{event_id}"):
            return False
        return self.db.claim(f"msg:{channel}:{ts}")

    def _has_project(self, thread_id: str) -> bool:
        with self._started_lock:
            if thread_id in self._started:
                return True
        with self.db.session() as s:
            return s.exec(select(Project.id).where(Project.thread_id == thread_id)).first() is not None

    def _pending_payload(self, thread_id: str, interrupt_id: str) -> dict[str, Any] | None:
        """The payload of a pending interrupt; None when it is stale (or unreadable)."""
        try:
            pending = self.runner.pending(thread_id)
        except Exception:  # noqa: BLE001
            log.exception("pending() failed")
            return None
        for i, payload in pending:
            if i == interrupt_id:
                return payload if isinstance(payload, dict) else {}
        return None

    def _is_pending(self, thread_id: str, interrupt_id: str) -> bool:
        try:
            return any(i == interrupt_id for i, _ in self.runner.pending(thread_id))
        except Exception:  # noqa: BLE001  (let resume decide)
            log.exception("pending() failed")
            return True

    @staticmethod
    def _post(client: WebClient, channel: str, thread_ts: str | None, text: str) -> None:
        try:
            client.chat_postMessage(channel=channel, thread_ts=thread_ts, text=text)
        except SlackApiError as e:
            log.warning("chat.postMessage failed: %s", e.response.get("error"))

    @staticmethod
    def _ephemeral(
        client: WebClient, channel: str, user: str, thread_ts: str | None, text: str
    ) -> None:
        try:
            client.chat_postEphemeral(channel=channel, user=user, text=text,
                                      thread_ts=thread_ts or None)
        except SlackApiError as e:
            log.warning("chat.postEphemeral failed: %s", e.response.get("error"))
