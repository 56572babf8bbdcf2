"""The whole product over the wire: Slack (Socket Mode) -> agent -> Claude -> RunPod.

Everything below `bot.wiring.build` is real code; Slack, Anthropic and RunPod are the
loopback fakes, reached through their real SDKs. The "pod" runs jobs/train.py on CPU
with a tiny randomly initialised model, so training, eval loss and the adapter are real.
The bot is stopped in the middle of training and a new process picks the run up again.
"""

from __future__ import annotations

import json
import random
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from slack_bolt.adapter.socket_mode import SocketModeHandler
from sqlmodel import col, select

from bot import blocks as B
from bot.wiring import Wired, build
from storage.models import Example, MetricPoint, Project, Run, SpendEntry
from storage.settings import Settings
from tests.fakes.anthropic_fake import API_KEY, FakeAnthropic, last_user_text, system_text
from tests.fakes.runpod_fake import FakeRunPod
from tests.fakes.runpod_serverless_fake import FakeServerless
from tests.fakes.slack_fake import APP_TOKEN, BOT_TOKEN, FakeSlack, mention_pair, message_event

CH = "C0E2E"
ROOT = "200.000001"
N_EXAMPLES = 1000
VOCAB = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "candle",
         "forest", "rocket", "garden", "silver", "window", "marble", "ocean", "pepper"]
TRAIN_CFG = {
    "tiny_random_model": True, "max_seq_len": 64, "batch_size": 8, "learning_rate": 5e-3,
    "max_steps": 60, "eval_steps": 5, "early_stopping_patience": 50, "max_new_tokens": 8,
    "save_merged": False,
}


class ReverseClaude:
    """A learnable task: 'reverse: a b c' -> 'c b a'. Judges by checking the answer."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.rng = random.Random(11)
        self.seen: set[str] = set()
        self.judge_calls = 0

    def __call__(self, req: dict[str, Any]) -> str:
        system = system_text(req)
        if system.startswith("[tuner:define]"):
            if not any(m["role"] == "assistant" for m in req["messages"]):
                return json.dumps({"ready": False, "question": "What goes in and what comes out?",
                                   "spec": None})
            return json.dumps({"ready": True, "question": None, "spec": {
                "name": "word-reverser", "description": "Reverse a list of words",
                "inputs": "reverse: <words>", "output_requirements": "the words reversed",
                "style": "bare", "system_prompt": "You reverse lists of words.",
                "example_count": N_EXAMPLES, "base_model": "unsloth/Llama-3.2-1B-Instruct",
                "max_output_tokens": 64,
                "budget_usd": None}})
        if system.startswith(("[tuner:samples]", "[tuner:generate]")):
            m = re.search(r"Write exactly (\d+) examples", last_user_text(req))
            return json.dumps({"examples": [self._example() for _ in range(int(m[1]) if m else 8)]})
        if system.startswith("[tuner:judge]"):
            return self._judge(req)
        raise AssertionError(f"unexpected system prompt {system[:30]!r}")

    def _example(self) -> dict[str, str]:
        with self.lock:
            while True:
                words = [self.rng.choice(VOCAB) for _ in range(self.rng.randint(4, 6))]
                if " ".join(words) not in self.seen:
                    self.seen.add(" ".join(words))
                    break
        return {"prompt": "reverse: " + " ".join(words), "response": " ".join(reversed(words))}

    def _judge(self, req: dict[str, Any]) -> str:
        with self.lock:
            self.judge_calls += 1
        text = last_user_text(req)
        prompt = re.search(r"reverse: ([a-z ]+)", text)
        answers = re.findall(r"<response_([AB])>\s*(.*?)\s*</response_\1>", text, re.S)
        want = " ".join(reversed(prompt[1].split())) if prompt else ""
        good = [k for k, v in answers if v.strip() == want]
        winner = good[0] if len(good) == 1 else "tie"
        return json.dumps({"winner": winner, "reason": "exact reversal" if good else "neither"})


def _settings(tmp_path: Path, slack: FakeSlack, claude: FakeAnthropic, rp: FakeRunPod) -> Settings:
    return Settings(  # type: ignore[call-arg]
        _env_file=None, slack_bot_token=BOT_TOKEN, slack_app_token=APP_TOKEN,
        tuner_slack_api_url=slack.base_url, anthropic_api_key=API_KEY,
        anthropic_base_url=claude.base_url, runpod_api_key=rp.api_key,
        runpod_api_base_url=rp.base_url, tuner_pod_url_template=rp.pod_url_template,
        database_url=f"sqlite:///{tmp_path}/tuner.db", tuner_gpu_types="NVIDIA RTX A5000",
        tuner_cloud_types="SECURE", tuner_poll_interval_s=0.2, tuner_pod_ready_timeout_s=60,
        tuner_train_overrides=json.dumps(TRAIN_CFG), tuner_allowed_users="U1",
        hf_token="hf_e2e_secret", tuner_hf_namespace="acme",
    )


class Bot:
    """One bot process: real wiring + Socket Mode against the fake Slack."""

    def __init__(self, settings: Settings, artifacts: Path) -> None:
        self.wired: Wired = build(settings, artifacts_dir=artifacts)
        self.handler = SocketModeHandler(self.wired.app, APP_TOKEN)
        self.handler.connect()
        self.recovered = self.wired.start_background()

    def stop(self) -> None:
        self.handler.close()
        self.wired.close()


@pytest.fixture()
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    claude = ReverseClaude()
    with FakeSlack() as slack, FakeAnthropic.running(claude) as anth, \
            FakeRunPod.running(workroot=tmp_path / "pods") as rp, FakeServerless.running() as sl:
        rp.add_graphql_handler(sl.graphql)
        monkeypatch.setenv("RUNPOD_API_BASE_URL", rp.base_url)
        monkeypatch.setenv("RUNPOD_ENDPOINT_BASE_URL", sl.endpoint_base_url)
        yield {"slack": slack, "claude": claude, "anth": anth, "rp": rp, "sl": sl,
               "settings": _settings(tmp_path, slack, anth, rp), "artifacts": tmp_path / "art"}


def _thread(slack: FakeSlack) -> list[dict[str, Any]]:
    return [m for m in slack.messages if m.get("thread_ts") == ROOT]


def _button(slack: FakeSlack, action_id: str, after: int = 0) -> tuple[dict[str, Any], str]:
    def find() -> Any:
        for m in reversed(slack.messages[after:]):
            for b in m.get("blocks") or []:
                for e in b.get("elements", []) if b.get("type") == "actions" else []:
                    if e.get("action_id") == action_id:
                        return m, e["value"]
        return None

    return slack.wait_for(find, 60)


def _click(slack: FakeSlack, action_id: str, *, user: str = "U1", after: int = 0) -> None:
    from tests.fakes.slack_fake import block_action

    msg, value = _button(slack, action_id, after)
    slack.wait_ack(slack.push("interactive", block_action(action_id, value, user=user,
                                                           channel=CH, message=msg)))


def _text_in_thread(slack: FakeSlack, needle: str, timeout: float = 60) -> dict[str, Any]:
    return slack.wait_for(
        lambda: next((m for m in _thread(slack) if needle in (m.get("text") or "")), None), timeout)


def test_mention_to_trained_judged_model_with_restart(world: dict[str, Any]) -> None:
    slack: FakeSlack = world["slack"]
    rp: FakeRunPod = world["rp"]
    settings: Settings = world["settings"]
    bot = Bot(settings, world["artifacts"])
    try:
        slack.wait_socket()
        # 1. mention (delivered twice, as Slack does) -> one clarifying question
        for env in mention_pair("U1", CH, ROOT, "make me a word reverser"):
            slack.wait_ack(slack.push("events_api", env))
        _text_in_thread(slack, "What goes in and what comes out?")
        slack.push("events_api", message_event("U1", CH, "200.000002",
                                               "a list of words in, reversed out", thread_ts=ROOT))
        # 2. spec card -> Looks good -> sample cards -> Approve
        _click(slack, B.SPEC_APPROVE)
        _click(slack, B.SAMPLES_APPROVE)
        # 3. 1000 examples generated, deduped, split; the train JSONL is uploaded
        jsonl = slack.wait_for(lambda: next(
            (f for f in slack.files.values() if f.get("name", "").endswith(".jsonl")
             and f.get("thread_ts") == ROOT and "content" in f), None), 120)
        lines = [json.loads(x) for x in jsonl["content"].decode().splitlines()]
        assert 750 <= len(lines) <= 850  # 80% of 1000 go to train
        assert [m["role"] for m in lines[0]["messages"]] == ["system", "user", "assistant"]
        with bot.wired.db.session() as s:
            assert len(s.exec(select(Example)).all()) == N_EXAMPLES
        # 4. launch card -> an unauthorised click is refused, U1's launches
        _click(slack, B.LAUNCH, user="U_INTRUDER")
        slack.wait_for(lambda: any("not authorised" in e["text"] for e in slack.ephemerals), 30)
        assert rp.create_attempts == []
        _click(slack, B.LAUNCH, after=0)
        # 5. the progress message is edited in place while training runs on the "pod"
        slack.wait_for(lambda: len(slack.calls_to("chat.update")) >= 2, 120)
        (pod_id,) = slack.wait_for(lambda: rp.live_pods(), 60)

        # 6. the bot process stops mid-training; a new one re-attaches to the same pod
        bot.stop()
        assert rp.live_pods() == [pod_id]  # detached, not leaked: the run still owns it
        bot = Bot(settings, world["artifacts"])
        assert bot.recovered == [f"{_team(bot)}:{CH}:{ROOT}"]

        # 7. finished: judge results posted, deploy card shown, pod terminated and billed once
        verdict = _text_in_thread(slack, "Judge results", 240)
        assert "win rate" in verdict["text"] and "95% CI" in verdict["text"]
        _button(slack, B.DEPLOY)
        assert rp.live_pods() == []
        assert len(rp.create_attempts) == 1 and len(rp.pods) == 1
        with bot.wired.db.session() as s:
            run = s.exec(select(Run)).one()
            evals = [p.loss for p in s.exec(select(MetricPoint).where(
                MetricPoint.run_id == run.id, MetricPoint.kind == "eval")
                .order_by(col(MetricPoint.step))).all()]
            billed = s.exec(select(SpendEntry).where(SpendEntry.kind == "pod_seconds")).all()
            project = s.exec(select(Project)).one()
        assert run.status == "succeeded" and run.pod_id == pod_id
        assert len(evals) >= 5 and min(evals) < evals[0]  # eval loss fell on learnable data
        assert run.best_eval_loss == pytest.approx(min(evals), rel=1e-3)
        assert len(billed) == 1 and billed[0].quantity >= rp.billed_seconds(pod_id) - 1.0
        assert project.champion_run_id == run.id
        assert (Path(run.config["adapter_dir"]) / "adapter.tar.gz").stat().st_size > 0
        # loss chart PNG uploaded to the thread; final progress has no Stop button
        pngs = [f for f in slack.files.values() if f.get("name", "").endswith(".png")]
        assert pngs and pngs[-1]["content"][:8] == b"\x89PNG\r\n\x1a\n"
        assert world["claude"].judge_calls >= 2

        # no Hub push (this run switches the merge off) was said when training ended, with the fix
        pushed = _text_in_thread(slack, "not pushed to the Hugging Face Hub", 30)
        assert "save_merged" in pushed["text"]
        # 8. Deploy: without a pushed model the thread gets a clear reason, nothing billing
        _click(slack, B.DEPLOY)
        err = _text_in_thread(slack, "not on the Hugging Face Hub", 60)
        assert err["text"].startswith(":warning:") and "did not push a model" in err["text"]
        assert "save_merged" in err["text"] and "set HF_TOKEN" not in err["text"]
        assert world["sl"].live_endpoints == []
        everything = json.dumps(slack.messages) + json.dumps(slack.ephemerals)
        for secret in ("hf_e2e_secret", API_KEY, BOT_TOKEN, rp.api_key, run.pod_token or "x" * 40):
            assert secret not in everything
    finally:
        bot.stop()


def _team(bot: Bot) -> str:
    with bot.wired.db.session() as s:
        return s.exec(select(Project)).one().team_id
