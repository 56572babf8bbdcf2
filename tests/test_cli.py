"""`tuner doctor` / `tuner projects`, wiring, and the Slack app manifest."""

from __future__ import annotations

import time

import io
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlmodel import select

from bot import cli
from bot.handlers import COMMANDS, EVENTS, MANIFEST_BOT_EVENTS, REQUIRED_SCOPES
from storage import spend
from storage.db import Database
from storage.models import Project
from storage.settings import Settings
from tests.fakes.anthropic_fake import FakeAnthropic
from tests.fakes.runpod_fake import FakeRunPod
from tests.fakes.slack_fake import APP_TOKEN, BOT_TOKEN, FakeSlack

ROOT = Path(__file__).resolve().parents[1]
ANTHROPIC_KEY = "sk-ant-test-key-123"


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch):
    slack = FakeSlack().start()
    anthropic = FakeAnthropic(lambda req: "{}", api_key=ANTHROPIC_KEY)
    anthropic.start()
    runpod = FakeRunPod().start()
    monkeypatch.setenv("RUNPOD_API_BASE_URL", runpod.base_url)
    yield slack, anthropic, runpod
    slack.stop()
    anthropic.stop()
    runpod.close()


def _settings(tmp_path: Path, **kw: Any) -> Settings:
    return Settings(_env_file=None, database_url=f"sqlite:///{tmp_path}/t.db",  # type: ignore[call-arg]
                    **kw)


def _doctor(settings: Settings) -> tuple[int, dict[str, str], str]:
    out = io.StringIO()
    rc = cli.doctor(settings, out)
    text = out.getvalue()
    status = {line.split()[0]: line.split()[1] for line in text.splitlines()[:-1]}
    return rc, status, text


def test_doctor_reports_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rc, status, text = _doctor(_settings(tmp_path))
    assert rc == 1
    assert status == {"SLACK_BOT_TOKEN": "MISSING", "SLACK_APP_TOKEN": "MISSING",
                      "ANTHROPIC_API_KEY": "MISSING", "RUNPOD_API_KEY": "MISSING",
                      "HF_TOKEN": "MISSING", "DATABASE_URL": "OK"}
    assert "SLACK_SIGNING_SECRET" in text and "(optional)" in text
    assert "FAILED: SLACK_BOT_TOKEN, SLACK_APP_TOKEN, ANTHROPIC_API_KEY, RUNPOD_API_KEY" in text


def test_doctor_reports_rejected_without_leaking(tmp_path: Path, fakes) -> None:
    slack, anthropic, runpod = fakes
    secrets = {"slack_bot_token": "xoxb-wrong-999", "slack_app_token": "xapp-wrong-888",
               "anthropic_api_key": "sk-ant-wrong-777", "runpod_api_key": "rp-wrong-666",
               "hf_token": "hf_secretsecret555"}
    settings = _settings(tmp_path, tuner_slack_api_url=slack.base_url,
                         anthropic_base_url=anthropic.base_url,
                         runpod_api_base_url=runpod.base_url, **secrets)
    rc, status, text = _doctor(settings)
    assert rc == 1
    assert status["SLACK_BOT_TOKEN"] == "REJECTED" and "invalid_auth" in text
    assert status["SLACK_APP_TOKEN"] == "REJECTED"
    assert status["ANTHROPIC_API_KEY"] == "REJECTED"
    assert status["RUNPOD_API_KEY"] == "REJECTED"
    assert status["HF_TOKEN"] == "OK"
    for value in secrets.values():
        assert value not in text


def test_doctor_all_ok(tmp_path: Path, fakes) -> None:
    slack, anthropic, runpod = fakes
    settings = _settings(tmp_path, tuner_slack_api_url=slack.base_url,
                         slack_bot_token=BOT_TOKEN, slack_app_token=APP_TOKEN,
                         anthropic_api_key=ANTHROPIC_KEY, anthropic_base_url=anthropic.base_url,
                         runpod_api_key=runpod.api_key, runpod_api_base_url=runpod.base_url)
    rc, status, text = _doctor(settings)
    assert rc == 0, text
    assert set(status.values()) == {"OK", "MISSING"} and status["HF_TOKEN"] == "MISSING"
    assert "All required checks passed." in text
    for value in (BOT_TOKEN, APP_TOKEN, ANTHROPIC_KEY, runpod.api_key):
        assert value not in text


def test_doctor_runpod_outage_is_failed_not_rejected(tmp_path: Path, fakes) -> None:
    from tests.fakes.runpod_faults import html_error

    _slack, _anthropic, runpod = fakes
    runpod.fail("pods", html_error(503), seconds=60)
    settings = _settings(tmp_path, runpod_api_key=runpod.api_key,
                         runpod_api_base_url=runpod.base_url)
    _, status, text = _doctor(settings)
    assert status["RUNPOD_API_KEY"] == "FAILED" and "HTTP 503" in text
    assert runpod.gql_count("pods") == 1 and "<html" not in text.lower()


def test_doctor_signing_secret_is_enough_for_transport(tmp_path: Path) -> None:
    _, status, text = _doctor(_settings(tmp_path, slack_signing_secret="s3cr3t-value"))
    assert status["SLACK_SIGNING_SECRET"] == "OK" and "s3cr3t-value" not in text


def test_doctor_unreachable_slack_is_failed(tmp_path: Path) -> None:
    settings = _settings(tmp_path, slack_bot_token="xoxb-x",
                         tuner_slack_api_url="http://127.0.0.1:9/api/")
    _, status, text = _doctor(settings)
    assert status["SLACK_BOT_TOKEN"] == "FAILED" and "xoxb-x" not in text


def test_projects_listing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = _settings(tmp_path)
    db = Database(settings.database_url)
    with db.session() as s:
        s.add(Project(thread_id="T:C1:1.0", team_id="T", channel_id="C1", thread_ts="1.0",
                      created_by="U", name="faq-bot", status="ready"))
        s.commit()
    spend.record(db, kind="claude_tokens", usd=0.42)
    assert cli.projects(settings) == 0
    out = capsys.readouterr().out
    assert "faq-bot" in out and "ready" in out and "$0.42" in out


def test_wiring_builds_with_fakes_and_runs_startup(tmp_path: Path, fakes) -> None:
    from bot.wiring import build

    slack, anthropic, runpod = fakes
    settings = _settings(tmp_path, tuner_slack_api_url=slack.base_url,
                         slack_bot_token=BOT_TOKEN, slack_signing_secret="sig",
                         anthropic_api_key=ANTHROPIC_KEY, anthropic_base_url=anthropic.base_url,
                         runpod_api_key=runpod.api_key, runpod_api_base_url=runpod.base_url,
                         tuner_reaper_interval_s=3600)
    wired = build(settings, artifacts_dir=tmp_path / "artifacts")
    from storage.models import NightlyRun, Project

    with wired.db.session() as s:  # a nightly that a killed process left "running"
        s.add(Project(thread_id="T:C:7", team_id="T", channel_id="C", thread_ts="7",
                      created_by="U"))
        s.commit()
        s.add(NightlyRun(project_id=1, run_date="2026-01-01", status="running"))
        s.commit()
    try:
        assert wired.services.training is not None and wired.reaper is not None
        assert [m.split()[0] for m in wired.missing] == ["HF_TOKEN"]
        assert wired.start_background() == []
        assert wired.reaper.passes >= 1
        assert any("pods" in q for q in runpod.queries)
        assert wired.scheduler is not None and wired.scheduler.running
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with wired.db.session() as s:
                if s.get(NightlyRun, 1).status != "running":
                    break
            time.sleep(0.1)
        with wired.db.session() as s:
            assert s.get(NightlyRun, 1).status == "failed"
    finally:
        wired.close()


def test_startup_reaper_pass_deletes_templates_left_pending(tmp_path: Path, fakes) -> None:
    """A template RunPod still refused when the last process stopped is deleted by the
    start-up reaper pass of the next one (the pending deletion is a stored row)."""
    from bot.wiring import build
    from storage.models import TemplateCleanup
    from tests.fakes.runpod_serverless_fake import FakeServerless

    slack, anthropic, runpod = fakes
    sl = FakeServerless(api_key=runpod.api_key)  # its GraphQL served through FakeRunPod's
    runpod.add_graphql_handler(sl.graphql)
    out = sl.graphql('mutation { saveTemplate(input: { name: "tuner-p1-d1-tpl", imageName: "img", '
                     'env: [], isServerless: true, containerDiskInGb: 35 }) { id } }')
    assert out is not None and "data" in out and sl.live_templates == ["tuner-p1-d1-tpl"]
    settings = _settings(tmp_path, tuner_slack_api_url=slack.base_url,
                         slack_bot_token=BOT_TOKEN, slack_signing_secret="sig",
                         anthropic_api_key=ANTHROPIC_KEY, anthropic_base_url=anthropic.base_url,
                         runpod_api_key=runpod.api_key, runpod_api_base_url=runpod.base_url,
                         tuner_reaper_interval_s=3600)
    with Database(settings.database_url).session() as s:
        s.add(TemplateCleanup(template_name="tuner-p1-d1-tpl", attempts=3,
                              last_error="Template is in use by a pod or serverless endpoint"))
        s.commit()
    wired = build(settings, artifacts_dir=tmp_path / "artifacts")
    try:
        assert wired.templates is not None and wired.reaper.templates is wired.templates
        wired.start_background()
        assert sl.live_templates == []
        with wired.db.session() as s:
            (row,) = s.exec(select(TemplateCleanup)).all()
        assert row.done_at is not None and row.attempts == 4
    finally:
        wired.close()


def test_wiring_without_keys_explains(tmp_path: Path) -> None:
    from bot.wiring import MissingLLM, build

    slack = FakeSlack().start()
    try:
        settings = _settings(tmp_path, tuner_slack_api_url=slack.base_url,
                             slack_bot_token=BOT_TOKEN, slack_app_token=APP_TOKEN)
        wired = build(settings)
        try:
            assert isinstance(wired.runner.ctx.llm, MissingLLM)
            assert wired.services.training is None and wired.reaper is None
            assert wired.scheduler is None
            assert any("ANTHROPIC_API_KEY" in m for m in wired.missing)
            assert any("RUNPOD_API_KEY" in m for m in wired.missing)
        finally:
            wired.close()
    finally:
        slack.stop()


def test_serve_refuses_without_transport_secret(tmp_path: Path) -> None:
    settings = _settings(tmp_path, slack_bot_token=BOT_TOKEN)
    assert cli.serve(settings, http=True, port=0) == 2
    assert cli.serve(settings, http=False, port=None) == 2


def test_manifest_matches_code() -> None:
    m = yaml.safe_load((ROOT / "manifest.yml").read_text())
    assert m["features"]["bot_user"]["display_name"]
    assert m["features"]["app_home"]["home_tab_enabled"] is True
    assert [c["command"] for c in m["features"]["slash_commands"]] == list(COMMANDS)
    assert set(m["oauth_config"]["scopes"]["bot"]) == set(REQUIRED_SCOPES)
    events = m["settings"]["event_subscriptions"]["bot_events"]
    assert set(events) == set(MANIFEST_BOT_EVENTS)
    # every subscribed event reaches a listener and every listener has a subscription
    assert {e.split(".")[0] for e in events} == set(EVENTS)
    assert m["settings"]["interactivity"]["is_enabled"] is True
    assert m["settings"]["socket_mode_enabled"] is True


def test_console_script_declared() -> None:
    import tomllib

    py = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert py["project"]["scripts"]["tuner"] == "bot.cli:main"
