"""`tuner serve` as a real process: Socket Mode connect, a mention answered, clean SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.fakes.slack_fake import APP_TOKEN, BOT_TOKEN, FakeSlack, mention_pair

ROOT = Path(__file__).resolve().parents[1]


def test_serve_connects_answers_and_stops_on_sigterm(tmp_path: Path) -> None:
    with FakeSlack() as slack:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("SLACK_", "ANTHROPIC_", "RUNPOD_", "HF_", "TUNER_"))}
        env.update(SLACK_BOT_TOKEN=BOT_TOKEN, SLACK_APP_TOKEN=APP_TOKEN,
                   TUNER_SLACK_API_URL=slack.base_url,
                   DATABASE_URL=f"sqlite:///{tmp_path}/tuner.db", PYTHONPATH=str(ROOT))
        proc = subprocess.Popen([sys.executable, "-m", "bot.cli", "serve"], cwd=tmp_path,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            slack.wait_socket(60)
            for payload in mention_pair("U1", "C1", "300.000001", "make me an SEO writer"):
                slack.wait_ack(slack.push("events_api", payload), 30)
            reply = slack.wait_for(lambda: [m for m in slack.messages
                                            if m.get("thread_ts") == "300.000001"], 60)
            assert len(reply) == 1 and "ANTHROPIC_API_KEY" in reply[0]["text"]
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        log = proc.stdout.read().decode() if proc.stdout else ""
        assert BOT_TOKEN not in log and APP_TOKEN not in log
        assert (tmp_path / "tuner.db").exists()
