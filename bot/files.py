"""Fetching a file a user shared in a thread, every failure said in plain words.

Slack behaviour this follows (the fake in tests/fakes/slack_fake.py does the same):
- url_private / url_private_download need `Authorization: Bearer <token>` from a token
  with files:read (Slack platform blog, "Important changes to files in the Web API",
  2015-11-18; manifest.yml asks for files:read).
- With a bad token or without files:read the download is not an error: HTTP 200 with
  Slack's HTML sign-in page (openclaw/openclaw#63523, slack-go/slack#1284: "returns html
  instead of bytes ... Browser not supported"). So an HTML body is never taken as the file;
  files.info then tells a missing scope (`missing_scope`, `needed: files:read`) from a bad
  token (`invalid_auth` ...).
- Downloads redirect through Slack hosts that still need the token; only the last hop may
  be a presigned CDN URL (slack-edge.com) that must not get it (nextlevelbuilder/goclaw#233,
  curie-eng/curie#2718: url_private of a PDF answers 302 to slack-files.com).
- In Slack Connect channels a message event's file is only {"id", "file_access":
  "check_file_info"}; files.info gives the real object (api.slack.com/apis/
  channels-between-orgs, "check_file_info").
- The file object carries `size`, so a file over the cap is refused before any download.
"""

from __future__ import annotations

import math
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError, SlackClientError

from storage.settings import Settings

__all__ = ["DownloadError", "SlackFiles"]

_MB = 1024 * 1024
_BAD_TOKEN = {"invalid_auth", "not_authed", "token_revoked", "token_expired",
              "account_inactive", "not_allowed_token_type"}
_REINSTALL = ("add it under OAuth & Permissions › Bot Token Scopes, reinstall the app to the "
              "workspace, then share the file again")


class DownloadError(Exception):
    """Why a shared file could not be fetched: a complete sentence for the thread."""


def _mb(n: int) -> str:
    return f"{math.ceil(n / _MB * 10) / 10:g} MB"  # rounded up: 20.01 MB never reads "20 MB"


@dataclass
class SlackFiles:
    settings: Settings
    client: WebClient  # files.info (resolving Slack Connect files, diagnosing sign-in pages)

    @property
    def limit(self) -> int:
        return self.settings.tuner_max_import_mb * _MB

    def resolve(self, f: dict[str, Any]) -> dict[str, Any]:
        """The full file object: the event's, or files.info's when the event only has an id."""
        if f.get("file_access") == "check_file_info" or not (
                f.get("url_private_download") or f.get("url_private")):
            f = {**f, **self._info(f)}
        if f.get("is_external") or f.get("mode") == "external":
            raise DownloadError(f"`{_name(f)}` is a link to a file stored outside Slack, not an "
                                "upload; upload the file itself.")
        if f.get("mode") in ("tombstone", "hidden_by_limit"):
            raise DownloadError(f"Slack no longer shows `{_name(f)}` to apps (it was deleted "
                                "or is past the workspace's history limit).")
        return f

    def check_size(self, f: dict[str, Any]) -> None:
        size = int(f.get("size") or 0)
        if size > self.limit:
            raise DownloadError(f"{_name(f)} is {_mb(size)}; the limit is "
                                f"{self.settings.tuner_max_import_mb} MB (TUNER_MAX_IMPORT_MB).")

    def download(self, f: dict[str, Any]) -> bytes:
        """The file's bytes (at most the cap); DownloadError says why not."""
        url = f.get("url_private_download") or f.get("url_private") or ""
        host = urlparse(url).hostname or ""
        if not self._is_file_host(host):
            raise DownloadError(f"The download link of `{_name(f)}` points outside Slack "
                                f"({host or 'no host'}), so it was not fetched.")
        data, ctype = self._get(f, url)
        if len(data) > self.limit:
            raise DownloadError(f"{_name(f)} is over {self.settings.tuner_max_import_mb} MB, "
                                "the limit (TUNER_MAX_IMPORT_MB).")
        if _is_html(data, ctype) and "html" not in str(f.get("mimetype") or ""):
            raise DownloadError(self._why_sign_in_page(f))
        return data

    # ---- internals ------------------------------------------------------------------

    def _info(self, f: dict[str, Any]) -> dict[str, Any]:
        try:
            return dict(self.client.files_info(file=f.get("id", ""))["file"])
        except SlackApiError as e:
            raise DownloadError(_api_error(f, e.response.get("error"),
                                           e.response.get("needed"))) from None
        except (SlackClientError, OSError) as e:
            raise DownloadError(f"Couldn't reach Slack to look up `{_name(f)}` (network: "
                                f"{_reason(e)}); share it again in a minute.") from None

    def _get(self, f: dict[str, Any], url: str) -> tuple[bytes, str]:
        token = self.settings.slack_bot_token
        headers = {"Authorization": f"Bearer {token.get_secret_value()}"} if token else {}
        opener = urllib.request.build_opener(_TokenSafeRedirect(self._keeps_token))
        req = urllib.request.Request(url, headers=headers)  # host checked: Slack only
        try:
            with opener.open(req, timeout=30) as resp:
                return resp.read(self.limit + 1), resp.headers.get("Content-Type", "")
        except urllib.error.HTTPError as e:
            raise DownloadError(_http_error(f, e.code)) from None
        except (urllib.error.URLError, OSError) as e:
            raise DownloadError(f"Couldn't reach Slack's file server for `{_name(f)}` "
                                f"(network: {_reason(e)}); share it again in a minute.") from None

    def _why_sign_in_page(self, f: dict[str, Any]) -> str:
        start = (f"Slack sent its sign-in page instead of `{_name(f)}`, so the bot was not "
                 "allowed to download it")
        try:
            self.client.files_info(file=f.get("id", ""))
        except SlackApiError as e:
            return _api_error(f, e.response.get("error"), e.response.get("needed"), start)
        except (SlackClientError, OSError):
            return (f"{start}: the bot token is invalid or lacks the files:read scope (Slack "
                    "could not be asked which).")
        return (f"{start}, although the token can read the file's details; reinstall the app "
                "(its token may be out of date) and share the file again.")

    def _api_host(self) -> str:
        return urlparse(self.settings.tuner_slack_api_url).hostname or ""

    def _is_file_host(self, host: str) -> bool:
        return host in ("files.slack.com", "files.slack-gov.com", self._api_host())

    def _keeps_token(self, host: str) -> bool:
        """Slack's own hosts get the token on a redirect; a CDN's presigned URL never does."""
        return (host in ("slack.com", "slack-gov.com", self._api_host())
                or host.endswith((".slack.com", ".slack-gov.com")))


def _name(f: dict[str, Any]) -> str:
    return str(f.get("name") or f.get("title") or f.get("id") or "the file")


def _reason(e: BaseException) -> str:
    inner = getattr(e, "reason", None)
    if isinstance(inner, (socket.timeout, TimeoutError)) or isinstance(e, TimeoutError):
        return "timed out"
    return str(getattr(inner, "strerror", None) or inner or e) or type(e).__name__


def _api_error(f: dict[str, Any], error: str | None, needed: str | None,
               start: str | None = None) -> str:
    start = start or f"Couldn't look up `{_name(f)}` in Slack"
    if error == "missing_scope":
        scope = needed or "files:read"
        return f"{start}: the app lacks the {scope} scope; {_REINSTALL}."
    if error in _BAD_TOKEN:
        return (f"{start}: Slack refused the bot token ({error}); check SLACK_BOT_TOKEN (the "
                "app may have been reinstalled or removed) and restart the bot.")
    if error in ("file_not_found", "file_deleted"):
        return f"{start}: Slack says the file is gone ({error})."
    return f"{start}: Slack answered {error or 'an unknown error'}."


def _http_error(f: dict[str, Any], code: int) -> str:
    why = {403: "access denied: the bot may not be in this channel, or the file is restricted",
           404: "not found: the file was deleted, or the bot can't see it"}.get(
        code, "Slack's file server had a problem; share it again in a minute")
    return f"Couldn't download `{_name(f)}`: HTTP {code} ({why})."


def _is_html(data: bytes, ctype: str) -> bool:
    head = data[:512].lstrip().lower()
    return "text/html" in ctype.lower() or head.startswith((b"<!doctype html", b"<html"))


class _TokenSafeRedirect(urllib.request.HTTPRedirectHandler):
    """Follows redirects; the bot token only goes on to hosts `keeps_token` accepts."""

    def __init__(self, keeps_token: Any) -> None:
        self.keeps_token = keeps_token

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and not self.keeps_token(urlparse(newurl).hostname or ""):
            new.remove_header("Authorization")
        return new
