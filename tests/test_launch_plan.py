"""The spec drives the run: base model, GPUs, disk, CUDA, eval plan, time cap, exports.

Real runpod SDK -> FakeRunPod -> the real pod program (jobs/train.py) on CPU; what the
pod was sent is read back from the fake's proxy log (FakeRunPod.proxied).
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import select

from jobs.catalog import cuda_versions_for_image, lookup
from jobs.podproto import ADAPTER_ARTIFACT
from jobs.runpod_api import RunPodAPI
from jobs.training import TrainingService
from jobs.values import RunSnapshot
from storage.db import Database
from storage.models import Dataset, Example, Project, Run, SpendEntry, TaskSpecRow
from storage.settings import Settings
from tests.fakes.runpod_fake import FakeRunPod

TINY = {"tiny_random_model": True, "max_seq_len": 64, "batch_size": 8, "learning_rate": 5e-3}
EIGHT_B = "unsloth/Meta-Llama-3.1-8B-Instruct"
GPUS_48 = ["NVIDIA A40", "NVIDIA RTX A6000", "NVIDIA L40S"]


def seed(db: Database, spec: dict[str, Any], *, n_train: int = 90, n_val: int = 16,
         n_test: int = 4) -> tuple[int, int]:
    rng = random.Random(5)
    with db.session() as s:
        p = Project(thread_id="T:C:9", team_id="T", channel_id="C", thread_ts="9", created_by="U")
        s.add(p)
        s.commit()
        s.refresh(p)
        s.add(TaskSpecRow(project_id=p.id, approved=True,
                          spec={"system_prompt": "You reverse lists.", **spec}))
        d = Dataset(project_id=p.id)
        s.add(d)
        s.commit()
        s.refresh(d)
        for i in range(n_train + n_val + n_test):
            words = [rng.choice("abcdef") for _ in range(rng.randint(2, 4))]
            split = "train" if i < n_train else ("val" if i < n_train + n_val else "test")
            s.add(Example(project_id=p.id, dataset_id=d.id, prompt="reverse: " + " ".join(words),
                          response=" ".join(reversed(words)), split=split, content_hash=f"h{i}"))
        s.commit()
        return int(p.id), int(d.id)


def service(db: Database, tmp_path: Path, cfg: dict[str, Any], **kw: Any) -> TrainingService:
    base: dict[str, Any] = dict(_env_file=None, tuner_cloud_types="SECURE", tuner_poll_interval_s=0.2,
                                tuner_pod_ready_timeout_s=60, tuner_train_overrides=json.dumps(cfg))
    base.update(kw)
    settings = Settings(**base)
    return TrainingService(db, settings, RunPodAPI(settings), tmp_path / "artifacts")


def job_sent(fake: FakeRunPod, pod_id: str) -> dict[str, Any]:
    bodies = [b for pid, m, path, b in fake.proxied if pid == pod_id and m == "POST" and path == "/job"]
    assert bodies, "the pod never received a job"
    return json.loads(bodies[0])


def posted(fake: FakeRunPod, pod_id: str, path: str) -> int:
    return sum(1 for pid, m, p, _ in fake.proxied if pid == pod_id and m == "POST" and p == path)


def pod_rows(db: Database) -> list[SpendEntry]:
    with db.session() as s:
        return list(s.exec(select(SpendEntry).where(SpendEntry.kind == "pod_seconds")))


def only_pod(fake: FakeRunPod) -> str:
    (pod_id,) = list(fake.pods)
    return pod_id


def test_spec_model_reaches_the_job_with_its_gpus_disk_cuda_and_eval_plan(fake_runpod, db, tmp_path):
    fake = fake_runpod
    fake.prices["NVIDIA L40S"] = (0.86, 0.79)
    fake.host_cuda["NVIDIA A40"] = "11.8"  # its hosts' driver is too old for the image
    fake.capacity = {"NVIDIA A40", "NVIDIA L40S"}  # A6000 full; A40 free but refused on CUDA
    pid, did = seed(db, {"base_model": EIGHT_B, "max_output_tokens": 24})
    svc = service(db, tmp_path, {**TINY, "num_epochs": 1.0})
    est = svc.estimate(pid, did)
    assert est.base_model == EIGHT_B and est.gpu_type == "NVIDIA A40"  # cheapest of the class
    run_id = svc.launch(pid, did, user_id="U1")
    out = svc.run(run_id, lambda s: None)
    pod_id = only_pod(fake)
    assert out.status == "succeeded", (out.error, fake.pod_log(pod_id))

    cfg = job_sent(fake, pod_id)["config"]
    assert cfg["base_model"] == EIGHT_B  # the spec's model, not the default
    assert cfg["max_new_tokens"] == 24  # the spec's max_output_tokens
    # 90 rows / batch 8 = 12 steps; the plan asks for at most 10 evals (+ the final one)
    assert cfg["eval_steps"] == 4 and 12 // cfg["eval_steps"] <= 10
    with db.session() as s:
        run = s.get(Run, run_id)
    assert run.config["plan"]["eval_steps"] == 4
    evals = [step for step, _ in out_evals(db, run_id)]
    assert evals == [4, 8, 12]

    pod = fake.pods[pod_id]
    assert [g for g, _ in fake.create_attempts] == GPUS_48  # the 48 GB class, cheapest first
    assert pod.gpu_type == "NVIDIA L40S"
    assert pod.container_disk_gb == lookup(EIGHT_B).pod_disk_gb() >= 60
    assert pod.allowed_cuda == cuda_versions_for_image(svc.settings.tuner_pod_image)
    assert "11.8" not in pod.allowed_cuda and "12.8" in pod.allowed_cuda
    assert fake.live_pods() == []


def out_evals(db: Database, run_id: int) -> list[tuple[int, float]]:
    from storage.models import MetricPoint

    with db.session() as s:
        rows = s.exec(select(MetricPoint).where(MetricPoint.run_id == run_id,
                                                MetricPoint.kind == "eval")).all()
    return sorted((m.step, m.loss) for m in rows)


def test_gpu_types_setting_overrides_the_catalog(fake_runpod_gql, db, tmp_path):
    pid, did = seed(db, {"base_model": EIGHT_B})
    svc = service(db, tmp_path, TINY, tuner_gpu_types="NVIDIA RTX A5000")
    assert svc.estimate(pid, did).gpu_type == "NVIDIA RTX A5000"
    with db.session() as s:
        run = s.get(Run, svc.launch(pid, did, user_id="U1"))
    assert run.config["plan"]["gpu_types"] == ["NVIDIA RTX A5000"]


def test_bot_stops_the_run_at_its_time_cap_and_keeps_the_best_checkpoint(fake_runpod, db, tmp_path):
    fake = fake_runpod
    pid, did = seed(db, {})
    # the pod's own training cap is switched off: only the bot's cap can stop this run
    cfg = {**TINY, "max_steps": 3000, "eval_steps": 5, "early_stopping_patience": 0,
           "max_new_tokens": 4, "max_train_s": 0}
    svc = service(db, tmp_path, cfg, tuner_max_run_hours=0.012)  # 43 s: stop at ~22 s
    run_id = svc.launch(pid, did, user_id="U1")
    with db.session() as s:
        plan = s.get(Run, run_id).config["plan"]
    assert plan["cap_s"] == pytest.approx(43.2) and plan["stop_at_s"] == pytest.approx(21.6)
    out = svc.run(run_id, lambda s: None)
    pod_id = only_pod(fake)
    assert out.status == "stopped", (out.error, fake.pod_log(pod_id))
    assert out.stop_reason == "time_cap" and posted(fake, pod_id, "/stop") >= 1
    note = " ".join(out.notes)
    assert "stopped at its time cap" in note and "best checkpoint" in note and "was kept" in note
    assert out.best_step is not None and (Path(out.artifact_uri) / ADAPTER_ARTIFACT).exists()
    with db.session() as s:
        run = s.get(Run, run_id)
    assert pod_seconds_of(run) < plan["cap_s"]
    assert fake.live_pods() == [] and len(pod_rows(db)) == 1


def pod_seconds_of(run: Run) -> float:
    return (run.ended_at - run.started_at).total_seconds()


def test_pod_caps_its_own_training_with_max_train_s(fake_runpod, db, tmp_path):
    fake = fake_runpod
    pid, did = seed(db, {})
    cfg = {**TINY, "max_steps": 3000, "eval_steps": 5, "early_stopping_patience": 0,
           "max_new_tokens": 4}
    # cap 180 s, the bot would stop at 90 s; the pod's training cap is far earlier
    svc = service(db, tmp_path, cfg, tuner_max_run_hours=0.05)
    run_id = svc.launch(pid, did, user_id="U1")
    out = svc.run(run_id, lambda s: None)
    pod_id = only_pod(fake)
    sent = job_sent(fake, pod_id)["config"]
    with db.session() as s:
        plan = s.get(Run, run_id).config["plan"]
    assert 0 < sent["max_train_s"] == plan["max_train_s"] < plan["stop_at_s"]
    assert out.status == "stopped", (out.error, fake.pod_log(pod_id))
    assert out.stop_reason == "time_cap" and posted(fake, pod_id, "/stop") == 0
    assert any("stopped at its time cap" in n for n in out.notes)
    assert fake.live_pods() == []


def test_pod_that_cannot_be_stopped_is_terminated_at_the_cap(fake_runpod, db, tmp_path):
    fake = fake_runpod
    fake.proxy_status["/stop"] = 502  # Cloudflare: the stop never reaches the pod
    pid, did = seed(db, {})
    cfg = {**TINY, "max_steps": 100000, "eval_steps": 50, "early_stopping_patience": 0,
           "max_train_s": 0}
    svc = service(db, tmp_path, cfg, tuner_max_run_hours=0.008)  # 28.8 s
    run_id = svc.launch(pid, did, user_id="U1")
    out = svc.run(run_id, lambda s: None)
    pod_id = only_pod(fake)
    assert out.status == "failed" and "time cap" in out.error and "terminated" in out.error
    assert "RunTimeCapError" not in out.error  # plain words, not a type name
    assert posted(fake, pod_id, "/stop") >= 1 and fake.live_pods() == []
    billed = fake.billed_seconds(pod_id)
    assert billed < 28.8 + 15  # terminated at the cap, not left running
    time.sleep(0.3)
    assert fake.billed_seconds(pod_id) == billed
    assert len(pod_rows(db)) == 1


def test_push_failure_is_reported_when_training_ends_and_no_hub_uri_is_kept(fake_runpod, db, tmp_path):
    fake = fake_runpod
    pid, did = seed(db, {})
    cfg = {**TINY, "max_steps": 6, "eval_steps": 3, "max_new_tokens": 4}
    svc = service(db, tmp_path, cfg, hf_token="hf_push_secret_0123456789abcdef",
                  tuner_hf_namespace="acme")
    run_id = svc.launch(pid, did, user_id="U1")
    out = svc.run(run_id, lambda s: None)
    pod_id = only_pod(fake)
    assert out.status == "succeeded", (out.error, fake.pod_log(pod_id))
    assert job_sent(fake, pod_id)["config"]["hf_repo"] == f"acme/tuner-p{pid}-r{run_id}"
    text = " ".join(out.notes)
    # the pod runs offline (HF_HUB_OFFLINE=1), so its Hub push fails: said now, with the fix
    assert "Pushing the model to the Hugging Face Hub failed" in text
    assert "huggingface.co" in text or "HF_TOKEN" in text
    assert "hf_push_secret" not in text
    with db.session() as s:
        run = s.get(Run, run_id)
    assert not (run.artifact_uri or "").startswith("hf://") and out.hf_repo is None
    assert run.config["hf_repo"] is None and run.config["export"]["push_error"]


def test_missing_cuda_fails_fast_in_plain_words_and_the_pod_is_terminated(fake_runpod, db, tmp_path):
    """A real (non-tiny) job on this CPU-only machine: the pod's CUDA guard must fire."""
    fake = fake_runpod
    pid, did = seed(db, {"base_model": EIGHT_B})
    svc = service(db, tmp_path, {"max_seq_len": 256})
    run_id = svc.launch(pid, did, user_id="U1")
    failed_seen: list[float] = []

    def watch(snap: RunSnapshot) -> None:
        if snap.state == "failed" and not failed_seen:
            failed_seen.append(time.monotonic())

    out = svc.run(run_id, watch)
    pod_id = only_pod(fake)
    sent = job_sent(fake, pod_id)["config"]
    assert sent["require_cuda"] is True and sent["tiny_random_model"] is False
    assert out.status == "failed", fake.pod_log(pod_id)
    assert "could not use its GPU" in out.error and "driver" in out.error, out.error
    assert "nothing more is billed" in out.error
    pod = fake.pods[pod_id]
    assert failed_seen and not pod.alive
    assert pod.ended_at - failed_seen[0] < 60  # terminated within a minute of the report
    billed = fake.billed_seconds(pod_id)
    time.sleep(0.3)
    assert fake.billed_seconds(pod_id) == billed and len(pod_rows(db)) == 1
