"""Nightly: APScheduler job store on a tmp SQLite file, skip/idempotency, and a real retrain
(TrainingService -> FakeRunPod -> CPU jobs.train) judged vs the champion through ClaudeClient."""

from __future__ import annotations

import json
import random
import re
import time
from datetime import datetime, timedelta, timezone

from sqlalchemy import text
from sqlmodel import select

from agent.nightly import NightlyService
from agent.ports import RecordingNotifier
from jobs import scheduler as sched
from jobs.claude import ClaudeClient
from jobs.judge import JudgeService
from jobs.runpod_api import RunPodAPI
from jobs.training import TrainingService
from storage.db import Database
from storage.models import Dataset, EvalResult, Example, NightlyRun, Project, Run, TaskSpecRow
from storage.settings import Settings
from tests.fakes.anthropic_fake import API_KEY, FakeAnthropic

TRAIN_CFG = {
    "tiny_random_model": True, "max_seq_len": 64, "batch_size": 8, "learning_rate": 5e-3,
    "max_steps": 20, "eval_steps": 10, "early_stopping_patience": 3, "max_new_tokens": 8,
}
CHAMPION_TEXT = "old champion answer"


def _seed(db: Database, n_new: int) -> int:
    rng = random.Random(5)
    with db.session() as s:
        p = Project(thread_id="T:C:1.5", team_id="T", channel_id="C", thread_ts="1.5", created_by="U",
                    name="reverser", nightly_enabled=True)
        s.add(p)
        s.commit()
        s.refresh(p)
        s.add(TaskSpecRow(project_id=p.id, spec={"system_prompt": "You reverse lists."}, approved=True))
        d = Dataset(project_id=p.id)
        s.add(d)
        s.commit()
        s.refresh(d)
        old = datetime.now(timezone.utc) - timedelta(days=2)
        for i in range(60):
            w = [rng.choice("abcdef") for _ in range(3)]
            split = "train" if i < 48 else ("val" if i < 56 else "test")
            s.add(Example(project_id=p.id, dataset_id=d.id, prompt="reverse: " + " ".join(w),
                          response=" ".join(reversed(w)), split=split, content_hash=f"h{i}", created_at=old))
        s.commit()
        test_ids = s.exec(select(Example.id).where(Example.split == "test")).all()
        champ = Run(project_id=p.id, dataset_id=d.id, status="succeeded", best_eval_loss=2.0,
                    config={"generations": {str(i): CHAMPION_TEXT for i in test_ids}},
                    created_at=old + timedelta(hours=1))
        s.add(champ)
        s.commit()
        s.refresh(champ)
        p.champion_run_id = champ.id
        s.add(p)
        for i in range(n_new):  # corrections arriving after the champion was trained
            w = [rng.choice("abcdef") for _ in range(3)]
            s.add(Example(project_id=p.id, dataset_id=None, prompt="reverse: " + " ".join(w),
                          response=" ".join(reversed(w)), split="test" if i == 0 else "train",
                          source="correction", content_hash=f"n{i}"))
        s.commit()
        return int(p.id)


def _judge_prefers_new(req: dict) -> str:
    body = req["messages"][0]["content"]
    body = body if isinstance(body, str) else "".join(b["text"] for b in body)
    a = re.search(r"<response_A>\n(.*?)\n</response_A>", body, re.S).group(1)
    return json.dumps({"winner": "B" if a == CHAMPION_TEXT else "A", "reason": "fresher"})


def _services(db, tmp_path, anthropic_url: str, min_new: int):
    settings = Settings(
        _env_file=None, anthropic_api_key=API_KEY, anthropic_base_url=anthropic_url,
        tuner_gpu_types="NVIDIA RTX A5000", tuner_cloud_types="SECURE", tuner_poll_interval_s=0.2,
        tuner_pod_ready_timeout_s=60, tuner_train_overrides=json.dumps(TRAIN_CFG),
        tuner_nightly_min_new_examples=min_new,
    )
    llm = ClaudeClient(settings, db, max_retries=0)
    trainer = TrainingService(db, settings, RunPodAPI(settings), tmp_path / "artifacts")
    notifier = RecordingNotifier()
    svc = NightlyService(db, settings, llm, trainer, JudgeService(db, llm, settings), notifier)
    return settings, svc, notifier




def _wait(pred, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_scheduler_job_store_skip_and_idempotent(tmp_path, fake_runpod):
    url = f"sqlite:///{tmp_path / 'app.db'}"
    db = Database(url)
    pid = _seed(db, n_new=0)
    clock = [datetime(2025, 5, 1, 3, 0, 5, tzinfo=timezone.utc)]
    with FakeAnthropic.running(_judge_prefers_new) as fa:
        settings, svc, notifier = _services(db, tmp_path, fa.base_url, min_new=3)
        scheduler = sched.build_scheduler(settings, url, svc.run)
        calls: list[tuple[int, str]] = []
        sched.register_runner(lambda pid_, d: (calls.append((pid_, d)), svc.run(pid_, d))[1],
                              clock=lambda: clock[0])
        scheduler.start()
        try:
            assert sched.sync_jobs(scheduler, db, settings) == [f"nightly:{pid}"]
            job = scheduler.get_job(f"nightly:{pid}")
            assert job.next_run_time.astimezone(timezone.utc).hour == 3
            assert job.misfire_grace_time >= 3600 and job.coalesce and job.max_instances == 1
            with db.engine.connect() as c:  # persisted in the app's own database
                assert c.execute(text("select id from apscheduler_jobs")).scalars().all() == [f"nightly:{pid}"]

            scheduler.modify_job(f"nightly:{pid}", next_run_time=datetime.now(timezone.utc))
            _wait(lambda: notifier.texts("say"))
            scheduler.modify_job(f"nightly:{pid}", next_run_time=datetime.now(timezone.utc))
            _wait(lambda: len(calls) == 2)
            _wait(lambda: scheduler.get_job(f"nightly:{pid}").next_run_time.hour == 3)
        finally:
            scheduler.shutdown(wait=True)
            sched.register_runner(None)

    with db.session() as s:
        rows = s.exec(select(NightlyRun)).all()
    assert [(r.run_date, r.status) for r in rows] == [("2025-05-01", "skipped")]
    says = notifier.texts("say")
    assert calls == [(pid, "2025-05-01")] * 2  # fired twice, ran once
    assert len(says) == 1 and "skipped: no new data" in says[0] and "Spend for this nightly: $0.00" in says[0]

    # nightly switched off -> job removed on the next sync, from a fresh scheduler on the same store
    with db.session() as s:
        p = s.get(Project, pid)
        p.nightly_enabled = False
        s.add(p)
        s.commit()
    s2 = sched.build_scheduler(settings, url)
    s2.start(paused=True)
    try:
        assert s2.get_job(f"nightly:{pid}") is not None
        assert sched.sync_jobs(s2, db, settings) == [] and s2.get_jobs() == []
    finally:
        s2.shutdown(wait=False)


def test_too_few_new_examples_is_skipped(tmp_path, fake_runpod):
    db = Database(f"sqlite:///{tmp_path / 'a.db'}")
    pid = _seed(db, n_new=2)
    _, svc, notifier = _services(db, tmp_path, "http://127.0.0.1:9", min_new=3)
    row = svc.run(pid, "2025-05-02")
    assert row.status == "skipped" and "only 2 new examples (need 3)" in row.report
    assert notifier.texts("say") == [row.report] and fake_runpod.pods == {}


def test_retrain_judge_vs_champion_promotes(tmp_path, fake_runpod):
    db = Database(f"sqlite:///{tmp_path / 'b.db'}")
    pid = _seed(db, n_new=4)
    with FakeAnthropic.running(_judge_prefers_new) as fa:
        _, svc, notifier = _services(db, tmp_path, fa.base_url, min_new=3)
        row = svc.run(pid, "2025-05-03")
        again = svc.run(pid, "2025-05-03")
        judged = fa.message_requests

    assert row.status == "promoted", row.report
    assert again.id == row.id and len(notifier.texts("say")) == 1
    with db.session() as s:
        p = s.get(Project, pid)
        runs = s.exec(select(Run).where(Run.project_id == pid).order_by(Run.id)).all()
        ev = s.exec(select(EvalResult)).one()
        test_split = s.exec(select(Example).where(Example.split == "test")).all()
    new_run = runs[-1]
    assert len(runs) == 2 and p.champion_run_id == new_run.id and new_run.status == "succeeded"
    assert ev.against == "champion" and ev.run_id == new_run.id and ev.promoted
    assert ev.n == 4 and ev.wins == 4  # the 4 frozen test examples; the new "test" one became train
    assert len(test_split) == 4 and len(judged) == 8  # both orders each
    assert fake_runpod.live_pods() == []
    report = notifier.texts("say")[0]
    assert "retrained on 4 new examples" in report and f"New champion: run {new_run.id}" in report
    assert "Spend for this nightly: $" in report and row.report == report


def test_skipped_while_a_run_is_training(tmp_path, fake_runpod):
    db = Database(f"sqlite:///{tmp_path / 'c.db'}")
    pid = _seed(db, n_new=5)
    with db.session() as s:
        s.add(Run(project_id=pid, status="running", pod_id="pod-busy",
                  created_at=datetime(2020, 1, 1, tzinfo=timezone.utc)))
        s.commit()
    _, svc, notifier = _services(db, tmp_path, "http://127.0.0.1:9", min_new=3)
    row = svc.run(pid, "2025-05-04")
    assert row.status == "skipped" and "already in progress" in row.report
    assert fake_runpod.pods == {} and notifier.texts("say") == [row.report]


def test_restart_finishes_a_nightly_whose_run_was_launched(tmp_path, fake_runpod):
    """The process died after launching the nightly's run: recover() re-attaches, judges,
    promotes and reports; a nightly that died before launching is reported as such."""
    db = Database(f"sqlite:///{tmp_path / 'd.db'}")
    pid = _seed(db, n_new=4)
    with FakeAnthropic.running(_judge_prefers_new) as fa:
        _, svc, notifier = _services(db, tmp_path, fa.base_url, min_new=3)
        # what a process killed right after trainer.launch() leaves behind
        dataset_id = svc._nightly_dataset(pid, svc._new_examples(pid))
        run_id = svc.trainer.launch(pid, dataset_id, user_id="nightly")
        with db.session() as s:
            s.add(NightlyRun(project_id=pid, run_date="2025-05-05", status="running",
                             run_id=run_id, new_examples=4))
            s.add(NightlyRun(project_id=pid, run_date="2025-05-04", status="running"))
            s.commit()
        _, restarted, notifier = _services(db, tmp_path, fa.base_url, min_new=3)
        assert len(restarted.recover()) == 2
    with db.session() as s:
        rows = {r.run_date: r for r in s.exec(select(NightlyRun)).all()}
        project = s.get(Project, pid)
    assert rows["2025-05-05"].status == "promoted" and project.champion_run_id == run_id
    assert rows["2025-05-04"].status == "failed" and "interrupted" in rows["2025-05-04"].report
    reports = notifier.texts("say")
    assert len(reports) == 2 and any("retrained on 4 new examples" in r for r in reports)
    assert fake_runpod.live_pods() == [] and len(fake_runpod.pods) == 1
    assert restarted.recover() == []  # nothing left running


def test_failed_run_does_not_use_up_new_data(tmp_path, fake_runpod):
    db = Database(f"sqlite:///{tmp_path / 'e.db'}")
    pid = _seed(db, n_new=4)
    with db.session() as s:  # a nightly run that failed after the new data arrived
        s.add(Run(project_id=pid, status="failed"))
        s.commit()
    _, svc, _ = _services(db, tmp_path, "http://127.0.0.1:9", min_new=3)
    assert len(svc._new_examples(pid)) == 4


def test_cron_fires_when_the_clock_reaches_the_nightly_hour(tmp_path, fake_runpod, monkeypatch):
    """No job is poked: the scheduler's own clock moves from 02:59 to 03:00 UTC and the
    cron trigger fires the project's nightly, which reports for that date."""
    import apscheduler.schedulers.base as aps_base

    day = (datetime.now(timezone.utc) + timedelta(days=2)).date()  # future: never a misfire
    clock = [datetime(day.year, day.month, day.day, 2, 59, 0, tzinfo=timezone.utc)]

    class _Clock(datetime):
        @classmethod
        def now(cls, tz=None):  # type: ignore[override]
            return clock[0].astimezone(tz) if tz else clock[0].replace(tzinfo=None)

    monkeypatch.setattr(aps_base, "datetime", _Clock)
    url = f"sqlite:///{tmp_path / 'f.db'}"
    db = Database(url)
    pid = _seed(db, n_new=0)
    settings, svc, notifier = _services(db, tmp_path, "http://127.0.0.1:9", min_new=3)
    scheduler = sched.build_scheduler(settings, url, svc.run)
    sched.register_runner(svc.run, clock=lambda: clock[0])
    scheduler.start()
    try:
        sched.sync_jobs(scheduler, db, settings)
        job = scheduler.get_job(f"nightly:{pid}")
        assert job.next_run_time.astimezone(timezone.utc) == clock[0].replace(hour=3, minute=0)
        scheduler.wakeup()
        time.sleep(0.5)
        assert notifier.texts("say") == []  # 02:59: nothing yet
        clock[0] = clock[0].replace(hour=3, minute=0, second=1)
        scheduler.wakeup()
        _wait(lambda: notifier.texts("say"))
    finally:
        scheduler.shutdown(wait=True)
        sched.register_runner(None, clock=lambda: datetime.now(timezone.utc))
    with db.session() as s:
        rows = s.exec(select(NightlyRun)).all()
    assert [(r.run_date, r.status) for r in rows] == [(day.isoformat(), "skipped")]
    assert "skipped: no new data" in notifier.texts("say")[0]
