"""TrainingService end to end: real runpod SDK -> FakeRunPod -> real jobs.train on CPU."""

from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path

import pytest
from sqlmodel import select

from jobs.chart import loss_chart_png
from jobs.podproto import ADAPTER_ARTIFACT
from jobs.runpod_api import RunPodAPI
from jobs.training import POD_ENV, POD_START_CMD, TrainingService, pod_bundle_b64
from jobs.values import BudgetExceededError, RunSnapshot
from storage.db import Database
from storage.models import Dataset, Example, MetricPoint, Project, Run, SpendEntry, TaskSpecRow
from storage.settings import Settings

TRAIN_CFG = {
    "tiny_random_model": True, "max_seq_len": 64, "batch_size": 8, "learning_rate": 5e-3,
    "max_steps": 20, "eval_steps": 5, "early_stopping_patience": 3, "max_new_tokens": 8,
}


@pytest.fixture()
def fake(fake_runpod):
    return fake_runpod


def make_settings(**kw) -> Settings:
    base = dict(
        _env_file=None, tuner_gpu_types="NVIDIA RTX A5000,NVIDIA A40", tuner_cloud_types="SECURE",
        tuner_poll_interval_s=0.2, tuner_pod_ready_timeout_s=60,
        tuner_train_overrides=json.dumps(TRAIN_CFG),
        # seconds, not the production minutes: a silent pod fails a test run quickly
        tuner_pod_unreachable_grace_s=3.0, tuner_runpod_backoff_s=0.01, tuner_runpod_backoff_max_s=0.5,
    )
    base.update(kw)
    return Settings(**base)


def seed(db: Database, budget: float = 50.0) -> tuple[int, int]:
    rng = random.Random(3)
    with db.session() as s:
        p = Project(thread_id="T:C:1", team_id="T", channel_id="C", thread_ts="1", created_by="U",
                    budget_usd=budget)
        s.add(p)
        s.commit()
        s.refresh(p)
        s.add(TaskSpecRow(project_id=p.id, spec={"system_prompt": "You reverse lists."}, approved=True))
        d = Dataset(project_id=p.id)
        s.add(d)
        s.commit()
        s.refresh(d)
        for i in range(110):
            words = [rng.choice("abcdef") for _ in range(rng.randint(2, 4))]
            split = "train" if i < 90 else ("val" if i < 106 else "test")
            s.add(Example(project_id=p.id, dataset_id=d.id, prompt="reverse: " + " ".join(words),
                          response=" ".join(reversed(words)), split=split, content_hash=f"h{i}"))
        s.commit()
        return int(p.id), int(d.id)


def service(db, tmp_path, **kw) -> TrainingService:
    settings = make_settings(**kw)
    return TrainingService(db, settings, RunPodAPI(settings), tmp_path / "artifacts")


def pod_rows(db: Database) -> list[SpendEntry]:
    with db.session() as s:
        return list(s.exec(select(SpendEntry).where(SpendEntry.kind == "pod_seconds")))


def test_end_to_end_training_on_fake_pod(fake, db, tmp_path):
    fake.capacity = {"NVIDIA A40"}  # first GPU type has no capacity -> falls back
    pid, did = seed(db)
    svc = service(db, tmp_path)
    est = svc.estimate(pid, did)
    assert est.gpu_type == "NVIDIA RTX A5000" and est.price_is_live and est.est_usd > 0
    run_id = svc.launch(pid, did, user_id="U1")
    assert svc.launch(pid, did, user_id="U1") == run_id  # no duplicate GPU job
    snaps: list[RunSnapshot] = []
    out = svc.run(run_id, snaps.append)

    assert out.status == "succeeded", (out.error, fake.pod_log(next(iter(fake.pods))))
    assert len(fake.pods) == 1 and fake.live_pods() == []
    pod = next(iter(fake.pods.values()))
    assert pod.gpu_type == "NVIDIA A40" and pod.name == f"tuner-run-{run_id}"
    # the pinned unsloth core image, started by POD_START_CMD with the env its entrypoint needs
    assert pod.image.startswith("unsloth/unsloth:core-") and "@sha256:" in pod.image
    assert pod.docker_args == POD_START_CMD and {k: pod.env.get(k) for k in POD_ENV} == POD_ENV
    steps = [s.step for s in snaps]
    assert steps == sorted(steps) and steps[-1] == 20 and len(set(steps)) >= 2
    evals = [loss for _, loss in snaps[-1].eval_loss]
    assert len(evals) == 4 and min(evals) < evals[0]
    assert snaps[-1].cost_usd > 0
    with db.session() as s:
        run = s.get(Run, run_id)
        points = s.exec(select(MetricPoint).where(MetricPoint.run_id == run_id)).all()
    assert run.status == "succeeded" and run.pod_id == pod.id and run.ended_at is not None
    assert run.best_eval_loss == pytest.approx(min(evals)) and out.best_step == run.best_step
    assert sorted(p.step for p in points if p.kind == "eval") == [5, 10, 15, 20]
    adapter = Path(out.artifact_uri) / ADAPTER_ARTIFACT
    assert adapter.read_bytes()[:2] == b"\x1f\x8b"  # gzip
    # held-out "test" split examples got generations
    with db.session() as s:
        test_ids = {str(e.id) for e in s.exec(select(Example).where(Example.split == "test"))}
    assert set(out.generations) == test_ids
    rows = pod_rows(db)
    assert len(rows) == 1 and rows[0].run_id == run_id
    assert rows[0].quantity == pytest.approx(fake.billed_seconds(pod.id), abs=2.0)
    assert rows[0].usd == pytest.approx(rows[0].quantity * 0.40 / 3600)
    assert svc.run(run_id, snaps.append).status == "succeeded"  # terminal: no new pod
    assert len(fake.pods) == 1 and len(pod_rows(db)) == 1


def test_pod_crash_mid_training_fails_and_stops_billing(fake, db, tmp_path):
    pid, did = seed(db)
    svc = service(db, tmp_path, tuner_train_overrides=json.dumps({**TRAIN_CFG, "max_steps": 5000,
                                                                    "early_stopping_patience": 0}))
    run_id = svc.launch(pid, did, user_id="U1")

    def crash_once_training(snap: RunSnapshot) -> None:
        # first snapshot after the job was accepted (model loading / training)
        if snap.state != "waiting" and fake.pods[run_pod(db, run_id)].proc.poll() is None:
            fake.crash(run_pod(db, run_id))

    out = svc.run(run_id, crash_once_training)
    pod_id = run_pod(db, run_id)
    assert out.status == "failed"
    assert "stopped answering" in out.error and "crashed" in out.error
    assert fake.live_pods() == []
    billed = fake.billed_seconds(pod_id)
    time.sleep(0.3)
    assert fake.billed_seconds(pod_id) == billed  # nothing billed after termination
    assert len(pod_rows(db)) == 1


def test_pod_vanishing_is_a_clear_failure(fake, db, tmp_path):
    pid, did = seed(db)
    svc = service(db, tmp_path, tuner_train_overrides=json.dumps({**TRAIN_CFG, "max_steps": 5000,
                                                                    "early_stopping_patience": 0}))
    run_id = svc.launch(pid, did, user_id="U1")
    out = svc.run(run_id, lambda s: fake.crash(run_pod(db, run_id), vanish=True))
    assert out.status == "failed" and "disappeared" in out.error
    assert fake.live_pods() == [] and len(pod_rows(db)) == 1


def run_pod(db: Database, run_id: int) -> str:
    with db.session() as s:
        return s.get(Run, run_id).pod_id


def test_restart_reattaches_to_the_same_pod(fake, db, tmp_path):
    pid, did = seed(db)
    first = service(db, tmp_path)
    run_id = first.launch(pid, did, user_id="U1")
    seen = threading.Event()
    outcomes = []

    def progress(snap: RunSnapshot) -> None:
        if snap.step > 0:
            seen.set()

    t = threading.Thread(target=lambda: outcomes.append(first.run(run_id, progress)))
    t.start()
    assert seen.wait(60)
    first.detach()  # the "old bot" goes away without touching the pod
    t.join(10)
    assert outcomes[0].status == "detached" and len(fake.live_pods()) == 1

    second = service(db, tmp_path)  # "restarted bot": fresh service, same DB
    assert second.resumable_runs() == [run_id]
    snaps: list[RunSnapshot] = []
    out = second.run(run_id, snaps.append)
    assert out.status == "succeeded", out.error
    assert len(fake.pods) == 1 and fake.live_pods() == []  # no second pod was created
    assert snaps[0].step > 0  # picked up mid-training
    assert len(pod_rows(db)) == 1


def test_stop_request_keeps_best(fake, db, tmp_path):
    pid, did = seed(db)
    # 300 planned steps: the pod evaluates at most 10 times, so the first eval is at step 30
    svc = service(db, tmp_path, tuner_train_overrides=json.dumps({**TRAIN_CFG, "max_steps": 300,
                                                                    "early_stopping_patience": 0}))
    run_id = svc.launch(pid, did, user_id="U1")

    def stop_after_first_eval(snap: RunSnapshot) -> None:
        if snap.eval_loss:
            assert svc.request_stop(run_id) or snap.state in ("stopped",)

    out = svc.run(run_id, stop_after_first_eval)
    assert out.status == "stopped", out.error
    assert out.best_step is not None and out.best_eval_loss is not None
    assert (Path(out.artifact_uri) / ADAPTER_ARTIFACT).exists()
    assert fake.live_pods() == [] and len(pod_rows(db)) == 1
    assert svc.request_stop(run_id) is False  # already over


def test_budget_cap_refuses_launch(fake, db, tmp_path):
    pid, did = seed(db, budget=0.001)
    svc = service(db, tmp_path)
    with pytest.raises(BudgetExceededError, match="budget"):
        svc.launch(pid, did, user_id="U1")
    with db.session() as s:
        assert s.exec(select(Run)).all() == []
    assert fake.pods == {}


def test_no_capacity_fails_run_without_pod(fake, db, tmp_path):
    fake.capacity = set()
    pid, did = seed(db)
    svc = service(db, tmp_path)
    run_id = svc.launch(pid, did, user_id="U1")
    out = svc.run(run_id, lambda s: None)
    assert out.status == "failed" and "NoCapacityError" in out.error and "NVIDIA A40/SECURE" in out.error
    assert fake.pods == {} and pod_rows(db) == []


def test_bundle_contains_the_pod_program():
    import base64
    import io
    import tarfile

    raw = base64.b64decode(pod_bundle_b64())
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        assert sorted(tar.getnames()) == ["jobs/__init__.py", "jobs/podproto.py", "jobs/train.py"]
        assert tar.extractfile("jobs/train.py").read() == Path("jobs/train.py").read_bytes()


def test_chart_png():
    png = loss_chart_png([(1, 2.0), (5, 1.2), (10, 0.9)], [(5, 1.3), (10, 1.0)], 10)
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000


def test_terminate_retried_then_left_to_reaper_which_bills_to_real_termination(fake, db, tmp_path):
    from datetime import timedelta

    from jobs.reaper import reap

    short = json.dumps({**TRAIN_CFG, "max_steps": 4, "eval_steps": 2, "max_new_tokens": 4})
    pid, did = seed(db)
    svc = service(db, tmp_path, tuner_train_overrides=short)
    # transient: two failures, the third try terminates; billed once, to the real end
    fake.terminate_failures = 2
    run_id = svc.launch(pid, did, user_id="U1")
    assert svc.run(run_id, lambda s: None).status == "succeeded"
    pod1 = run_pod(db, run_id)
    assert fake.terminate_calls == 3 and fake.live_pods() == []
    assert [r.quantity for r in pod_rows(db)] == [pytest.approx(fake.billed_seconds(pod1), abs=1.0)]

    # persistent: the run still ends, the pod is NOT billed yet (it is still billing) ...
    fake.terminate_failures = 10_000
    run2 = svc.launch(pid, did, user_id="U1")
    assert run2 != run_id
    assert svc.run(run2, lambda s: None).status == "succeeded"
    pod2 = run_pod(db, run2)
    assert fake.live_pods() == [pod2] and len(pod_rows(db)) == 1
    assert reap(db, svc.api) == [] and fake.live_pods() == [pod2]  # reaper pass fails too: skipped
    time.sleep(1.5)
    # ... until the reaper's next pass really terminates it, and bills up to that moment.
    fake.terminate_failures = 0
    assert reap(db, svc.api) == [pod2] and fake.live_pods() == []
    row = next(r for r in pod_rows(db) if r.detail == f"pod:{pod2}")
    assert row.quantity == pytest.approx(fake.billed_seconds(pod2), abs=1.0)
    with db.session() as s:
        r2 = s.get(Run, run2)
    assert r2.status == "succeeded"  # the reaper keeps the run's outcome
    trained_until = (r2.ended_at - r2.started_at) / timedelta(seconds=1)
    assert row.quantity > trained_until + 1.0  # billed past the run's end, to termination
    assert reap(db, svc.api) == [] and len(pod_rows(db)) == 2


@pytest.mark.parametrize("exited", [True, False])
def test_reattach_to_dead_pod_fails_fast_without_new_pod(fake, db, tmp_path, exited):
    pid, did = seed(db)
    long_cfg = json.dumps({**TRAIN_CFG, "max_steps": 5000, "early_stopping_patience": 0})
    first = service(db, tmp_path, tuner_train_overrides=long_cfg)
    run_id = first.launch(pid, did, user_id="U1")
    seen = threading.Event()
    t = threading.Thread(target=first.run, args=(run_id, lambda s: s.step > 0 and seen.set()))
    t.start()
    assert seen.wait(90)
    first.detach()
    t.join(10)
    pod_id = run_pod(db, run_id)
    fake.crash(pod_id, exited=exited)  # the pod's process dies while the bot is away

    second = service(db, tmp_path, tuner_train_overrides=long_cfg)  # ready timeout is 60 s
    t0 = time.monotonic()
    out = second.run(run_id, lambda s: None)
    assert time.monotonic() - t0 < 10  # not the pod-boot timeout
    assert out.status == "failed"
    if exited:
        assert "EXITED" in out.error and "training was lost" in out.error
    else:
        assert "not ready" in out.error  # RUNNING but its server never answers again
    assert list(fake.pods) == [pod_id] and fake.live_pods() == []  # no new pod; old terminated
    rows = pod_rows(db)
    assert len(rows) == 1 and rows[0].quantity == pytest.approx(fake.billed_seconds(pod_id), abs=1.0)


def test_pod_exiting_mid_training_fails_clearly(fake, db, tmp_path):
    pid, did = seed(db)
    svc = service(db, tmp_path, tuner_train_overrides=json.dumps({**TRAIN_CFG, "max_steps": 5000,
                                                                    "early_stopping_patience": 0}))
    run_id = svc.launch(pid, did, user_id="U1")

    def exit_once(snap: RunSnapshot) -> None:
        if snap.state != "waiting" and fake.pods[run_pod(db, run_id)].status == "RUNNING":
            fake.crash(run_pod(db, run_id), exited=True)

    out = svc.run(run_id, exit_once)
    pod_id = run_pod(db, run_id)
    assert out.status == "failed" and "EXITED" in out.error and "mid-training" in out.error
    assert fake.live_pods() == []
    billed = fake.billed_seconds(pod_id)
    time.sleep(0.3)
    assert fake.billed_seconds(pod_id) == billed
    assert [r.quantity for r in pod_rows(db)] == [pytest.approx(billed, abs=1.0)]
