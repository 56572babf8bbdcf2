"""Crash safety with REAL processes: kill -9 of a bot process mid-run, concurrent
launches/runs. FakeRunPod runs in this process; the "bot" child reaches it through the
real runpod SDK via env (RUNPOD_API_BASE_URL, TUNER_POD_URL_TEMPLATE)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlmodel import select

from jobs.reaper import reap
from jobs.runpod_api import RunPodAPI
from jobs.training import TrainingService
from storage.db import Database
from storage.models import MetricPoint, Project, Run
from tests.fakes.runpod_fake import FakeRunPod
from tests.test_training import TRAIN_CFG, make_settings, pod_rows, seed

REPO = Path(__file__).resolve().parents[1]
LONG_CFG = {**TRAIN_CFG, "max_steps": 30, "eval_steps": 10, "early_stopping_patience": 0}
SHORT_CFG = {**TRAIN_CFG, "max_steps": 4, "eval_steps": 2, "max_new_tokens": 4}

CHILD = """
import sys
from pathlib import Path
from jobs.runpod_api import RunPodAPI
from jobs.training import TrainingService
from storage.db import Database
from storage.settings import Settings
s = Settings(_env_file=None)
db = Database(sys.argv[1])
TrainingService(db, s, RunPodAPI(s), Path(sys.argv[3])).run(int(sys.argv[2]), lambda snap: None)
"""


@pytest.fixture()
def fake(fake_runpod):
    return fake_runpod


def db_at(tmp_path: Path) -> tuple[str, Database]:
    url = f"sqlite:///{tmp_path / 't.db'}"
    return url, Database(url)


def start_bot(fake: FakeRunPod, url: str, run_id: int, tmp_path: Path, cfg: dict) -> subprocess.Popen:
    env = {**os.environ, **fake.env(), "TUNER_GPU_TYPES": "NVIDIA RTX A5000",
           "TUNER_CLOUD_TYPES": "SECURE", "TUNER_POLL_INTERVAL_S": "0.2",
           "TUNER_POD_READY_TIMEOUT_S": "60", "TUNER_TRAIN_OVERRIDES": json.dumps(cfg)}
    return subprocess.Popen([sys.executable, "-c", CHILD, url, str(run_id), str(tmp_path / "art")],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_for(pred, timeout: float = 90.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def load(db: Database, run_id: int) -> Run:
    with db.session() as s:
        return s.get(Run, run_id)


def kill9(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(10) == -signal.SIGKILL


def svc(db: Database, tmp_path: Path, cfg: dict = LONG_CFG) -> TrainingService:
    s = make_settings(tuner_gpu_types="NVIDIA RTX A5000", tuner_train_overrides=json.dumps(cfg))
    return TrainingService(db, s, RunPodAPI(s), tmp_path / "art")


def assert_billed_once(fake: FakeRunPod, db: Database) -> None:
    rows = pod_rows(db)
    assert sorted(r.detail for r in rows) == sorted(f"pod:{p}" for p in fake.pods)
    for r in rows:
        pod_id = r.detail.split(":", 1)[1]
        assert r.quantity == pytest.approx(fake.billed_seconds(pod_id), abs=2.0)
    frozen = {p: fake.billed_seconds(p) for p in fake.pods}
    time.sleep(0.3)
    assert {p: fake.billed_seconds(p) for p in fake.pods} == frozen  # nothing bills after terminate


def test_kill9_mid_training_restart_reattaches_same_pod(fake, tmp_path):
    url, db = db_at(tmp_path)
    pid, did = seed(db)
    first = svc(db, tmp_path)
    run_id = first.launch(pid, did, user_id="U1")
    bot = start_bot(fake, url, run_id, tmp_path, LONG_CFG)
    try:
        def trained_some() -> bool:
            with db.session() as s:
                return s.exec(select(MetricPoint).where(MetricPoint.run_id == run_id,
                                                        MetricPoint.step > 0)).first() is not None
        wait_for(trained_some, what="first metrics from the child bot")
    finally:
        kill9(bot)
    assert load(db, run_id).status == "running" and len(fake.live_pods()) == 1
    pod_id = fake.live_pods()[0]

    # Restarted bot: start-up reaper pass leaves the in-flight run's pod alone ...
    api = RunPodAPI(make_settings())
    assert reap(db, api) == [] and fake.live_pods() == [pod_id]
    # ... and resuming re-attaches to it.
    restarted = svc(db, tmp_path)
    assert restarted.resumable_runs() == [run_id]
    snaps = []
    out = restarted.run(run_id, snaps.append)
    assert out.status == "succeeded", (out.error, fake.pod_log(pod_id))
    assert list(fake.pods) == [pod_id] and fake.live_pods() == []  # no second pod, none leaked
    assert snaps[0].step > 0  # picked up mid-training
    assert_billed_once(fake, db)
    assert reap(db, api) == [] and len(pod_rows(db)) == 1


def crash_between_create_and_save(fake: FakeRunPod, url: str, db: Database, tmp_path: Path) -> tuple[int, str]:
    """kill -9 while podFindAndDeployOnDemand is answering: the pod exists, pod_id is unsaved."""
    pid, did = seed(db)
    run_id = svc(db, tmp_path).launch(pid, did, user_id="U1")
    fake.create_delay_s = 30.0
    bot = start_bot(fake, url, run_id, tmp_path, SHORT_CFG)
    try:
        wait_for(lambda: len(fake.pods) == 1, what="pod creation")
    finally:
        kill9(bot)
    fake.create_delay_s = 0.0
    run = load(db, run_id)
    assert run.status == "starting" and run.pod_token and run.pod_id is None
    return run_id, next(iter(fake.pods))


def test_kill9_between_create_and_save_adopts_pod_by_name(fake, tmp_path):
    url, db = db_at(tmp_path)
    run_id, pod_id = crash_between_create_and_save(fake, url, db, tmp_path)
    api = RunPodAPI(make_settings())
    assert reap(db, api) == []  # quick restart: inside the creation window, not an orphan
    out = svc(db, tmp_path, SHORT_CFG).run(run_id, lambda s: None)
    assert out.status == "succeeded", (out.error, fake.pod_log(pod_id))
    assert list(fake.pods) == [pod_id] and fake.live_pods() == []
    assert load(db, run_id).pod_id == pod_id
    assert_billed_once(fake, db)


def test_kill9_between_create_and_save_bot_down_long_reaps_then_new_pod(fake, tmp_path):
    url, db = db_at(tmp_path)
    run_id, stale = crash_between_create_and_save(fake, url, db, tmp_path)
    with db.session() as s:  # the bot stays down an hour: past the creation window and lease
        r = s.get(Run, run_id)
        r.started_at = r.started_at - timedelta(hours=1)
        s.add(r)
        s.commit()
    api = RunPodAPI(make_settings())
    assert reap(db, api) == [stale] and fake.live_pods() == []
    rows = pod_rows(db)
    assert len(rows) == 1 and rows[0].run_id == run_id and rows[0].detail == f"pod:{stale}"
    assert load(db, run_id).status == "starting"  # not the run's pod yet: run stays resumable
    out = svc(db, tmp_path, SHORT_CFG).run(run_id, lambda s: None)
    assert out.status == "succeeded", out.error
    assert len(fake.pods) == 2 and fake.live_pods() == []
    new = load(db, run_id).pod_id
    assert new != stale and new in fake.pods
    assert_billed_once(fake, db)


def test_concurrent_launch_clicks_make_one_run(fake, tmp_path):
    url, _ = db_at(tmp_path)
    seeded = Database(url)
    pid0, did = seed(seeded)
    pids = [pid0]
    with seeded.session() as s:
        for i in range(2, 6):
            p = Project(thread_id=f"T:C:{i}", team_id="T", channel_id="C", thread_ts=str(i),
                        created_by="U", budget_usd=50.0)
            s.add(p)
            s.commit()
            pids.append(int(p.id))
    for pid in pids:
        # each "process" has its own engine on the same database file
        services = [svc(Database(url), tmp_path) for _ in range(4)]
        barrier = threading.Barrier(len(services))
        ids, errors = [], []

        def click(service: TrainingService) -> None:
            barrier.wait()
            try:
                ids.append(service.launch(pid, did, user_id="U1"))
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=click, args=(s,)) for s in services]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert errors == [] and len(ids) == 4 and len(set(ids)) == 1
        with seeded.session() as s:
            assert len(s.exec(select(Run).where(Run.project_id == pid)).all()) == 1
    assert fake.pods == {}


def test_two_processes_running_one_run_share_one_pod(fake, tmp_path):
    url, db = db_at(tmp_path)
    pid, did = seed(db)
    run_id = svc(db, tmp_path, SHORT_CFG).launch(pid, did, user_id="U1")
    services = [svc(Database(url), tmp_path, SHORT_CFG) for _ in range(2)]
    barrier = threading.Barrier(2)
    outs = []

    def go(service: TrainingService) -> None:
        barrier.wait()
        outs.append(service.run(run_id, lambda s: None))

    threads = [threading.Thread(target=go, args=(s,)) for s in services]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(fake.pods) == 1, "a second pod was created for the same run"
    assert [o.status for o in outs] == ["succeeded", "succeeded"], [o.error for o in outs]
    assert fake.live_pods() == []
    assert_billed_once(fake, db)
