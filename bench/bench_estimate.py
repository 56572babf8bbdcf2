"""Useful training seconds / billed seconds and $ per run, from the launch card's estimate.

The seed workload (1000 train rows of ~600 tokens with the chat template, 150 validation
rows, 3 epochs, 50 held-out prompts) is stored in a temporary SQLite database and priced
through TrainingService.plan_launch, the same code the launch card and the run's time cap
use (jobs/run_plan.py -> jobs/estimate.py), for 1B, 3B and 8B models on an A40 and an
H100. GPU prices come from a loopback FakeRunPod holding RunPod's list prices
(jobs/runpod_api.FALLBACK_PRICES); no network is used.

"useful" = forward/backward on training tokens; "billed" = pod creation to termination
(boot + image pull, model download/load, training, evaluations, held-out generation,
export, teardown). Two export cases: adapter only, and the 16-bit merge pushed to the Hub
(what Deploy needs). Target: useful/billed >= 0.8 for 8B on an A40.

Run: .venv/bin/python bench/bench_estimate.py
"""

from __future__ import annotations

import json
import os
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.runpod_api import FALLBACK_PRICES, RunPodAPI  # noqa: E402
from jobs.training import TrainingService  # noqa: E402
from storage.db import Database  # noqa: E402
from storage.models import Dataset, Example, Project, TaskSpecRow  # noqa: E402
from storage.settings import Settings  # noqa: E402
from tests.fakes.runpod_fake import FakeRunPod  # noqa: E402

MODELS = {"1B": "unsloth/Llama-3.2-1B-Instruct", "3B": "unsloth/Llama-3.2-3B-Instruct",
          "8B": "unsloth/Meta-Llama-3.1-8B-Instruct"}
GPUS = {"A40": "NVIDIA A40", "H100": "NVIDIA H100 80GB HBM3"}
SYSTEM = "You answer customer questions about our product in a friendly, precise way. " * 2
TARGET = 0.8


def seed(db: Database, model: str) -> tuple[int, int]:
    """~600 tokens per row: llama-3 template (36) + ~2,260 characters at 4 chars/token."""
    rng = random.Random(7)
    with db.session() as s:
        p = Project(thread_id=f"bench:{model}", team_id="T", channel_id="C", thread_ts=model,
                    created_by="bench")
        s.add(p)
        s.commit()
        s.refresh(p)
        s.add(TaskSpecRow(project_id=p.id, approved=True,
                          spec={"system_prompt": SYSTEM, "base_model": model,
                                "max_output_tokens": 1024}))
        d = Dataset(project_id=p.id)
        s.add(d)
        s.commit()
        s.refresh(d)
        for i in range(1000 + 150 + 50):
            total = max(400, int(rng.gauss(2256, 400))) - len(SYSTEM)
            prompt_chars = int(total * 0.55)
            split = "train" if i < 1000 else ("val" if i < 1150 else "test")
            s.add(Example(project_id=p.id, dataset_id=d.id, prompt="w" * prompt_chars,
                          response="r" * (total - prompt_chars), split=split,
                          content_hash=f"{model}-{i}"))
        s.commit()
        return int(p.id), int(d.id)


def main() -> None:
    prices = {g: (FALLBACK_PRICES[g], FALLBACK_PRICES[g]) for g in GPUS.values()}
    with FakeRunPod.running(run_pods=False, prices=prices) as fake, \
            tempfile.TemporaryDirectory() as tmp:
        os.environ.update(fake.env())
        db = Database(f"sqlite:///{tmp}/bench.db")
        projects = {size: seed(db, mid) for size, mid in MODELS.items()}
        print(f"{'model':5} {'gpu':5} {'export':8} {'useful s':>9} {'billed s':>9} "
              f"{'useful/billed':>13} {'$':>7}  breakdown (boot/load/train/eval/gen/export/teardown s)")
        for gname, gid in GPUS.items():
            for push in (False, True):
                hub = {"hf_token": "hf_" + "x" * 30, "tuner_hf_namespace": "bench"} if push else {}
                settings = Settings(_env_file=None, tuner_gpu_types=gid, tuner_cloud_types="SECURE",
                                    tuner_train_overrides=json.dumps({"num_epochs": 3}), **hub)
                svc = TrainingService(db, settings, RunPodAPI(settings), Path(tmp) / "art")
                for size, (pid, did) in projects.items():
                    card, plan, est = svc.plan_launch(pid, did)
                    parts = "/".join(f"{x:.0f}" for x in (est.boot_s, est.load_s, est.train_s,
                                                          est.eval_s, est.generate_s, est.export_s,
                                                          est.teardown_s))
                    print(f"{size:5} {gname:5} {'hub' if push else 'adapter':8} {est.train_s:9.0f} "
                          f"{est.total_s:9.0f} {est.useful_fraction:13.2f} {card.est_usd:7.2f}  "
                          f"{parts}  ({est.steps} steps, {est.n_evals} evals, "
                          f"cap {plan.cap_s / 60:.0f} min)")
        print()
        for push in (False, True):
            hub = {"hf_token": "hf_" + "x" * 30, "tuner_hf_namespace": "bench"} if push else {}
            settings = Settings(_env_file=None, tuner_gpu_types=GPUS["A40"],
                                tuner_cloud_types="SECURE", **hub)
            svc = TrainingService(db, settings, RunPodAPI(settings), Path(tmp) / "art")
            ratio = svc.plan_launch(*projects["8B"])[2].useful_fraction
            verdict = "meets" if ratio >= TARGET else "MISSES"
            print(f"8B on A40, {'merged + Hub push' if push else 'adapter only'}: "
                  f"useful/billed {ratio:.2f} {verdict} the {TARGET} target")


if __name__ == "__main__":
    main()
