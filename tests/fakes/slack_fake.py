"""FakeSlack: a loopback Slack Web API + Socket Mode server speaking the real wire formats.

The real slack_sdk WebClient reaches it via base_url (TUNER_SLACK_API_URL); the real
SocketModeClient reaches it via apps.connections.open -> ws://127.0.0.1:<port>/link.
Everything is recorded so tests can assert on thread contents.

Message and view payloads are validated as Slack validates them (tests/fakes/slack_validate.py):
what the real API refuses, the fake refuses with the same error. `inject()` makes any
method fail with any Slack error (or HTTP 429 + Retry-After) for the next calls.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qs, urlencode, urlparse

from tests.fakes.slack_validate import check_message, check_view

BOT_TOKEN = "xoxb-fake-bot-token"
APP_TOKEN = "xapp-fake-app-token"
SIGNING_SECRET = "fake-signing-secret"
TEAM_ID = "T0FAKE"
BOT_USER_ID = "UBOT0001"
BOT_ID = "BBOT0001"
APP_ID = "A0FAKE"
DEFAULT_SCOPES = ("app_mentions:read", "channels:history", "groups:history", "chat:write",
                  "commands", "files:read", "files:write")
# What Slack's file server answers a download it won't serve (bad token, no files:read):
# HTTP 200 with its HTML sign-in page, not an error (openclaw/openclaw#63523; slack-go/slack
# #1284 "returns html instead of bytes"; "Browser not supported" page).
LOGIN_PAGE = (b"<!DOCTYPE html><html lang=\"en-US\"><head><title>Sign in | Slack</title></head>"
              b"<body><h1>Sign in to your workspace</h1></body></html>")


@dataclass
class Call:
    method: str
    args: dict[str, Any]
    token: str | None


@dataclass
class Injected:
    """One injected failure: a Slack error body, or HTTP 429 when retry_after is set."""

    error: str
    retry_after: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class FakeSlack:
    bot_token: str = BOT_TOKEN
    app_token: str = APP_TOKEN
    calls: list[Call] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)
    ephemerals: list[dict[str, Any]] = field(default_factory=list)
    views: list[dict[str, Any]] = field(default_factory=list)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    # the bot token's scopes, as files.info and the file server check them (files:read)
    scopes: set[str] = field(default_factory=lambda: set(DEFAULT_SCOPES))
    login_page_downloads: bool = False  # every file download answers the HTML sign-in page
    uploads: dict[str, bytes] = field(default_factory=dict)
    downloads: list[tuple[str, str | None]] = field(default_factory=list)
    acks: dict[str, dict[str, Any]] = field(default_factory=dict)
    fail: dict[str, str] = field(default_factory=dict)  # method -> error to return (once)
    # method -> how many next calls get HTTP 429 + Retry-After (Slack's rate limiting)
    ratelimit: dict[str, int] = field(default_factory=dict)
    injected: dict[str, list[Injected]] = field(default_factory=dict)  # see inject()
    # every ok:false answer of a method (not the injected ones): (method, body)
    refused: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Condition()
        self._ts = itertools.count(1)
        self._ids = itertools.count(1)
        self._http: ThreadingHTTPServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ws_port = 0
        self._sockets: list[Any] = []
        self._ws_ready = threading.Event()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "FakeSlack":
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a: Any) -> None:
                pass

            def do_GET(self) -> None:
                fake._http_get(self)

            def do_POST(self) -> None:
                fake._http_post(self)

        self._http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._http.daemon_threads = True
        threading.Thread(target=self._http.serve_forever, args=(0.05,), daemon=True).start()
        threading.Thread(target=self._run_ws, daemon=True).start()
        if not self._ws_ready.wait(5):
            raise RuntimeError("websocket server did not start")
        return self

    def stop(self) -> None:
        if self._http:
            self._http.shutdown()
            self._http.server_close()
        if self._loop:
            self._loop.call_soon_threadsafe(self._loop.stop)

    def __enter__(self) -> "FakeSlack":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._http is not None
        return self._http.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/"

    def inject(self, method: str, error: str = "ratelimited", *, times: int = 1,
               retry_after: float | None = None, **extra: Any) -> None:
        """The next `times` calls of `method` fail with `error` (extra keys join the body).

        With retry_after, the failure is Slack's rate limiting: HTTP 429 with a Retry-After
        header (seconds) and {"ok": false, "error": "ratelimited"}
        (https://docs.slack.dev/apis/web-api/rate-limits)."""
        with self._lock:
            self.injected.setdefault(method, []).extend(
                Injected(error, retry_after, dict(extra)) for _ in range(times))

    # ------------------------------------------------------------------ assertions
    def calls_to(self, method: str) -> list[Call]:
        with self._lock:
            return [c for c in self.calls if c.method == method]

    def thread(self, channel: str, thread_ts: str) -> list[dict[str, Any]]:
        with self._lock:
            return [m for m in self.messages if m["channel"] == channel
                    and (m.get("thread_ts") == thread_ts or m["ts"] == thread_ts)]

    def wait_for(self, pred: Callable[[], Any], timeout: float = 5.0) -> Any:
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                result = pred()
                if result:
                    return result
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError("timed out waiting for FakeSlack condition")
                self._lock.wait(min(left, 0.05))

    def add_file(self, name: str, content: bytes, *, connect: bool = False,
                 mimetype: str = "application/octet-stream", size: int | None = None,
                 **extra: Any) -> dict[str, Any]:
        """A file as Slack describes it in a message event's `files` (served by this fake).

        `connect`: shared in a Slack Connect channel, where the event carries only
        {"id", "file_access": "check_file_info"} and files.info gives the rest
        (https://api.slack.com/apis/channels-between-orgs, "check_file_info").
        `size` overrides the reported size (Slack reports the real one).
        """
        fid = f"F{next(self._ids):08d}"
        obj = {
            "id": fid, "name": name, "title": name, "size": len(content) if size is None else size,
            "mimetype": mimetype, "filetype": name.rsplit(".", 1)[-1], "mode": "hosted",
            "is_external": False, "file_access": "visible",
            "url_private": f"http://127.0.0.1:{self.port}/files-pri/{TEAM_ID}-{fid}/{name}",
            "url_private_download":
                f"http://127.0.0.1:{self.port}/files-pri/{TEAM_ID}-{fid}/download/{name}",
            **extra,
        }
        with self._lock:
            self.uploads[fid] = content
            self.files[fid] = obj
        return {"id": fid, "file_access": "check_file_info"} if connect else dict(obj)

    # ------------------------------------------------------------------ HTTP plumbing
    def _send(self, h: BaseHTTPRequestHandler, status: int, body: bytes, ctype: str) -> None:
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def _json(self, h: BaseHTTPRequestHandler, data: dict[str, Any]) -> None:
        self._send(h, 200, json.dumps(data).encode(), "application/json; charset=utf-8")

    def _http_get(self, h: BaseHTTPRequestHandler) -> None:
        path = urlparse(h.path).path
        if path.startswith(("/files-pri/", "/files-edge/")):
            self._serve_file(h, path)
            return
        if path.startswith("/api/"):
            self._api(h, path[5:], dict(_flat(parse_qs(urlparse(h.path).query))))
            return
        self._send(h, 404, b"not found", "text/plain")

    def _serve_file(self, h: BaseHTTPRequestHandler, path: str) -> None:
        """url_private(_download) as Slack's file server answers it.

        - needs `Authorization: Bearer <bot token>` with files:read; otherwise HTTP 200 and
          the HTML sign-in page (see LOGIN_PAGE) - never a 401/403;
        - url_private_download redirects (302) to a second Slack path that needs the token
          too: only a CDN's presigned URL may do without it (nextlevelbuilder/goclaw#233);
        - an unknown or deleted file is a 404.
        """
        parts = path.split("/")
        fid = parts[2].split("-", 1)[-1]
        auth = h.headers.get("Authorization")
        with self._lock:
            self.downloads.append((fid, auth))
            self._lock.notify_all()
            allowed = (auth == f"Bearer {self.bot_token}" and "files:read" in self.scopes
                       and not self.login_page_downloads)
            content = self.uploads.get(fid)
        if not allowed:
            self._send(h, 200, LOGIN_PAGE, "text/html; charset=utf-8")
        elif content is None:
            self._send(h, 404, b"<html><body>File not found</body></html>", "text/html")
        elif parts[1] == "files-pri" and len(parts) > 3 and parts[3] == "download":
            h.send_response(302)
            h.send_header("Location", f"http://127.0.0.1:{self.port}/files-edge/{parts[2]}/"
                                      f"{parts[-1]}?origin_team={TEAM_ID}")
            h.send_header("Content-Length", "0")
            h.end_headers()
        else:
            self._send(h, 200, content, "application/octet-stream")

    def _http_post(self, h: BaseHTTPRequestHandler) -> None:
        url = urlparse(h.path)
        raw = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        if url.path.startswith("/upload/"):
            fid = url.path.split("/")[2]
            with self._lock:
                known = fid in self.files
                if known:
                    self.uploads[fid] = raw
                    self.calls.append(Call("upload", {"file_id": fid, "bytes": len(raw)}, None))
                    self._lock.notify_all()
            if known:
                self._send(h, 200, f"OK - {len(raw)}".encode(), "text/plain")
            else:
                self._send(h, 404, b"unknown upload", "text/plain")
            return
        if not url.path.startswith("/api/"):
            self._send(h, 404, b"not found", "text/plain")
            return
        args: dict[str, Any] = dict(_flat(parse_qs(url.query)))
        ctype = h.headers.get("Content-Type", "")
        if raw and "json" in ctype:
            args.update(json.loads(raw))
        elif raw:
            args.update(_flat(parse_qs(raw.decode())))
        token = args.pop("token", None)
        auth = h.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            token = auth[7:]
        self._api(h, url.path[5:], args, token)

    # ------------------------------------------------------------------ Web API methods
    def _api(self, h: BaseHTTPRequestHandler, method: str, args: dict[str, Any],
             token: str | None = None) -> None:
        with self._lock:
            self.calls.append(Call(method, args, token))
            self._lock.notify_all()
            wanted = self.app_token if method == "apps.connections.open" else self.bot_token
            if token is None:
                return self._json(h, {"ok": False, "error": "not_authed"})
            if token != wanted:
                return self._json(h, {"ok": False, "error": "invalid_auth"})
            if method in self.fail:
                return self._json(h, {"ok": False, "error": self.fail.pop(method)})
            if self.ratelimit.get(method, 0) > 0:
                self.ratelimit[method] -= 1
                return self._rate_limited(h, 0)
            queued = self.injected.get(method)
            if queued:
                inj = queued.pop(0)
                if inj.retry_after is not None:
                    return self._rate_limited(h, inj.retry_after)
                return self._json(h, {"ok": False, "error": inj.error, **inj.extra})
            fn = getattr(self, "_m_" + method.replace(".", "_"), None)
            if fn is None:
                return self._json(h, {"ok": False, "error": "unknown_method"})
            result = fn(args)
            if not result.get("ok"):
                self.refused.append((method, result))
            self._lock.notify_all()
        self._json(h, result)

    def _rate_limited(self, h: BaseHTTPRequestHandler, retry_after: float) -> None:
        body = json.dumps({"ok": False, "error": "ratelimited"}).encode()
        h.send_response(429)
        h.send_header("Retry-After", f"{retry_after:g}")
        h.send_header("Content-Type", "application/json; charset=utf-8")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def _next_ts(self) -> str:
        return f"{1700000000 + next(self._ts)}.000100"

    def _m_auth_test(self, a: dict) -> dict:
        return {"ok": True, "url": "https://fake.slack.com/", "team": "Fake", "user": "tuner",
                "team_id": TEAM_ID, "user_id": BOT_USER_ID, "bot_id": BOT_ID,
                "is_enterprise_install": False}

    def _m_chat_postMessage(self, a: dict) -> dict:
        if not a.get("channel"):
            return {"ok": False, "error": "channel_not_found"}
        refused = check_message("chat.postMessage", a)
        if refused is not None:
            return refused
        msg = {"channel": a["channel"], "ts": self._next_ts(), "text": a.get("text", ""),
               "blocks": _blocks(a.get("blocks")), "thread_ts": a.get("thread_ts"),
               "bot_id": BOT_ID, "user": BOT_USER_ID}
        self.messages.append(msg)
        return {"ok": True, "channel": msg["channel"], "ts": msg["ts"], "message": msg}

    def _m_chat_update(self, a: dict) -> dict:
        refused = check_message("chat.update", a)
        if refused is not None:
            return refused
        for m in self.messages:
            if m["channel"] == a.get("channel") and m["ts"] == a.get("ts"):
                m["text"] = a.get("text", m["text"])
                if "blocks" in a:
                    m["blocks"] = _blocks(a["blocks"])
                m["edits"] = m.get("edits", 0) + 1
                return {"ok": True, "channel": m["channel"], "ts": m["ts"], "text": m["text"]}
        return {"ok": False, "error": "message_not_found"}

    def _m_chat_postEphemeral(self, a: dict) -> dict:
        if not a.get("user") or not a.get("channel"):
            return {"ok": False, "error": "user_not_in_channel"}
        refused = check_message("chat.postEphemeral", a)
        if refused is not None:
            return refused
        self.ephemerals.append(dict(a))
        return {"ok": True, "message_ts": self._next_ts()}

    def _m_views_open(self, a: dict) -> dict:
        if not a.get("trigger_id"):
            return {"ok": False, "error": "invalid_trigger_id"}
        return self._view("open", a, trigger_id=a["trigger_id"])

    def _m_views_push(self, a: dict) -> dict:
        if not a.get("trigger_id"):
            return {"ok": False, "error": "invalid_trigger_id"}
        return self._view("push", a, trigger_id=a["trigger_id"])

    def _m_views_update(self, a: dict) -> dict:
        if not a.get("view_id") and not a.get("external_id"):
            return {"ok": False, "error": "not_found"}
        return self._view("update", a, view_id=a.get("view_id"))

    def _m_views_publish(self, a: dict) -> dict:
        return self._view("publish", a, user_id=a.get("user_id"))

    def _view(self, kind: str, a: dict, **where: Any) -> dict:
        refused = check_view(a.get("view"))
        if refused is not None:
            return refused
        view = _blocks(a.get("view"))
        self.views.append({"kind": kind, "view": view, **where})
        return {"ok": True, "view": {"id": f"V{next(self._ids):08d}", **view}}

    def _m_files_getUploadURLExternal(self, a: dict) -> dict:
        if not a.get("filename") or not a.get("length"):
            return {"ok": False, "error": "invalid_arguments"}
        fid = f"F{next(self._ids):08d}"
        self.files[fid] = {"id": fid, "name": a["filename"], "length": int(a["length"])}
        return {"ok": True, "upload_url": f"http://127.0.0.1:{self.port}/upload/{fid}",
                "file_id": fid}

    def _m_files_completeUploadExternal(self, a: dict) -> dict:
        items = a.get("files")
        items = json.loads(items) if isinstance(items, str) else items or []
        out = []
        for it in items:
            fid = it.get("id")
            if fid not in self.uploads:
                return {"ok": False, "error": "file_not_found"}
            f = self.files[fid]
            f.update(title=it.get("title"), channel=a.get("channel_id"),
                     thread_ts=a.get("thread_ts"), initial_comment=a.get("initial_comment"),
                     content=self.uploads[fid])
            out.append({"id": fid, "name": f["name"], "title": f["title"]})
        if a.get("channel_id"):
            self.messages.append({
                "channel": a["channel_id"], "ts": self._next_ts(),
                "text": a.get("initial_comment") or "", "thread_ts": a.get("thread_ts"),
                "files": out, "blocks": [], "bot_id": BOT_ID, "user": BOT_USER_ID})
        return {"ok": True, "files": out}

    def _m_files_info(self, a: dict) -> dict:
        """files.info: needs files:read (missing_scope names it, as Slack does:
        {"ok": false, "error": "missing_scope", "needed": ..., "provided": ...});
        https://api.slack.com/methods/files.info."""
        if "files:read" not in self.scopes:
            return {"ok": False, "error": "missing_scope", "needed": "files:read",
                    "provided": ",".join(sorted(self.scopes))}
        f = self.files.get(a.get("file") or "")
        if f is None or f.get("id") not in self.uploads:
            return {"ok": False, "error": "file_not_found"}
        return {"ok": True, "file": dict(f), "comments": [], "response_metadata":
                {"next_cursor": ""}}

    def _m_apps_connections_open(self, a: dict) -> dict:
        return {"ok": True, "url": f"ws://127.0.0.1:{self._ws_port}/link?ticket=fake"}

    def _m_conversations_replies(self, a: dict) -> dict:
        return {"ok": True, "messages": self.thread(a.get("channel", ""), a.get("ts", "")),
                "has_more": False}

    # ------------------------------------------------------------------ Socket Mode
    def _run_ws(self) -> None:
        from websockets.asyncio.server import serve

        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)

        async def handler(ws: Any) -> None:
            if not ws.request.path.startswith("/link"):
                await ws.close(code=1008)
                return
            with self._lock:
                self._sockets.append(ws)
                self._lock.notify_all()
            await ws.send(json.dumps({
                "type": "hello", "num_connections": 1,
                "debug_info": {"host": "fake", "approximate_connection_time": 18060},
                "connection_info": {"app_id": APP_ID}}))
            try:
                async for raw in ws:
                    data = json.loads(raw)
                    if "envelope_id" in data:
                        with self._lock:
                            self.acks[data["envelope_id"]] = data
                            self._lock.notify_all()
            except Exception:  # noqa: BLE001  (client went away)
                pass
            finally:
                with self._lock:
                    if ws in self._sockets:
                        self._sockets.remove(ws)

        async def main() -> None:
            server = await serve(handler, "127.0.0.1", 0)
            self._ws_port = server.sockets[0].getsockname()[1]
            self._ws_ready.set()

        loop.run_until_complete(main())
        loop.run_forever()

    def wait_socket(self, timeout: float = 5.0) -> None:
        self.wait_for(lambda: self._sockets, timeout)

    def push(self, type_: str, payload: dict[str, Any], envelope_id: str | None = None) -> str:
        """Send an envelope (events_api | interactive | slash_commands) to the connected app."""
        eid = envelope_id or f"env-{next(self._ids)}"
        env = {"envelope_id": eid, "type": type_, "payload": payload,
               "accepts_response_payload": type_ != "events_api", "retry_attempt": 0,
               "retry_reason": ""}
        with self._lock:
            ws = self._sockets[-1]
        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(ws.send(json.dumps(env)), self._loop).result(5)
        return eid

    def wait_ack(self, envelope_id: str, timeout: float = 5.0) -> dict[str, Any]:
        return self.wait_for(lambda: self.acks.get(envelope_id), timeout)


def _flat(q: dict[str, list[str]]) -> list[tuple[str, str]]:
    return [(k, v[0]) for k, v in q.items()]


def _blocks(v: Any) -> Any:
    if isinstance(v, str):
        try:
            return json.loads(v)
        except ValueError:
            return v
    return v if v is not None else []


# ---------------------------------------------------------------------- payload builders
_event_ids = itertools.count(1)


def event_callback(event: dict[str, Any], event_id: str | None = None) -> dict[str, Any]:
    return {
        "token": "legacy", "team_id": TEAM_ID, "api_app_id": APP_ID, "event": event,
        "type": "event_callback", "event_id": event_id or f"Ev{next(_event_ids):08d}",
        "event_time": int(time.time()), "event_context": "ctx",
        "authorizations": [{"team_id": TEAM_ID, "user_id": BOT_USER_ID, "is_bot": True,
                            "enterprise_id": None, "is_enterprise_install": False}],
    }


def mention_pair(
    user: str, channel: str, ts: str, text: str, thread_ts: str | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The two deliveries Slack makes for one mention: app_mention and message."""
    base = {"user": user, "channel": channel, "ts": ts, "team": TEAM_ID,
            "text": f"<@{BOT_USER_ID}> {text}", "event_ts": ts}
    if thread_ts:
        base["thread_ts"] = thread_ts
    return (event_callback({"type": "app_mention", **base}),
            event_callback({"type": "message", "channel_type": "channel", **base}))


def message_event(
    user: str, channel: str, ts: str, text: str, thread_ts: str | None = None, **extra: Any
) -> dict[str, Any]:
    ev = {"type": "message", "channel_type": "channel", "user": user, "channel": channel,
          "ts": ts, "team": TEAM_ID, "text": text, "event_ts": ts, **extra}
    if thread_ts:
        ev["thread_ts"] = thread_ts
    return event_callback(ev)


def file_share_event(
    user: str, channel: str, ts: str, text: str, files: list[dict[str, Any]],
    thread_ts: str | None = None,
) -> dict[str, Any]:
    """A message with files, as Slack delivers it: subtype file_share, `upload`, and no
    `team` key (slackapi/slack-api-specs#62). A mention with a file may come only like this,
    with no app_mention event at all (slackapi/bolt-python#925); an app_mention that does
    come carries `files` too (bolt-js#2056): `app_mention_with_files`."""
    ev = {"type": "message", "subtype": "file_share", "channel_type": "channel", "user": user,
          "channel": channel, "ts": ts, "text": text, "event_ts": ts, "files": files,
          "upload": True, "display_as_bot": False}
    if thread_ts:
        ev["thread_ts"] = thread_ts
    return event_callback(ev)


def app_mention_with_files(
    user: str, channel: str, ts: str, text: str, files: list[dict[str, Any]],
    thread_ts: str | None = None,
) -> dict[str, Any]:
    ev = {"type": "app_mention", "user": user, "channel": channel, "ts": ts, "team": TEAM_ID,
          "text": f"<@{BOT_USER_ID}> {text}", "event_ts": ts, "files": files, "upload": False}
    if thread_ts:
        ev["thread_ts"] = thread_ts
    return event_callback(ev)


def block_action(
    action_id: str, value: str, *, user: str, channel: str, message: dict[str, Any] | None = None
) -> dict[str, Any]:
    msg = message or {"ts": "1700000000.000100", "text": "card", "blocks": []}
    return {
        "type": "block_actions", "team": {"id": TEAM_ID, "domain": "fake"},
        "user": {"id": user, "username": user, "team_id": TEAM_ID},
        "api_app_id": APP_ID, "token": "legacy", "trigger_id": f"trig.{next(_event_ids)}",
        "container": {"type": "message", "message_ts": msg.get("ts"), "channel_id": channel,
                      "is_ephemeral": False},
        "channel": {"id": channel, "name": "tuning"}, "message": msg,
        "response_url": "http://127.0.0.1:9/response",
        "actions": [{"type": "button", "action_id": action_id, "block_id": "b1",
                     "value": value, "action_ts": str(time.time()),
                     "text": {"type": "plain_text", "text": action_id}}],
    }


def view_submission(view: dict[str, Any], *, user: str, text: str) -> dict[str, Any]:
    """A submitted feedback modal (`view` as the bot opened it)."""
    block = view["blocks"][0]
    values = {block["block_id"]: {block["element"]["action_id"]:
                                  {"type": "plain_text_input", "value": text}}}
    return {
        "type": "view_submission", "team": {"id": TEAM_ID, "domain": "fake"},
        "user": {"id": user, "username": user, "team_id": TEAM_ID}, "api_app_id": APP_ID,
        "token": "legacy", "trigger_id": f"trig.{next(_event_ids)}",
        "view": {**view, "id": "V1", "team_id": TEAM_ID, "state": {"values": values},
                 "hash": "h", "app_id": APP_ID, "bot_id": BOT_ID},
        "response_urls": [],
    }


def slash_command(text: str, *, user: str, channel: str) -> dict[str, str]:
    return {"token": "legacy", "team_id": TEAM_ID, "team_domain": "fake", "channel_id": channel,
            "channel_name": "tuning", "user_id": user, "user_name": user, "command": "/tuner",
            "text": text, "api_app_id": APP_ID, "response_url": "http://127.0.0.1:9/response",
            "trigger_id": f"trig.{next(_event_ids)}"}


# ---------------------------------------------------------------------- signed HTTP helper
def sign(secret: str, timestamp: str, body: str) -> str:
    base = f"v0:{timestamp}:{body}".encode()
    return "v0=" + hmac.new(secret.encode(), base, hashlib.sha256).hexdigest()


@dataclass
class SignedResponse:
    status: int
    body: str
    elapsed_s: float


def post_signed(
    url: str, payload: dict[str, Any], *, kind: str = "events", secret: str = SIGNING_SECRET,
    retry_num: int | None = None, bad_signature: bool = False, timestamp: int | None = None,
) -> SignedResponse:
    """POST like Slack does: events as JSON, interactivity as form `payload=`, commands as form."""
    if kind == "events":
        body, ctype = json.dumps(payload), "application/json"
    elif kind == "interactive":
        body, ctype = urlencode({"payload": json.dumps(payload)}), "application/x-www-form-urlencoded"
    else:
        body, ctype = urlencode(payload), "application/x-www-form-urlencoded"
    ts = str(timestamp if timestamp is not None else int(time.time()))
    sig = sign("wrong-secret" if bad_signature else secret, ts, body)
    headers = {"Content-Type": ctype, "X-Slack-Request-Timestamp": ts, "X-Slack-Signature": sig}
    if retry_num is not None:
        headers["X-Slack-Retry-Num"] = str(retry_num)
        headers["X-Slack-Retry-Reason"] = "http_timeout"
    req = urllib.request.Request(url, data=body.encode(), headers=headers, method="POST")
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return SignedResponse(resp.status, resp.read().decode(), time.perf_counter() - t0)
    except urllib.error.HTTPError as e:
        return SignedResponse(e.code, e.read().decode(), time.perf_counter() - t0)
