"""Console script `tuner`: serve | doctor | projects."""

from __future__ import annotations

import argparse
import html
import logging
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from storage.settings import Settings

OK, MISSING, REJECTED, FAILED, SKIPPED = "OK", "MISSING", "REJECTED", "FAILED", "SKIPPED"


@dataclass
class Check:
    name: str
    status: str
    detail: str
    required: bool = True

    @property
    def failed(self) -> bool:
        return self.required and self.status not in (OK, SKIPPED)


def _clean(settings: Settings, text: str) -> str:
    from storage.redact import redact

    text = redact(" ".join(text.split()), settings)
    return text if len(text) <= 200 else text[:200] + "…"


def _guard(settings: Settings, name: str, fn: Callable[[], Check]) -> Check:
    try:
        return fn()
    except Exception as e:  # noqa: BLE001  (doctor reports, never crashes)
        return Check(name, FAILED, _clean(settings, f"{type(e).__name__}: {e}"))


def check_slack_bot(settings: Settings) -> Check:
    name = "SLACK_BOT_TOKEN"
    if settings.slack_bot_token is None:
        return Check(name, MISSING, "set SLACK_BOT_TOKEN (xoxb-...)")
    from slack_sdk import WebClient
    from slack_sdk.errors import SlackApiError

    client = WebClient(token=settings.slack_bot_token.get_secret_value(),
                       base_url=settings.tuner_slack_api_url, timeout=10)
    try:
        r = client.auth_test()
    except SlackApiError as e:
        return Check(name, REJECTED, f"auth.test: {e.response.get('error')}")
    return Check(name, OK, f"team {r.get('team')} as @{r.get('user')}")


def check_slack_transport(settings: Settings) -> Check:
    if settings.slack_app_token is not None:
        name = "SLACK_APP_TOKEN"
        from slack_sdk import WebClient
        from slack_sdk.errors import SlackApiError

        client = WebClient(base_url=settings.tuner_slack_api_url, timeout=10)
        try:
            client.apps_connections_open(app_token=settings.slack_app_token.get_secret_value())
        except SlackApiError as e:
            return Check(name, REJECTED, f"apps.connections.open: {e.response.get('error')}")
        return Check(name, OK, "Socket Mode connection can be opened")
    if settings.slack_signing_secret is not None:
        return Check("SLACK_SIGNING_SECRET", OK, "set (HTTP mode; verified per request)")
    return Check("SLACK_APP_TOKEN", MISSING,
                 "set SLACK_APP_TOKEN (Socket Mode) or SLACK_SIGNING_SECRET (HTTP mode)")


def check_anthropic(settings: Settings) -> Check:
    name = "ANTHROPIC_API_KEY"
    if settings.anthropic_api_key is None:
        return Check(name, MISSING, "set ANTHROPIC_API_KEY")
    from jobs.claude import ClaudeAPIError, ClaudeClient

    try:
        detail = ClaudeClient(settings, None, max_retries=0, timeout_s=15).ping()
    except ClaudeAPIError as e:
        status = FAILED if "Could not reach" in str(e) else REJECTED
        return Check(name, status, _clean(settings, str(e)))
    return Check(name, OK, _clean(settings, detail))


def check_runpod(settings: Settings) -> Check:
    name = "RUNPOD_API_KEY"
    if settings.runpod_api_key is None:
        return Check(name, MISSING, "set RUNPOD_API_KEY (training and deployment need it)")
    from jobs.runpod_api import RunPodAPI
    from jobs.values import RunPodAuthError, RunPodError, RunPodTransientError

    try:  # one try: the doctor reports, it does not wait out an outage
        pods = RunPodAPI(settings.model_copy(update={"tuner_runpod_attempts": 1})).list_pods()
    except RunPodTransientError as e:
        return Check(name, FAILED, _clean(settings, str(e)))
    except (RunPodAuthError, RunPodError) as e:
        return Check(name, REJECTED, _clean(settings, str(e)))
    return Check(name, OK, f"GraphQL reachable, {len(pods)} pod(s) on the account")


def check_hf(settings: Settings) -> Check:
    if settings.hf_token is None:
        return Check("HF_TOKEN", MISSING, "needed to push merged models for deploy",
                     required=False)
    return Check("HF_TOKEN", OK, "set (not verified offline)", required=False)


def check_db(settings: Settings) -> Check:
    import uuid

    from storage.db import Database
    from storage.models import SlackEventClaim

    db = Database(settings.database_url)
    key = f"doctor:{uuid.uuid4().hex}"
    if not db.claim(key):
        return Check("DATABASE_URL", FAILED, "could not write a row")
    with db.session() as s:
        row = s.get(SlackEventClaim, key)
        if row is not None:
            s.delete(row)
            s.commit()
    url = settings.database_url
    shown = url.split("@")[-1] if "@" in url else url  # hide credentials in Postgres URLs
    return Check("DATABASE_URL", OK, f"writable ({shown})")


CHECKS: list[tuple[str, Callable[[Settings], Check]]] = [
    ("SLACK_BOT_TOKEN", check_slack_bot),
    ("SLACK_APP_TOKEN", check_slack_transport),
    ("ANTHROPIC_API_KEY", check_anthropic),
    ("RUNPOD_API_KEY", check_runpod),
    ("HF_TOKEN", check_hf),
    ("DATABASE_URL", check_db),
]


def doctor(settings: Settings, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    results = [_guard(settings, name, lambda fn=fn: fn(settings)) for name, fn in CHECKS]
    for c in results:
        opt = "" if c.required else " (optional)"
        print(f"{c.name:<22} {c.status:<9} {_clean(settings, c.detail)}{opt}", file=out)
    failed = [c.name for c in results if c.failed]
    print(("FAILED: " + ", ".join(failed)) if failed else "All required checks passed.", file=out)
    return 1 if failed else 0


def projects(settings: Settings, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    from bot.home import status_text
    from storage.db import Database

    text = status_text(Database(settings.database_url)).replace("*", "")
    print(html.unescape(text), file=out)  # names are escaped for Slack's mrkdwn
    return 0


def _raise_interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def serve(settings: Settings, *, http: bool, port: int | None) -> int:
    from bot.app import serve_http, serve_socket_mode
    from bot.wiring import build

    if http and settings.slack_signing_secret is None:
        print("--http needs SLACK_SIGNING_SECRET", file=sys.stderr)
        return 2
    if not http and settings.slack_app_token is None:
        print("Socket Mode needs SLACK_APP_TOKEN (or use --http with SLACK_SIGNING_SECRET)",
              file=sys.stderr)
        return 2
    wired = build(settings)
    for m in wired.missing:
        logging.getLogger("tuner").warning("not configured: %s", m)
    signal.signal(signal.SIGTERM, _raise_interrupt)  # docker/systemd stop: shut down cleanly
    recovered = wired.start_background()
    if recovered:
        logging.getLogger("tuner").info("resuming %d interrupted thread(s)", len(recovered))
    try:
        if http:
            serve_http(wired.app, port or settings.tuner_http_port)
        else:
            assert settings.slack_app_token is not None
            serve_socket_mode(wired.app, settings.slack_app_token.get_secret_value())
    except KeyboardInterrupt:
        pass
    finally:
        wired.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tuner", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_serve = sub.add_parser("serve", help="run the Slack bot (Socket Mode by default)")
    p_serve.add_argument("--http", action="store_true", help="HTTP mode (SLACK_SIGNING_SECRET)")
    p_serve.add_argument("--port", type=int, default=None)
    sub.add_parser("doctor", help="check tokens and connectivity")
    sub.add_parser("projects", help="list projects, runs, deployments and spend")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = Settings()
    from storage.redact import install_log_redaction

    install_log_redaction(settings)
    for noisy in ("httpx", "httpcore", "urllib3"):  # one line per pod poll otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.cmd == "doctor":
        return doctor(settings)
    if args.cmd == "projects":
        return projects(settings)
    return serve(settings, http=args.http, port=args.port)


if __name__ == "__main__":
    sys.exit(main())
