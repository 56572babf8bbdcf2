"""The agent graph driven through AgentRunner, with the real ClaudeClient talking to the
loopback FakeAnthropic (real anthropic SDK on the wire) and the real JudgeService."""

from __future__ import annotations

import json
import random
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from sqlmodel import func, select

from agent.context import AgentContext
from agent.ports import RecordingNotifier
from agent.runner import AgentRunner
from jobs.claude import ClaudeClient
from jobs.deploy import DeployService
from jobs.judge import JudgeService
from jobs.serverless import ServerlessClient
from jobs.template_cleanup import TemplateCleaner
from jobs.values import BudgetExceededError, LaunchEstimate, RunOutcome, RunSnapshot
from storage.db import Database
from storage.models import Dataset, Deployment, Example, Project, Run, TaskSpecRow
from storage.settings import Settings
from tests.fakes.anthropic_fake import (
    API_KEY,
    FakeAnthropic,
    last_user_text,
    system_text,
)
from tests.fakes.runpod_serverless_fake import FakeServerless

TID = "T1:C1:100.1"
_SYL = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "ze", "po", "qu", "fa", "de", "bo", "xi"]


class ScriptedClaude:
    """Responder for FakeAnthropic: routes on the system prompt marker."""

    def __init__(self, *, questions: int = 2, example_count: int = 1000) -> None:
        self.questions = questions
        self.example_count = example_count
        self.define_malformed = False
        self.base_models: list[str] = []  # base_model of each spec written, in turn
        self.generate_latency = 0.0
        self.generate_calls = 0
        self.lock = threading.Lock()
        self.counter = 0
        self.on_generate: Callable[[], None] | None = None

    def __call__(self, req: dict[str, Any]) -> str:
        system = system_text(req)
        if system.startswith("[tuner:define]"):
            return self._define(req)
        if system.startswith("[tuner:samples]") or system.startswith("[tuner:generate]"):
            if system.startswith("[tuner:generate]"):
                with self.lock:
                    self.generate_calls += 1
                if self.on_generate:
                    self.on_generate()
            m = re.search(r"Write exactly (\d+) examples", last_user_text(req))
            n = int(m.group(1)) if m else 8
            return json.dumps({"examples": [self._example() for _ in range(n)]})
        if system.startswith("[tuner:judge]"):
            return json.dumps({"winner": "tie", "reason": "about the same"})
        raise AssertionError(f"unexpected system prompt: {system[:40]!r}")

    def _define(self, req: dict[str, Any]) -> str:
        if self.define_malformed:
            return "Sure! Here is the spec: {not json"
        asked = sum(1 for m in req["messages"] if m["role"] == "assistant")
        if asked < self.questions:
            return json.dumps({"ready": False, "question": f"Question {asked + 1}?", "spec": None})
        spec = {
            "name": "ticket-triage",
            "description": "Classify support tickets",
            "inputs": "A support ticket",
            "output_requirements": "One label",
            "style": "terse",
            "system_prompt": "You triage support tickets.",
            "example_count": self.example_count,
            "base_model": self.base_models.pop(0) if self.base_models
            else "unsloth/Llama-3.2-1B-Instruct",
            "max_output_tokens": 256,
            "budget_usd": None,
        }
        return json.dumps({"ready": True, "question": None, "spec": spec})

    def _example(self) -> dict[str, str]:
        with self.lock:
            self.counter += 1
            rng = random.Random(self.counter)

        def words(k: int) -> str:
            return " ".join("".join(rng.choice(_SYL) for _ in range(3)) for _ in range(k))

        return {"prompt": f"Ticket {self.counter}: {words(14)}", "response": words(8)}


@dataclass
class ScriptedTrainer:
    """Stands in for jobs.training.TrainingService (its own tests cover the pod side).

    It reads the real Dataset/Example rows the graph stored and writes real Run rows.
    """

    db: Database
    budget_refusals: int = 0
    failures: int = 0
    notes: list[str] = field(default_factory=list)  # said in the thread when training ends
    launched: list[tuple[int, int, str]] = field(default_factory=list)
    ran: list[int] = field(default_factory=list)

    def estimate(self, project_id: int, dataset_id: int) -> LaunchEstimate:
        with self.db.session() as s:
            n = s.get(Dataset, dataset_id).n_train
        return LaunchEstimate("NVIDIA RTX A5000", "SECURE", 0.36, 10 + n / 100, 0.06 + n / 10000,
                              0.0, 50.0, True)

    def launch(self, project_id: int, dataset_id: int, *, user_id: str) -> int:
        if self.budget_refusals:
            self.budget_refusals -= 1
            raise BudgetExceededError("estimated $60.00 would exceed the $50.00 budget")
        with self.db.session() as s:
            run = Run(project_id=project_id, dataset_id=dataset_id)
            s.add(run)
            s.commit()
            s.refresh(run)
        self.launched.append((project_id, dataset_id, user_id))
        return run.id

    def run(self, run_id: int, on_progress: Callable[[RunSnapshot], None]) -> RunOutcome:
        self.ran.append(run_id)
        if self.failures:
            self.failures -= 1
            return RunOutcome(run_id, "failed", error="pod vanished (RunPod reclaimed it)")
        snap = RunSnapshot(run_id=run_id, state="running", max_steps=60)
        for step in range(10, 70, 10):
            snap.step, snap.epoch = step, step / 30
            snap.train_loss.append((step, 2.0 - step / 50))
            snap.eval_loss.append((step, 2.1 - step / 60))
            snap.best_step, snap.best_eval_loss = step, snap.eval_loss[-1][1]
            snap.eta_s, snap.cost_usd = (60 - step) * 2.0, step * 0.001
            on_progress(snap)
        with self.db.session() as s:
            run = s.get(Run, run_id)
            run.status, run.artifact_uri = "succeeded", "hf://acme/tuner-ticket-triage"
            s.add(run)
            s.commit()
            tests = s.exec(select(Example).where(
                Example.dataset_id == run.dataset_id, Example.split == "test"
            )).all()
        gens = {str(e.id): e.response for e in tests}
        return RunOutcome(run_id, "succeeded", best_eval_loss=snap.best_eval_loss, best_step=60,
                          generations=gens, cost_usd=0.07, notes=list(self.notes))

    def request_stop(self, run_id: int) -> bool:
        return True


@dataclass
class Env:
    runner: AgentRunner
    notifier: RecordingNotifier
    claude: ScriptedClaude
    fake: FakeAnthropic
    db: Database
    settings: Settings
    trainer: ScriptedTrainer

    def asks(self) -> list[tuple[str, dict[str, Any]]]:
        return self.notifier.texts("ask")

    def only_pending(self, kind: str) -> str:
        pending = self.runner.pending(TID)
        assert [p["kind"] for _, p in pending] == [kind], pending
        assert self.asks()[-1] == pending[0]
        return pending[0][0]


def make_settings(tmp_path: Path, fake: FakeAnthropic) -> Settings:
    return Settings(
        _env_file=None, anthropic_api_key=API_KEY, anthropic_base_url=fake.base_url,
        database_url=f"sqlite:///{tmp_path / 'tuner.db'}", tuner_allowed_users="UADMIN",
        tuner_generation_concurrency=8,
    )


def make_runner(settings: Settings, notifier: RecordingNotifier, trainer: Any = None,
                judge: bool = True) -> AgentRunner:
    db = Database(settings.database_url)
    llm = ClaudeClient(settings, db, max_retries=0)
    ctx = AgentContext(db=db, settings=settings, llm=llm, notifier=notifier, trainer=trainer,
                       judge=JudgeService(db, llm, settings) if judge else None,
                       progress_interval_s=0.05)
    return AgentRunner(ctx)


@pytest.fixture()
def env(tmp_path: Path) -> Iterator[Env]:
    claude = ScriptedClaude()
    with FakeAnthropic.running(claude) as fake:
        settings = make_settings(tmp_path, fake)
        notifier = RecordingNotifier()
        db = Database(settings.database_url)
        trainer = ScriptedTrainer(db)
        runner = make_runner(settings, notifier, trainer)
        yield Env(runner, notifier, claude, fake, db, settings, trainer)
        runner.close()


def _requests(fake: FakeAnthropic, marker: str) -> list[dict[str, Any]]:
    return [r for r in fake.message_requests if system_text(r).startswith(marker)]


def test_define_samples_feedback_generate_to_launch_card(env: Env) -> None:
    env.runner.start(team="T1", channel="C1", thread_ts="100.1", user="U1",
                     text="<@UBOT> triage our support tickets into labels")
    env.only_pending("question")
    assert env.asks()[-1][1]["text"] == "Question 1?"
    assert env.runner.reply(TID, "U1", "Labels are billing, bug, other")
    env.only_pending("question")
    assert env.asks()[-1][1]["text"] == "Question 2?"
    assert env.runner.reply(TID, "U1", "Short tickets, English only")
    spec_iid = env.only_pending("spec")
    assert env.asks()[-1][1]["spec"]["name"] == "ticket-triage"
    define_reqs = _requests(env.fake, "[tuner:define]")
    assert len(define_reqs) == 3
    assert [m["content"] for m in define_reqs[-1]["messages"] if m["role"] == "user"] == [
        "triage our support tickets into labels", "Labels are billing, bug, other",
        "Short tickets, English only"]
    with env.db.session() as s:
        project = s.exec(select(Project)).one()
        assert (project.thread_id, project.name) == (TID, "ticket-triage")
        assert s.exec(select(TaskSpecRow)).one().spec["name"] == "ticket-triage"

    # Stale id: nothing happens. Double click: two concurrent resumes, exactly one wins.
    assert env.runner.resume(TID, "not-an-interrupt", {"action": "approve"}) is False
    results: list[bool] = []
    barrier = threading.Barrier(2)

    def click() -> None:
        barrier.wait()
        results.append(env.runner.resume(TID, spec_iid, {"action": "approve", "user": "U1"}))

    threads = [threading.Thread(target=click) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False, True]
    samples_iid = env.only_pending("samples")
    assert len(_requests(env.fake, "[tuner:samples]")) == 1
    card = env.asks()[-1][1]
    assert card["round"] == 1 and len(card["examples"]) == 8
    with env.db.session() as s:
        assert s.exec(select(TaskSpecRow)).one().approved

    feedback = "Always include the customer's product name in the prompt"
    assert env.runner.resume(TID, samples_iid, {"action": "regenerate", "text": feedback,
                                                "user": "U1"})
    assert env.runner.resume(TID, samples_iid, {"action": "approve"}) is False  # stale now
    samples_reqs = _requests(env.fake, "[tuner:samples]")
    assert len(samples_reqs) == 2
    assert feedback not in json.dumps(samples_reqs[0])
    assert feedback in json.dumps(samples_reqs[1])
    round2 = env.only_pending("samples")
    assert env.asks()[-1][1]["round"] == 2

    assert env.runner.resume(TID, round2, {"action": "approve", "user": "U1"})
    env.only_pending("launch")
    assert feedback in json.dumps(_requests(env.fake, "[tuner:generate]")[0])

    edits = [text for key, text, _ in env.notifier.texts("progress") if key == "generation"]
    assert edits[0] == "Generating… 0/1000" and edits[-1] == "Generating… 1000/1000"
    assert len(edits) >= 2
    uploads = env.notifier.texts("upload")
    assert [u[0] for u in uploads] == ["ticket-triage-train.jsonl"]
    lines = uploads[0][1].decode().splitlines()
    assert 780 <= len(lines) <= 820
    roles = [m["role"] for m in json.loads(lines[0])["messages"]]
    assert roles == ["system", "user", "assistant"]
    with env.db.session() as s:
        ds = s.exec(select(Dataset)).one()
        assert (ds.source, ds.n_train + ds.n_val + ds.n_test) == ("synthetic", 1000)
        assert ds.n_train == len(lines)
        assert s.exec(select(Project)).one().status == "ready"
    card = env.asks()[-1][1]
    assert card["dataset"] == {"n_train": ds.n_train, "n_val": ds.n_val, "n_test": ds.n_test}
    assert card["estimate"]["gpu_type"] == "NVIDIA RTX A5000"
    assert any("Dataset ready: 1000 examples in" in t for t in env.notifier.texts("say"))


def test_edited_sample_is_reasked_and_becomes_a_gold_training_example(env: Env) -> None:
    env.claude.example_count = 40
    env.runner.start(team="T1", channel="C1", thread_ts="100.1", user="U1", text="triage")
    assert env.runner.reply(TID, "U1", "Labels are billing, bug, other")
    assert env.runner.reply(TID, "U1", "Short tickets")
    assert env.runner.resume(TID, env.only_pending("spec"), {"action": "approve", "user": "U1"})
    iid = env.only_pending("samples")
    before = env.asks()[-1][1]["examples"]
    gold = {"prompt": "Ticket 999: I was charged twice for the Pro plan this month",
            "response": "billing"}

    # An edit of a sample that does not exist: error, card asked again, nothing changed.
    assert env.runner.resume(TID, iid, {"action": "edit", "index": 8, **gold, "user": "U1"})
    assert env.notifier.texts("error")[-1] == "Couldn't apply the edit: there is no example 9."
    iid = env.only_pending("samples")
    assert env.asks()[-1][1]["examples"] == before

    assert env.runner.resume(TID, iid, {"action": "edit", "index": 3, **gold, "user": "U1"})
    assert env.runner.resume(TID, iid, {"action": "approve", "user": "U1"}) is False  # stale
    new_iid = env.only_pending("samples")
    assert new_iid != iid
    card = env.asks()[-1][1]
    assert card["examples"] == [*before[:3], gold, *before[4:]]
    assert card["edited"] == [3] and card["round"] == 1
    assert len(_requests(env.fake, "[tuner:samples]")) == 1  # re-asked, not regenerated

    # Regenerating keeps the gold example as a few-shot in the next samples request.
    assert env.runner.resume(TID, new_iid, {"action": "regenerate", "text": "more bugs",
                                            "user": "U1"})
    samples_reqs = _requests(env.fake, "[tuner:samples]")
    assert gold["prompt"] not in json.dumps(samples_reqs[0])
    assert gold["prompt"] in last_user_text(samples_reqs[1])
    assert "more bugs" in last_user_text(samples_reqs[1])
    round2 = env.only_pending("samples")
    assert env.asks()[-1][1]["edited"] == [] and env.asks()[-1][1]["round"] == 2

    assert env.runner.resume(TID, round2, {"action": "approve", "user": "U1"})
    env.only_pending("launch")
    gen_reqs = _requests(env.fake, "[tuner:generate]")
    assert gen_reqs and all(gold["prompt"] in last_user_text(r) and "billing" in last_user_text(r)
                            for r in gen_reqs)
    with env.db.session() as s:
        ds = s.exec(select(Dataset)).one()
        rows = s.exec(select(Example).where(Example.prompt == gold["prompt"])).all()
        assert [(r.response, r.split, r.dataset_id) for r in rows] == [("billing", "train", ds.id)]
        assert ds.n_train + ds.n_val + ds.n_test == 40  # the gold example counts toward N
    train_jsonl = env.notifier.texts("upload")[-1][1].decode()
    assert gold["prompt"] in train_jsonl


JSONL = "\n".join(
    json.dumps({"prompt": f"ticket {i}: " + " ".join(f"tok{i}x{j}" for j in range(12)),
                "response": f"label {i % 3} because {i}"})
    for i in range(40)
)


def test_import_then_launch_train_judge_and_skip(env: Env) -> None:
    env.trainer.budget_refusals = 1
    env.trainer.failures = 1
    env.runner.start(team="T1", channel="C1", thread_ts="100.1", user="U1", text="triage")
    question_iid = env.only_pending("question")
    asked = len(env.asks())
    # A broken file: clear error, and the same question is still answerable (not re-asked).
    assert env.runner.import_file(TID, "U1", "bad.jsonl", b'{"prompt": "x"}\nnot json\n')
    errors = env.notifier.texts("error")
    assert len(errors) == 1 and errors[0].startswith("Couldn't import bad.jsonl:")
    assert env.only_pending("question") == question_iid and len(env.asks()) == asked

    assert env.runner.import_file(TID, "U1", "tickets.jsonl", JSONL.encode())
    launch_iid = env.only_pending("launch")
    with env.db.session() as s:
        ds = s.exec(select(Dataset)).one()
        assert (ds.source, ds.n_train + ds.n_val + ds.n_test) == ("import", 40)
    assert env.notifier.texts("upload")[-1][0] == "dataset-train.jsonl"

    # Not on the allow-list: refused, card asked again.
    assert env.runner.resume(TID, launch_iid, {"action": "launch", "user": "UNOBODY"})
    assert "<@UNOBODY> is not allowed to launch" in env.notifier.texts("error")[-1]
    launch_iid = env.only_pending("launch")
    # Budget refusal: error and re-ask.
    assert env.runner.resume(TID, launch_iid, {"action": "launch", "user": "UADMIN"})
    assert "budget" in env.notifier.texts("error")[-1]
    launch_iid = env.only_pending("launch")
    # The run fails: reason shown, launch card again.
    assert env.runner.resume(TID, launch_iid, {"action": "launch", "user": "UADMIN"})
    assert "pod vanished" in env.notifier.texts("error")[-1]
    launch_iid = env.only_pending("launch")
    # Second run succeeds -> progress edits with a stop button -> judge -> deploy offer.
    assert env.runner.resume(TID, launch_iid, {"action": "launch", "user": "UADMIN"})
    deploy_iid = env.only_pending("deploy")
    assert len(env.trainer.launched) == 2 and env.trainer.ran == [1, 2]
    run_edits = [(t, a) for k, t, a in env.notifier.texts("progress") if k == "run:2"]
    assert len(run_edits) == 7
    assert all(a and a[0].action_id == "stop_run" and a[0].value == "2" for _, a in run_edits[:-1])
    assert "step 60/60" in run_edits[-2][0] and "ETA" in run_edits[-2][0]
    assert run_edits[-1][1] == [] and "succeeded" in run_edits[-1][0]
    charts = [u for u in env.notifier.texts("upload") if u[0] == "run-2-loss.png"]
    assert charts and all(c[1].startswith(b"\x89PNG") for c in charts)
    judge_reqs = _requests(env.fake, "[tuner:judge]")
    with env.db.session() as s:
        n_test = s.exec(select(func.count()).where(Example.split == "test")).one()
    assert len(judge_reqs) == 2 * n_test  # both orders per held-out example
    report = [t for t in env.notifier.texts("say") if t.startswith("*Judge results*")]
    assert len(report) == 1 and "win rate 0%" in report[0] and "Example 1" in report[0]
    card = env.asks()[-1][1]
    assert card["run_id"] == 2 and card["win_rate"] == 0.0 and card["ci_high"] > 0

    assert env.runner.resume(TID, deploy_iid, {"action": "skip", "user": "UADMIN"})
    assert env.runner.pending(TID) == []
    assert env.runner.reply(TID, "U1", "hello?") is False


def test_unknown_base_model_is_refused_at_the_spec_step_with_the_supported_list(env: Env) -> None:
    from jobs.catalog import supported_ids

    env.claude.questions = 0
    env.claude.base_models = ["meta-llama/Llama-2-70b-chat-hf", "unsloth/qwen2.5-3b-instruct"]
    env.runner.start(team="T1", channel="C1", thread_ts="100.1", user="U1",
                     text="triage tickets with Llama 2 70B")
    env.only_pending("question")  # no spec card: it could be approved with an unknown model
    refusal = env.asks()[-1][1]["text"]
    assert "`meta-llama/Llama-2-70b-chat-hf`" in refusal and "isn't one of the base models" in refusal
    assert all(m in refusal for m in supported_ids())
    with env.db.session() as s:
        assert s.exec(select(TaskSpecRow)).all() == []
    define_reqs = _requests(env.fake, "[tuner:define]")
    assert all(m in system_text(define_reqs[0]) for m in supported_ids())  # Claude is told too
    # the user picks one; the spec card shows it in the catalog's spelling
    assert env.runner.reply(TID, "U1", "use qwen 2.5 3b then")
    env.only_pending("spec")
    assert env.asks()[-1][1]["spec"]["base_model"] == "unsloth/Qwen2.5-3B-Instruct"
    assert _requests(env.fake, "[tuner:define]")[-1]["messages"][-2]["content"] == refusal


def test_training_end_notes_are_said_in_the_thread(env: Env) -> None:
    env.trainer.notes = ["Pushing the model to the Hugging Face Hub failed (403). Fix the token."]
    env.runner.start(team="T1", channel="C1", thread_ts="100.1", user="U1", text="triage")
    assert env.runner.import_file(TID, "U1", "tickets.jsonl", JSONL.encode())
    assert env.runner.resume(TID, env.only_pending("launch"), {"action": "launch", "user": "UADMIN"})
    env.only_pending("deploy")
    says = env.notifier.texts("say")
    note = says.index(env.trainer.notes[0])
    assert note < next(i for i, t in enumerate(says) if t.startswith("*Judge results*"))


def test_malformed_llm_output_reports_and_stays_resumable(env: Env) -> None:
    env.claude.define_malformed = True
    env.runner.start(team="T1", channel="C1", thread_ts="100.1", user="U1", text="triage")
    errors = env.notifier.texts("error")
    assert len(errors) == 1
    assert errors[0].startswith("Understanding the task failed: Claude did not return a valid "
                                "DefineTurn")
    assert len(_requests(env.fake, "[tuner:define]")) == 3  # the client's retries
    env.only_pending("retry")
    assert env.asks()[-1][1]["text"].endswith("Reply in this thread to try again.")
    env.claude.define_malformed = False
    assert env.runner.reply(TID, "U1", "labels: billing, bug, other")
    env.only_pending("question")
    last = _requests(env.fake, "[tuner:define]")[-1]
    assert last["messages"][-1] == {"role": "user", "content": "labels: billing, bug, other"}


def test_mention_in_existing_thread_is_a_reply(env: Env) -> None:
    env.runner.start(team="T1", channel="C1", thread_ts="100.1", user="U1", text="triage")
    env.runner.start(team="T1", channel="C1", thread_ts="100.1", user="U1", text="<@UBOT> answer")
    with env.db.session() as s:
        assert len(s.exec(select(Project)).all()) == 1
    env.only_pending("question")
    assert env.asks()[-1][1]["text"] == "Question 2?"


def test_mention_after_skip_starts_over_in_the_same_thread(env: Env) -> None:
    """'Not deployed. Mention me again to start over.' must be true: a mention in the
    finished thread starts a fresh definition (no leftovers from the old round)."""
    env.runner.start(team="T1", channel="C1", thread_ts="100.1", user="U1", text="triage")
    env.runner.import_file(TID, "U1", "tickets.jsonl", JSONL.encode())
    launch_iid = env.only_pending("launch")
    assert env.runner.resume(TID, launch_iid, {"action": "launch", "user": "UADMIN"})
    deploy_iid = env.only_pending("deploy")
    assert env.runner.resume(TID, deploy_iid, {"action": "skip", "user": "UADMIN"})
    assert "Mention me again to start over" in env.notifier.texts("say")[-1]
    assert env.runner.pending(TID) == []

    env.runner.start(team="T1", channel="C1", thread_ts="100.1", user="U1",
                     text="<@UBOT> now summarise tickets instead")
    assert not any("busy" in t for t in env.notifier.texts("say"))
    env.only_pending("question")
    last = _requests(env.fake, "[tuner:define]")[-1]
    assert last["messages"] == [{"role": "user", "content": "now summarise tickets instead"}]
    values = env.runner.graph.get_state({"configurable": {"thread_id": TID}}).values
    assert values.get("run_id") is None and values.get("dataset_id") is None
    assert not values.get("gold_examples") and not values.get("spec")
    with env.db.session() as s:
        assert len(s.exec(select(Project)).all()) == 1


def _use_serverless(env: Env, rp: FakeServerless, monkeypatch: pytest.MonkeyPatch) -> TemplateCleaner:
    """Point the runner's deployer (real DeployService + SDK, Claude's token counter) at the
    serverless fake. The returned template cleaner must be closed before the fake stops."""
    monkeypatch.setenv("RUNPOD_API_BASE_URL", rp.base_url)
    monkeypatch.setenv("RUNPOD_ENDPOINT_BASE_URL", rp.endpoint_base_url)
    settings = env.settings.model_copy(update={
        "runpod_api_key": SecretStr("rp-key"), "runpod_api_base_url": rp.base_url,
        "runpod_endpoint_base_url": rp.endpoint_base_url, "tuner_hf_namespace": "acme"})
    client = ServerlessClient(settings)
    cleaner = TemplateCleaner(env.db, client, window_s=30, first_delay_s=0.02, max_delay_s=0.2)
    env.runner.ctx.deployer = DeployService(env.db, settings, client, poll_s=0.0,
                                            token_counter=env.runner.ctx.llm, templates=cleaner)
    return cleaner


def _wait_for(cond: Callable[[], Any], timeout: float = 30.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_deploy_and_undeploy_through_serverless_fake(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    with FakeServerless.running(api_key="rp-key") as rp:
        cleaner = _use_serverless(env, rp, monkeypatch)
        env.runner.start(team="T1", channel="C1", thread_ts="100.1", user="U1", text="triage")
        assert env.runner.import_file(TID, "U1", "tickets.jsonl", JSONL.encode())
        iid = env.only_pending("launch")
        assert env.runner.resume(TID, iid, {"action": "launch", "user": "UADMIN"})
        iid = env.only_pending("deploy")
        assert env.runner.resume(TID, iid, {"action": "deploy", "user": "UNOBODY"})
        assert "<@UNOBODY> is not allowed to deploy" in env.notifier.texts("error")[-1]
        iid = env.only_pending("deploy")
        assert env.runner.resume(TID, iid, {"action": "deploy", "user": "UADMIN"})
        iid = env.only_pending("deployed")
        with env.db.session() as s:
            dep = s.exec(select(Deployment)).one()
            assert s.exec(select(Project)).one().status == "deployed"
        card = env.asks()[-1][1]
        assert card["deployment_id"] == dep.id and card["endpoint_id"] == dep.endpoint_id
        assert card["curl"].startswith("curl") and "rp-key" not in card["curl"]
        assert rp.live_endpoints == [dep.endpoint_id]
        post = env.notifier.texts("say")[-1]
        assert f"endpoint `{dep.endpoint_id}`" in post and "curl" in post
        assert "Cost per 1k requests: $" in post and "rp-key" not in post
        # the big model's side is measured with the default (no-prefill) Claude model, not "–"
        assert re.search(r"Cost per 1k requests: \$[\d.]+ vs \$[\d.]+ on the big model", post), post
        assert env.fake.count_requests and all(
            r["model"] == env.settings.tuner_claude_model and r["messages"][-1]["role"] == "user"
            for r in env.fake.count_requests)
        # RunPod refuses the template right after the endpoint goes: Undeploy still succeeds
        rp.template_in_use_s = 2.0
        assert env.runner.resume(TID, iid, {"action": "undeploy", "user": "UADMIN"})
        assert rp.live_endpoints == [] and env.runner.pending(TID) == []
        assert "Endpoint removed" in env.notifier.texts("say")[-1]
        assert not any("Undeploying failed" in t for t in env.notifier.texts("error"))
        with env.db.session() as s:
            assert s.exec(select(Deployment)).one().status == "removed"
        _wait_for(lambda: rp.live_templates == [])
        cleaner.close()


def test_deploy_step_rerun_reuses_the_healthy_endpoint(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The deploy succeeded but posting about it failed (or the bot died): clicking
    Deploy again must not start a second billing endpoint."""
    with FakeServerless.running(api_key="rp-key") as rp:
        cleaner = _use_serverless(env, rp, monkeypatch)
        env.runner.start(team="T1", channel="C1", thread_ts="100.1", user="U1", text="triage")
        assert env.runner.import_file(TID, "U1", "tickets.jsonl", JSONL.encode())
        assert env.runner.resume(TID, env.only_pending("launch"), {"action": "launch", "user": "UADMIN"})
        real_say = env.notifier.say
        failed: list[str] = []

        def flaky_say(thread_id: str, text: str) -> None:
            if text.startswith("Deployed:") and not failed:
                failed.append(text)
                raise ConnectionError("slack unreachable")
            real_say(thread_id, text)

        monkeypatch.setattr(env.notifier, "say", flaky_say)
        assert env.runner.resume(TID, env.only_pending("deploy"), {"action": "deploy", "user": "UADMIN"})
        assert failed and "Deploying failed" in env.notifier.texts("error")[-1]
        first = list(rp.live_endpoints)
        assert env.runner.resume(TID, env.only_pending("deploy"), {"action": "deploy", "user": "UADMIN"})
        env.only_pending("deployed")
        assert rp.live_endpoints == first and len(first) == 1
        with env.db.session() as s:
            assert len(s.exec(select(Deployment)).all()) == 1
        cleaner.close()


def test_reimporting_an_overlapping_file_keeps_the_whole_dataset(env: Env) -> None:
    env.runner.start(team="T1", channel="C1", thread_ts="100.1", user="U1", text="triage")
    assert env.runner.import_file(TID, "U1", "tickets.jsonl", JSONL.encode())
    env.only_pending("launch")
    # the same file again (plus one new row) while the launch card waits
    extra = json.dumps({"prompt": "Ticket X: printer on fire", "response": "hardware"})
    assert env.runner.import_file(TID, "U1", "tickets-v2.jsonl", (JSONL + "\n" + extra).encode())
    env.only_pending("launch")
    with env.db.session() as s:
        first, second = s.exec(select(Dataset).order_by(Dataset.id)).all()
        in_second = s.exec(select(func.count()).select_from(Example)
                           .where(Example.dataset_id == second.id)).one()
    assert second.n_train + second.n_val + second.n_test == 41 == in_second
    assert "Split: " in env.notifier.texts("say")[-1]
    lines = env.notifier.texts("upload")[-1][1].decode().splitlines()
    assert len(lines) == second.n_train


def test_an_upload_in_an_older_checkpoint_still_imports(env: Env) -> None:
    """Before imports were prepared outside the graph, the resume value carried the raw
    text ("content"); a thread checkpointed like that still imports after an upgrade."""
    env.runner.start(team="T1", channel="C1", thread_ts="100.1", user="U1", text="triage")
    iid = env.only_pending("question")
    assert env.runner.resume(TID, iid, {"action": "import", "filename": "old.jsonl",
                                        "content": JSONL, "user": "U1"})
    env.only_pending("launch")
    assert any(t.startswith("Imported old.jsonl: 40 examples in") for t in env.notifier.texts("say"))
