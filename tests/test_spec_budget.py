"""A budget stated in the conversation becomes the project's cap, within the admin's cap."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agent.ports import RecordingNotifier
from storage.db import Database
from storage.models import Project
from tests.fakes.anthropic_fake import FakeAnthropic
from tests.test_graph import make_runner, make_settings


def _spec(budget: float | None) -> dict[str, Any]:
    return {"name": "seo", "description": "SEO articles", "inputs": "a keyword",
            "output_requirements": "an article", "style": "friendly",
            "system_prompt": "You write SEO articles.", "example_count": 100,
            "base_model": "unsloth/Llama-3.2-1B-Instruct", "max_output_tokens": 512,
            "budget_usd": budget}


@pytest.mark.parametrize(("stated", "cap"), [(5.0, 5.0), (500.0, 50.0), (None, 50.0)])
def test_stated_budget_caps_project(tmp_path: Path, stated: float | None, cap: float) -> None:
    reply = json.dumps({"ready": True, "question": None, "spec": _spec(stated)})
    with FakeAnthropic.running(lambda req: reply) as fake:
        settings = make_settings(tmp_path, fake)
        runner = make_runner(settings, RecordingNotifier())
        try:
            runner.start(team="T1", channel="C1", thread_ts="9.1", user="U1", text="seo writer")
            [(_, card)] = runner.pending("T1:C1:9.1")
            assert card["kind"] == "spec"
        finally:
            runner.close()
    with Database(settings.database_url).session() as s:
        project = s.get(Project, 1)
    assert settings.tuner_project_budget_usd == 50.0
    assert project is not None and project.budget_usd == cap
