"""Bolt app factory plus the two transports (Socket Mode, HTTP)."""

from __future__ import annotations

import logging
from http.server import ThreadingHTTPServer

from slack_bolt import App
from slack_bolt.app.app import SlackAppDevelopmentServer
from slack_sdk import WebClient

from bot.handlers import Handlers, Runner, Services
from storage.settings import Settings

log = logging.getLogger(__name__)

EVENTS_PATH = "/slack/events"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # Slack bursts: the default backlog of 5 resets connections


def make_client(settings: Settings) -> WebClient:
    """WebClient that also retries HTTP 429 after Slack's Retry-After (the SDK's default
    handlers retry connection errors only, so a rate-limited post would be lost)."""
    from slack_sdk.http_retry import RateLimitErrorRetryHandler, default_retry_handlers

    token = settings.slack_bot_token.get_secret_value() if settings.slack_bot_token else None
    handlers = [*default_retry_handlers(), RateLimitErrorRetryHandler(max_retry_count=3)]
    return WebClient(token=token, base_url=settings.tuner_slack_api_url,
                     retry_handlers=handlers)


def create_app(
    settings: Settings, runner: Runner, services: Services, *, client: WebClient | None = None
) -> App:
    """Build the Bolt app (this calls auth.test) and register every listener."""
    if settings.slack_bot_token is None:
        raise ValueError("SLACK_BOT_TOKEN is not set")
    client = client or make_client(settings)  # bolt takes the token from the client
    secret = settings.slack_signing_secret
    app = App(
        client=client,
        signing_secret=secret.get_secret_value() if secret else None,
        # Socket Mode carries no signatures; HTTP mode always verifies them.
        request_verification_enabled=secret is not None,
        name="tuner",
    )
    Handlers(settings, runner, services).register(app)
    return app


def make_http_server(app: App, port: int, host: str = "0.0.0.0") -> ThreadingHTTPServer:
    """Bolt's built-in development HTTP handler, served by a threading server so one slow
    request cannot delay other acks. port=0 picks a free port."""
    dev = SlackAppDevelopmentServer(port=0, path=EVENTS_PATH, app=app,
                                    http_server_logger_enabled=False)
    handler = dev._server.RequestHandlerClass  # bolt's SlackAppHandler
    dev._server.server_close()
    return _Server((host, port), handler)


def serve_socket_mode(app: App, app_token: str) -> None:
    from slack_bolt.adapter.socket_mode import SocketModeHandler

    SocketModeHandler(app, app_token).start()


def serve_http(app: App, port: int) -> None:
    server = make_http_server(app, port)
    log.info("tuner listening on :%d%s", server.server_address[1], EVENTS_PATH)
    try:
        server.serve_forever(0.1)
    finally:
        server.server_close()
