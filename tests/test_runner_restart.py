"""Process restarts: a new AgentRunner on the same files picks up where the old one was."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from sqlmodel import select

from agent.ports import RecordingNotifier
from storage.models import Dataset
from tests.test_graph import TID, Env, env, make_runner  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys
from agent.ports import RecordingNotifier
from storage.settings import Settings
from tests.test_graph import make_runner
args = json.loads(sys.argv[1])
runner = make_runner(Settings(_env_file=None, **args["settings"]), RecordingNotifier(), judge=False)
print("resuming", flush=True)
runner.resume(args["tid"], args["iid"], {"action": "approve", "user": "U1"})
print("finished", flush=True)
"""


def test_restart_mid_conversation_resumes_pending_question(env: Env) -> None:
    env.runner.start(team="T1", channel="C1", thread_ts="100.1", user="U1", text="triage")
    old = env.runner.pending(TID)
    assert [p["text"] for _, p in old] == ["Question 1?"]
    env.runner.close()

    notifier = RecordingNotifier()
    runner = make_runner(env.settings, notifier, env.trainer)
    try:
        assert runner.pending(TID) == old
        assert runner.recover(wait=True) == []  # waiting at a question is not "stuck"
        assert runner.reply(TID, "U1", "billing, bug, other")
        assert runner.resume(TID, old[0][0], {"action": "answer", "text": "again"}) is False
        [(iid, payload)] = runner.pending(TID)
        assert payload == {"kind": "question", "text": "Question 2?"}
        assert notifier.texts("ask") == [(iid, payload)]
        define = [r for r in env.fake.message_requests
                  if r["system"].startswith("[tuner:define]")]
        users = [m["content"] for m in define[-1]["messages"] if m["role"] == "user"]
        assert users == ["triage", "billing, bug, other"]
    finally:
        runner.close()


def test_process_killed_during_generation_is_recovered(env: Env) -> None:
    env.claude.example_count = 400
    env.runner.start(team="T1", channel="C1", thread_ts="100.1", user="U1", text="triage")
    env.runner.reply(TID, "U1", "a")
    env.runner.reply(TID, "U1", "b")
    [(spec_iid, _)] = env.runner.pending(TID)
    assert env.runner.resume(TID, spec_iid, {"action": "approve", "user": "U1"})
    [(samples_iid, payload)] = env.runner.pending(TID)
    assert payload["kind"] == "samples"
    env.runner.close()

    # A second process approves the samples and dies (SIGKILL) in the middle of generation.
    started = threading.Event()

    def slow_generate() -> None:
        if env.claude.generate_calls >= 6:
            started.set()
        time.sleep(0.2)

    env.claude.on_generate = slow_generate
    s = env.settings
    args = {
        "tid": TID, "iid": samples_iid,
        "settings": {"anthropic_api_key": s.anthropic_api_key.get_secret_value(),
                     "anthropic_base_url": s.anthropic_base_url,
                     "database_url": s.database_url,
                     "tuner_allowed_users": s.tuner_allowed_users},
    }
    child = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(args)], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert started.wait(60), child.stderr.read() if child.poll() is not None else "no calls"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    out = child.stdout.read()
    assert "resuming" in out and "finished" not in out
    env.claude.on_generate = None
    calls_before = env.claude.generate_calls

    notifier = RecordingNotifier()
    runner = make_runner(env.settings, notifier, env.trainer)
    try:
        state = runner.graph.get_state({"configurable": {"thread_id": TID}})
        assert state.next == ("generate",) and not state.interrupts
        with env.db.session() as sess:
            assert sess.exec(select(Dataset)).all() == []
        assert runner.recover(wait=True) == [TID]
        assert env.claude.generate_calls > calls_before
        [(iid, payload)] = runner.pending(TID)
        assert payload["kind"] == "launch"
        assert notifier.texts("ask") == [(iid, payload)]
        assert [u[0] for u in notifier.texts("upload")] == ["ticket-triage-train.jsonl"]
        with env.db.session() as sess:
            ds = sess.exec(select(Dataset)).one()
        assert ds.n_train + ds.n_val + ds.n_test == 400
        assert runner.recover(wait=True) == []  # nothing left to recover
    finally:
        runner.close()


def _add_project(env: Env) -> None:
    """A project for TID whose graph has nothing pending (finished, or never started)."""
    from storage.models import Project

    with env.db.session() as s:
        s.add(Project(thread_id=TID, team_id="T1", channel_id="C1", thread_ts="100.1",
                      created_by="U1"))
        s.commit()


def test_import_when_nothing_waits_adds_examples_for_next_retrain(env: Env) -> None:
    from storage.models import Example

    _add_project(env)
    rows = [{"prompt": f"ticket {i} about {w}", "response": f"label {w}"}
            for i, w in enumerate(["billing", "bug", "login", "refund"])]
    body = ("\n".join(json.dumps(r) for r in rows + rows[:1]) + "\n").encode()
    # the thread is busy (a training run holds its lock): the upload must not wait for it
    lock = env.runner._lock(TID)
    lock.acquire()
    try:
        t0 = time.monotonic()
        assert env.runner.import_file(TID, "U1", "more.jsonl", body)
        assert time.monotonic() - t0 < 10
    finally:
        lock.release()
    with env.db.session() as s:
        stored = s.exec(select(Example).where(Example.source == "import")).all()
    assert sorted(e.prompt for e in stored) == sorted(r["prompt"] for r in rows)
    assert {e.split for e in stored} == {"train"}
    assert "Added 4 new examples from more.jsonl" in env.notifier.texts("say")[-1]
    # the same file again adds nothing new
    assert env.runner.import_file(TID, "U1", "more.jsonl", body)
    assert "Added 0 new examples" in env.notifier.texts("say")[-1]
    assert env.runner.import_file(TID, "U1", "bad.jsonl", b"{not json\n")
    assert "Couldn't import bad.jsonl" in env.notifier.texts("error")[-1]
    assert not env.runner.import_file("T1:C9:1.1", "U1", "x.jsonl", body)  # no project


def test_card_lost_in_a_crash_is_posted_on_recover(env: Env) -> None:
    """The process died after the graph stopped at a question but before posting it."""
    real_ask = env.notifier.ask

    def dying_ask(thread_id: str, interrupt_id: str, payload: dict) -> None:
        raise SystemExit("killed before posting")

    env.notifier.ask = dying_ask  # type: ignore[method-assign]
    try:
        env.runner.start(team="T1", channel="C1", thread_ts="100.1", user="U1", text="triage")
    except SystemExit:
        pass
    env.notifier.ask = real_ask  # type: ignore[method-assign]
    [(iid, payload)] = env.runner.pending(TID)
    assert env.notifier.texts("ask") == []
    env.runner.close()

    notifier = RecordingNotifier()
    runner = make_runner(env.settings, notifier, env.trainer)
    try:
        assert runner.recover(wait=True) == []
        assert notifier.texts("ask") == [(iid, payload)]
        assert runner.recover(wait=True) == [] and len(notifier.texts("ask")) == 1  # once
    finally:
        runner.close()


def test_in_thread_correction_is_stored_for_the_next_retrain(env: Env) -> None:
    from storage.models import Example

    _add_project(env)
    lock = env.runner._lock(TID)
    lock.acquire()  # a training run holds the thread: corrections must not wait for it
    try:
        assert env.runner.reply(TID, "U1", "<@UBOT> Correction: Ticket 7: card declined twice\n"
                                           "=> billing")
    finally:
        lock.release()
    with env.db.session() as s:
        (ex,) = s.exec(select(Example).where(Example.source == "correction")).all()
    assert (ex.prompt, ex.response, ex.split) == ("Ticket 7: card declined twice", "billing", "train")
    assert "Correction stored" in env.notifier.texts("say")[-1]
    assert env.runner.reply(TID, "U1", "correction: Ticket 7: card declined twice => billing")
    assert "already in the project" in env.notifier.texts("say")[-1]
    assert env.runner.reply(TID, "U1", "correction: Ticket 8 => " + "word " * 5000)
    assert "Correction not stored" in env.notifier.texts("error")[-1]
    # not a correction (no arrow), nothing waits: not consumed; no project: not consumed
    assert env.runner.reply(TID, "U1", "correction: it should say billing") is False
    assert env.runner.reply("T1:C9:1.1", "U1", "correction: a => b") is False
    with env.db.session() as s:
        assert len(s.exec(select(Example)).all()) == 1
