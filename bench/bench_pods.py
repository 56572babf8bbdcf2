"""Pod billing bench on the loopback FakeRunPod (CPU, tiny random model).

1. One tiny run: billed pod seconds (fake's create->terminate clock) vs training
   seconds (pod-reported elapsed) vs the seconds in our spend ledger.
2. kill -9 of a process running TrainingService.run mid-training, then the bot's
   start-up sequence: one reaper pass, then resume of the runs that were in flight
   (re-attach). Prints live pods after each step; "leaked" = pods left alive at the end.
3. terminate_pod failing persistently at the end of a run: the run ends, the pod is not
   billed yet; a later reaper pass terminates it and bills up to that moment. Prints
   ledger seconds vs the fake's create->terminate seconds.

Run: .venv/bin/python bench/bench_pods.py
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlmodel import select  # noqa: E402

from jobs.reaper import reap  # noqa: E402
from jobs.runpod_api import RunPodAPI  # noqa: E402
from jobs.training import TrainingService  # noqa: E402
from jobs.values import RunSnapshot  # noqa: E402
from storage.db import Database  # noqa: E402
from storage.models import Run, SpendEntry  # noqa: E402
from storage.settings import Settings  # noqa: E402
from tests.fakes.runpod_fake import FakeRunPod  # noqa: E402
from tests.test_training import TRAIN_CFG, seed  # noqa: E402


def settings(**kw: object) -> Settings:
    return Settings(_env_file=None, tuner_gpu_types="NVIDIA RTX A5000", tuner_cloud_types="SECURE",
                    tuner_poll_interval_s=0.2, tuner_pod_ready_timeout_s=120,
                    # RunPod retry backoff scaled down like the poll interval
                    tuner_runpod_backoff_s=0.05, tuner_runpod_backoff_max_s=1.0,
                    tuner_train_overrides=json.dumps(kw or TRAIN_CFG))


def service(db: Database, tmp: Path, **kw: object) -> TrainingService:
    s = settings(**kw)
    return TrainingService(db, s, RunPodAPI(s), tmp / "artifacts")


def child(db_url: str, run_id: int, tmp: str) -> None:
    db = Database(db_url)
    service(db, Path(tmp), **{**TRAIN_CFG, "max_steps": 5000}).run(run_id, lambda s: None)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, force=True)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    tmp = Path(tempfile.mkdtemp(prefix="bench-pods-"))
    with FakeRunPod.running(workroot=tmp / "pods") as fake, fake.patched_env():
        # 1. one tiny run
        db = Database(f"sqlite:///{tmp / 'a.db'}")
        pid, did = seed(db)
        svc = service(db, tmp)
        run_id = svc.launch(pid, did, user_id="bench")
        seen: list[tuple[float, RunSnapshot]] = []
        t0 = time.monotonic()
        out = svc.run(run_id, lambda s: seen.append((time.monotonic(), s)))
        wall = time.monotonic() - t0
        pod_id = next(iter(fake.pods))
        with db.session() as s:
            ledger = s.exec(select(SpendEntry).where(SpendEntry.kind == "pod_seconds")).all()
        t_train = [t for t, s in seen if s.state == "training"]
        t_done = [t for t, s in seen if s.state in ("generating", "succeeded", "stopped")]
        train_s = (t_done[0] - t_train[0]) if t_train and t_done else float("nan")
        billed = fake.billed_seconds(pod_id)
        print(f"[tiny run] status={out.status} steps={seen[-1][1].step if seen else 0} run() wall={wall:.1f}s")
        print(f"[tiny run] training seconds (state=training, client clock) = {train_s:.2f}")
        print(f"[tiny run] billed pod seconds (fake create->terminate)     = {billed:.2f}"
              f"  ratio billed/training = {billed / train_s:.2f}")
        print(f"[tiny run] ledger pod seconds = {sum(e.quantity for e in ledger):.2f} "
              f"in {len(ledger)} row(s), usd={sum(e.usd for e in ledger):.6f}")

        # 2. kill -9 mid-training, then start-up: reaper + resume
        db2_url = f"sqlite:///{tmp / 'b.db'}"
        db2 = Database(db2_url)
        pid2, did2 = seed(db2)
        svc2 = service(db2, tmp, **{**TRAIN_CFG, "max_steps": 5000})
        run2 = svc2.launch(pid2, did2, user_id="bench")
        pods_before = len(fake.pods)
        proc = subprocess.Popen([sys.executable, __file__, "--child", db2_url, str(run2), str(tmp)],
                                env=os.environ.copy())
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with db2.session() as s:
                r = s.get(Run, run2)
            if r and r.status == "running":
                break
            time.sleep(0.2)
        time.sleep(1.0)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        before = len(fake.live_pods())
        reaped = reap(db2, RunPodAPI(settings()))
        after_reap = len(fake.live_pods())
        # Restarted bot resumes in-flight runs (re-attach); ask it to stop so the bench ends.
        resumed = []
        for rid in svc2.resumable_runs():
            svc2.request_stop(rid)
            resumed.append(svc2.run(rid, lambda s: None).status)
        leaked = len(fake.live_pods())
        print(f"[kill -9] live pods right after kill = {before}")
        print(f"[kill -9] reaper pass terminated {len(reaped)}; live pods after = {after_reap} "
              "(owned by an in-flight run: re-attached, not orphaned)")
        print(f"[kill -9] resumed runs -> {resumed}; pods created for this run = {len(fake.pods) - pods_before}")
        print(f"[kill -9] leaked pods = {leaked}")

        # 3. terminate keeps failing -> reaper terminates later, bills to real termination
        db3 = Database(f"sqlite:///{tmp / 'c.db'}")
        pid3, did3 = seed(db3)
        svc3 = service(db3, tmp, **{**TRAIN_CFG, "max_steps": 4, "eval_steps": 2})
        run3 = svc3.launch(pid3, did3, user_id="bench")
        fake.terminate_failures = 10_000
        status3 = svc3.run(run3, lambda s: None).status
        with db3.session() as s:
            pod3 = s.get(Run, run3).pod_id
        alive_after_run = pod3 in fake.live_pods()
        time.sleep(2.0)
        fake.terminate_failures = 0
        reaped3 = reap(db3, RunPodAPI(settings()))
        with db3.session() as s:
            rows3 = s.exec(select(SpendEntry).where(SpendEntry.kind == "pod_seconds")).all()
        print(f"[terminate fails] run status={status3}; pod alive after run={alive_after_run}; "
              f"reaper terminated {reaped3 == [pod3]}")
        print(f"[terminate fails] ledger seconds = {sum(e.quantity for e in rows3):.2f} in {len(rows3)} row(s); "
              f"fake billed = {fake.billed_seconds(pod3):.2f}; leaked = {pod3 in fake.live_pods()}")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        main()
