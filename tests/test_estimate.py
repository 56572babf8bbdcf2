"""The run estimate (jobs/estimate.py), the catalog's GPU/CUDA choices, and the launch card
estimate TrainingService computes from the approved spec."""

from __future__ import annotations

import json
import random

import pytest

from jobs.catalog import (
    SUPPORTED,
    cuda_versions_for_image,
    gpu_spec,
    gpu_types_for,
    lookup,
)
from jobs.estimate import (
    MAX_EVALS,
    TEMPLATE_TOKENS,
    Workload,
    estimate_run,
    expected_batch_max,
    plan_eval_steps,
    row_tokens,
)
from jobs.runpod_api import RunPodAPI
from jobs.training import TrainingService
from storage.db import Database
from storage.models import Dataset, Example, Project, TaskSpecRow
from storage.settings import Settings

A40, H100 = gpu_spec("NVIDIA A40"), gpu_spec("NVIDIA H100 80GB HBM3")
SIZES = ["unsloth/Llama-3.2-1B-Instruct", "unsloth/Llama-3.2-3B-Instruct",
         "unsloth/Meta-Llama-3.1-8B-Instruct"]


def seed_workload(n: int = 1000, mean: int = 600, *, spread: int = 120) -> Workload:
    rng = random.Random(1)
    return Workload(train_tokens=[max(8, int(rng.gauss(mean, spread))) for _ in range(n)],
                    val_tokens=[max(8, int(rng.gauss(mean, spread))) for _ in range(150)],
                    gen_tokens=[max(4, int(rng.gauss(mean / 2, spread / 2))) for _ in range(50)])


def test_estimate_grows_with_model_size_and_shrinks_on_a_faster_gpu():
    w = seed_workload()
    for gpu in (A40, H100):
        times = [estimate_run(lookup(m), gpu, w) for m in SIZES]
        assert [e.train_s for e in times] == sorted(e.train_s for e in times)
        assert times[0].total_s < times[1].total_s < times[2].total_s
    for m in SIZES:
        assert estimate_run(lookup(m), H100, w).train_s < estimate_run(lookup(m), A40, w).train_s


def test_padding_and_template_tokens_are_counted():
    rng = random.Random(2)
    even = Workload(train_tokens=[600] * 800, val_tokens=[600] * 100, gen_tokens=[100] * 10)
    ragged = Workload(train_tokens=[rng.choice([300, 900]) for _ in range(800)],
                      val_tokens=[600] * 100, gen_tokens=[100] * 10)
    model = lookup(SIZES[0])
    # same mean length, but each batch pads to its longest row
    assert estimate_run(model, A40, ragged).train_s > estimate_run(model, A40, even).train_s * 1.3
    assert expected_batch_max([300, 900], 8) == 900  # the batch holds both rows
    # 4 rows, batches of 2: max is 900 unless both are 300s (1 pair in 6)
    assert expected_batch_max([300, 300, 900, 900], 2) == pytest.approx(900 - 600 / 6)
    assert row_tokens(400, "llama-3") == 100 + TEMPLATE_TOKENS["llama-3"]
    assert row_tokens(400, "phi-4") < row_tokens(400, "llama-3")


def test_eval_passes_are_counted_and_at_most_ten_plus_final():
    model = lookup(SIZES[2])
    w = seed_workload()
    e = estimate_run(model, A40, w)
    assert 1 <= e.steps // e.eval_steps <= MAX_EVALS and e.n_evals == e.steps // e.eval_steps + 1
    assert 0 < e.eval_s <= 0.2 * e.train_s
    # every 20 steps (today's default) would be 18 passes + final: the estimate counts them
    forced = estimate_run(model, A40, Workload(**{**w.__dict__, "eval_steps": 20}))
    assert forced.n_evals == e.steps // 20 + 1 > e.n_evals and forced.eval_s > e.eval_s
    for steps in (1, 7, 12, 375, 10_000):
        n = plan_eval_steps(steps, train_pass_tokens=1e6, val_pass_tokens=1e3, epochs=3)
        assert steps // n <= MAX_EVALS


def test_generation_uses_max_new_tokens_and_push_costs_export_time():
    model = lookup(SIZES[2])
    w = seed_workload()
    short = estimate_run(model, A40, Workload(**{**w.__dict__, "max_new_tokens": 64}))
    assert short.generate_s < estimate_run(model, A40, w).generate_s
    pushed = estimate_run(model, A40, Workload(**{**w.__dict__, "push": True}))
    assert pushed.export_s > estimate_run(model, A40, w).export_s + 300  # 16 GB down + up


def test_gpu_class_disk_and_cuda_from_the_catalog():
    for m in SUPPORTED:
        if m.params_b <= 8.1:
            assert gpu_types_for(m)[0] == "NVIDIA A40" and "NVIDIA L40S" in gpu_types_for(m)
        # an 8B merge downloads 16-bit weights and writes 16-bit weights: ~4.7 bytes/param
        assert m.pod_disk_gb() >= m.params_b * 4.7 + 20
        assert m.pod_disk_gb(gguf=True) >= m.pod_disk_gb()
    assert lookup(SIZES[2]).pod_disk_gb(gguf=True) > lookup(SIZES[2]).pod_disk_gb()
    assert cuda_versions_for_image("unsloth/unsloth:2026.10.9-core") == ["12.8", "12.9", "13.0"]
    assert cuda_versions_for_image("runpod/pytorch:2.4.0-py3.11-cuda12.4.1-devel")[0] == "12.4"
    assert cuda_versions_for_image("x", ["12.6"]) == ["12.6"]
    with pytest.raises(ValueError, match="RunPod knows"):
        cuda_versions_for_image("x", ["12.10"])


def _seed(db: Database, model: str) -> tuple[int, int]:
    with db.session() as s:
        p = Project(thread_id=f"T:C:{model}", team_id="T", channel_id="C", thread_ts=model,
                    created_by="U")
        s.add(p)
        s.commit()
        s.refresh(p)
        s.add(TaskSpecRow(project_id=p.id, approved=True,
                          spec={"system_prompt": "Be brief.", "base_model": model}))
        d = Dataset(project_id=p.id)
        s.add(d)
        s.commit()
        s.refresh(d)
        for i in range(200):
            split = "train" if i < 160 else ("val" if i < 190 else "test")
            s.add(Example(project_id=p.id, dataset_id=d.id, prompt="q " * 300, response="a " * 300,
                          split=split, content_hash=f"{model}{i}"))
        s.commit()
        return int(p.id), int(d.id)


def test_launch_estimate_follows_the_specs_base_model(fake_runpod_gql, db, tmp_path):
    settings = Settings(_env_file=None, tuner_gpu_types="NVIDIA A40", tuner_cloud_types="SECURE",
                        tuner_train_overrides=json.dumps({"batch_size": 8}))
    svc = TrainingService(db, settings, RunPodAPI(settings), tmp_path / "artifacts")
    cards = [svc.estimate(*_seed(db, m)) for m in SIZES]
    assert [c.base_model for c in cards] == SIZES
    minutes = [c.est_minutes for c in cards]
    assert minutes[0] < minutes[1] < minutes[2], minutes
    assert cards[2].est_usd > cards[0].est_usd and all(c.cap_minutes >= c.est_minutes for c in cards)
