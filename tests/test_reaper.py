"""Reaper: terminates tuner- pods with no live run, through the real SDK and FakeRunPod."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from sqlmodel import select

from jobs.reaper import Reaper, reap
from jobs.runpod_api import RunPodAPI
from storage.db import Database
from storage.models import Run, SpendEntry, utcnow
from storage.settings import Settings


@pytest.fixture()
def fake(fake_runpod_gql):
    return fake_runpod_gql


@pytest.fixture()
def api(fake):
    return RunPodAPI(Settings(_env_file=None, tuner_gpu_types="NVIDIA RTX A5000", tuner_cloud_types="SECURE"))


@pytest.fixture()
def db(project_db):
    return project_db


def add_run(db: Database, status: str, pod_id: str | None) -> int:
    run = Run(project_id=1, status=status, pod_id=pod_id, price_per_hour=0.36,
              started_at=utcnow() - timedelta(seconds=100))
    with db.session() as s:
        s.add(run)
        s.commit()
        s.refresh(run)
    return int(run.id)


def pod_rows(db):
    with db.session() as s:
        return list(s.exec(select(SpendEntry).where(SpendEntry.kind == "pod_seconds")))


def test_reap_kills_orphans_only(fake, api, db):
    live, _ = api.create_pod_with_fallback("tuner-run-1", "img", {})
    add_run(db, "running", live)
    done, _ = api.create_pod_with_fallback("tuner-run-2", "img", {})
    add_run(db, "succeeded", done)  # finished but its pod leaked (bot killed before terminate)
    stale, _ = api.create_pod_with_fallback("tuner-run-3", "img", {})
    stale_run = add_run(db, "running", "some-other-pod")  # run 3 moved on: pod is stale
    unknown, _ = api.create_pod_with_fallback("tuner-something", "img", {})  # no run at all
    creating, _ = api.create_pod_with_fallback("tuner-run-4", "img", {})
    add_run(db, "starting", None)  # run 4: pod created, pod_id not saved yet -> still live
    mine, _ = api.create_pod_with_fallback("jupyter", "img", {})
    fake.pods[mine].name = "someone-elses-notebook"  # not ours: never touched

    killed = reap(db, api)

    assert sorted(killed) == sorted([done, stale, unknown])
    assert sorted(fake.live_pods()) == sorted([live, creating, mine])
    with db.session() as s:
        assert s.get(Run, 2).status == "succeeded"  # terminal status is kept
        assert s.get(Run, stale_run).status == "running"
    rows = pod_rows(db)
    assert sorted(r.detail for r in rows) == sorted(f"pod:{p}" for p in (done, stale, unknown))
    run_row = next(r for r in rows if r.detail == f"pod:{done}")
    assert run_row.run_id == 2 and run_row.quantity >= 100 and run_row.usd == pytest.approx(
        run_row.quantity * 0.36 / 3600)
    assert reap(db, api) == [] and len(pod_rows(db)) == 3  # second pass: nothing, no re-billing


def test_reap_pod_of_a_run_that_moved_on(fake, api, db):
    old, _ = api.create_pod_with_fallback("tuner-run-1", "img", {})
    new, _ = api.create_pod_with_fallback("tuner-run-1", "img", {})
    add_run(db, "running", new)  # run 1 owns `new`; `old` is left over from a crash
    assert reap(db, api) == [old]
    assert fake.live_pods() == [new]


def test_dead_run_is_marked_reaped(fake, api, db):
    pod, _ = api.create_pod_with_fallback("tuner-run-1", "img", {})
    run_id = add_run(db, "failed", pod)
    with db.session() as s:
        r = s.get(Run, run_id)
        r.status = "legacy"  # a status that is neither active nor terminal: not live
        s.add(r)
        s.commit()
    assert reap(db, api) == [pod]
    with db.session() as s:
        r = s.get(Run, run_id)
    assert r.status == "reaped" and r.ended_at is not None and "reaper" in r.error


def test_background_reaper(fake, api, db):
    pod, _ = api.create_pod_with_fallback("tuner-orphan", "img", {})
    reaper = Reaper(db, api, interval_s=0.05).start()
    try:
        deadline = time.monotonic() + 10
        while fake.live_pods() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert fake.live_pods() == []
        pod2, _ = api.create_pod_with_fallback("tuner-orphan-2", "img", {})
        deadline = time.monotonic() + 10
        while fake.live_pods() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert fake.live_pods() == []
    finally:
        reaper.stop()
    assert reaper.passes >= 2 and set(reaper.reaped) == {pod, pod2}
