"""Downloading a shared file: the bot token never follows a redirect off Slack's hosts."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from slack_sdk import WebClient

from bot.files import SlackFiles
from storage.settings import Settings

TOKEN = "xoxb-download-test"


class _Host:
    """A loopback HTTP host that records Authorization headers and serves or redirects."""

    def __init__(self, redirect_to: str | None = None) -> None:
        self.seen: list[str | None] = []
        host = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                host.seen.append(self.headers.get("Authorization"))
                if redirect_to:
                    self.send_response(302)
                    self.send_header("Location", redirect_to)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = b"{\"prompt\": \"p\", \"response\": \"r\"}\n"
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.port = self.server.server_address[1]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("target_host", ["localhost", "127.0.0.1"])
def test_token_only_follows_redirects_to_trusted_hosts(tmp_path, target_host: str) -> None:
    final = _Host()
    start = _Host(redirect_to=f"http://{target_host}:{final.port}/f/data.jsonl")
    try:
        settings = Settings(_env_file=None, slack_bot_token=TOKEN,  # type: ignore[call-arg]
                            tuner_slack_api_url=f"http://127.0.0.1:{start.port}/api/")
        files = SlackFiles(settings, WebClient(token=TOKEN, base_url=settings.tuner_slack_api_url))
        data = files.download({"url_private_download":
                               f"http://127.0.0.1:{start.port}/f/data.jsonl", "size": 10})
        assert data.startswith(b'{"prompt"')
        assert start.seen == [f"Bearer {TOKEN}"]
        # 127.0.0.1 is the (fake) Slack host: still authorised; localhost is elsewhere
        expected = f"Bearer {TOKEN}" if target_host == "127.0.0.1" else None
        assert final.seen == [expected]
    finally:
        start.close()
        final.close()


def test_sign_in_page_for_a_bad_token_is_named(tmp_path) -> None:
    """Slack's file server answers a bad token with 200 + its HTML sign-in page; files.info
    (invalid_auth) tells it apart from a missing scope. Nothing HTML is returned as data."""
    from pydantic import SecretStr

    from bot.files import DownloadError
    from tests.fakes.slack_fake import FakeSlack

    with FakeSlack() as fake:
        f = fake.add_file("tickets.jsonl", b'{"prompt": "p", "response": "r"}\n')
        settings = Settings(_env_file=None, slack_bot_token=SecretStr("xoxb-revoked"),  # type: ignore[call-arg]
                            tuner_slack_api_url=fake.base_url)
        files = SlackFiles(settings, WebClient(token="xoxb-revoked", base_url=fake.base_url))
        with pytest.raises(DownloadError) as e:
            files.download(files.resolve(f))
        assert "sign-in page" in str(e.value)
        assert "Slack refused the bot token (invalid_auth)" in str(e.value)
        assert "SLACK_BOT_TOKEN" in str(e.value) and "xoxb-revoked" not in str(e.value)
        assert fake.downloads == [(f["id"], "Bearer xoxb-revoked")]  # one hop: sign-in page
