"""End-to-end tests of the pod training program (jobs/train.py) as a real subprocess over HTTP.

CPU only: a tiny random Llama + locally trained tokenizer (no hub), a learnable task
("reverse: a b c" -> "c b a"), a few dozen steps.
"""

from __future__ import annotations

import io
import json
import os
import random
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from jobs.podproto import ADAPTER_ARTIFACT, TERMINAL_STATES, Progress, Results

REPO = Path(__file__).resolve().parent.parent
TOKEN = "pod-secret-token-4f9a"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Pod:
    def __init__(self, proc: subprocess.Popen[bytes], base: str, log_path: Path) -> None:
        self.proc, self.base, self.log_path = proc, base, log_path
        self.http = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def progress(self) -> Progress:
        r = self.http.get("/progress")
        assert r.status_code == 200, r.text
        return Progress.model_validate_json(r.content)

    def wait(self, pred: Callable[[Progress], bool], timeout: float = 120) -> Progress:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"pod process died:\n{self.log()[-3000:]}"
            p = self.progress()
            if pred(p):
                return p
            time.sleep(0.2)
        raise AssertionError(f"timed out; last progress {p!r}\n{self.log()[-3000:]}")


@pytest.fixture
def start_pod(tmp_path: Path) -> Iterator[Callable[..., Pod]]:
    pods: list[Pod] = []

    def start(as_script: bool = False) -> Pod:
        port = free_port()
        env = {
            **os.environ,
            "TUNER_POD_TOKEN": TOKEN,
            "TUNER_POD_PORT": str(port),
            "TUNER_WORKDIR": str(tmp_path / f"work{len(pods)}"),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "HF_TOKEN": "",
            "TOKENIZERS_PARALLELISM": "false",
        }
        cmd = [sys.executable, "jobs/train.py"] if as_script else [sys.executable, "-m", "jobs.train"]
        log_path = tmp_path / f"pod{len(pods)}.log"
        with log_path.open("wb") as fh:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
        pod = Pod(proc, f"http://127.0.0.1:{port}", log_path)
        pods.append(pod)
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, f"pod exited early:\n{pod.log()}"
            try:
                if httpx.get(f"{pod.base}/health", timeout=2).json() == {"ok": True}:
                    return pod
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"pod never became healthy:\n{pod.log()}"
            time.sleep(0.1)

    try:
        yield start
    finally:
        for pod in pods:
            pod.http.close()
            pod.proc.terminate()
            try:
                pod.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pod.proc.kill()
                pod.proc.wait(timeout=10)


def reverse_rows(n: int, rng: random.Random) -> list[dict[str, Any]]:
    rows = []
    for _ in range(n):
        words = [rng.choice("abcdef") for _ in range(rng.randint(2, 4))]
        rows.append(
            {
                "messages": [
                    {"role": "system", "content": "You reverse lists."},
                    {"role": "user", "content": "reverse: " + " ".join(words)},
                    {"role": "assistant", "content": " ".join(reversed(words))},
                ]
            }
        )
    return rows


def job_body(job_id: str, **config: Any) -> dict[str, Any]:
    rng = random.Random(7)
    train, val = reverse_rows(96, rng), reverse_rows(16, rng)
    prompts = [{"id": f"p{i}", "messages": row["messages"][:-1]} for i, row in enumerate(reverse_rows(3, rng))]
    cfg = {
        "job_id": job_id,
        "tiny_random_model": True,
        "max_seq_len": 64,
        "batch_size": 8,
        "learning_rate": 5e-3,
        "max_steps": 50,
        "eval_steps": 10,
        "early_stopping_patience": 3,
        "max_new_tokens": 10,
        "hf_repo": "someone/never-pushed",
        **config,
    }
    return {"config": cfg, "train": train, "val": val, "eval_prompts": prompts}


def check_adapter_tarball(pod: Pod) -> None:
    r = pod.http.get(f"/artifacts/{ADAPTER_ARTIFACT}")
    assert r.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(r.content), mode="r:gz") as tar:
        names = {Path(n).name: tar.getmember(n) for n in tar.getnames()}
        assert "adapter_config.json" in names
        assert names["adapter_model.safetensors"].size > 1000
        cfg = json.load(tar.extractfile(names["adapter_config.json"]))  # type: ignore[arg-type]
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 16


def test_train_succeeds_with_decreasing_eval_loss(start_pod: Callable[..., Pod]) -> None:
    pod = start_pod()
    body = job_body("job-ok")

    # auth: /health is open, everything else needs the bearer token
    assert httpx.get(f"{pod.base}/progress").status_code == 401
    assert httpx.get(f"{pod.base}/progress", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert httpx.post(f"{pod.base}/job", json=body, headers={"Authorization": "Bearer nope"}).status_code == 401
    assert pod.progress().state == "waiting"
    assert pod.http.post("/stop").status_code == 202  # no job yet: must not pre-stop the next one

    r = pod.http.post("/job", json=body)
    assert r.status_code == 202, r.text
    assert Progress.model_validate_json(r.content).job_id == "job-ok"
    assert pod.http.post("/job", json=body).status_code == 200  # same job id: no-op
    assert pod.http.post("/job", json=job_body("other")).status_code == 409
    assert pod.http.get("/results").status_code == 409  # not finished yet

    p = pod.wait(lambda p: p.state in TERMINAL_STATES)
    assert p.state == "succeeded", p.error
    assert p.backend == "transformers"
    assert p.max_steps == 50 and p.step == 50
    steps = [s for s, _ in p.eval_loss]
    losses = [loss for _, loss in p.eval_loss]
    assert steps == [10, 20, 30, 40, 50]
    assert len(p.train_loss) >= 3
    assert min(losses) < losses[0] * 0.8, losses  # the reversal task is learnable
    assert losses[-1] < losses[0]
    assert p.best_eval_loss == min(losses)
    assert p.best_step == steps[losses.index(min(losses))]

    res = Results.model_validate_json(pod.http.get("/results").content)
    assert res.state == "succeeded" and res.job_id == "job-ok"
    assert res.best_step == p.best_step and res.best_eval_loss == p.best_eval_loss
    assert res.extra["trainer_best_step"] == p.best_step
    assert res.extra["final_eval_loss"] == pytest.approx(p.best_eval_loss, rel=1e-4)  # best weights kept
    assert [g.id for g in res.generations] == ["p0", "p1", "p2"]
    assert all(isinstance(g.output, str) for g in res.generations)
    assert any(g.output.strip() for g in res.generations)
    assert res.artifacts == [ADAPTER_ARTIFACT]
    assert res.hf_repo is None and "hf_pushed" not in res.extra  # no HF_TOKEN: no push
    check_adapter_tarball(pod)
    merged = Path(res.extra["merged_dir"])  # save_merged defaults on: a plain 16-bit model dir
    assert json.loads((merged / "config.json").read_text())["model_type"] == "llama"
    assert (merged / "model.safetensors").stat().st_size > 10_000
    assert not (merged / "adapter_config.json").exists()
    assert pod.http.get("/artifacts/nope.tar.gz").status_code == 404
    assert pod.http.get("/artifacts/..%2Fpod0.log").status_code == 404
    assert TOKEN not in pod.log()


def test_stop_keeps_best_checkpoint(start_pod: Callable[..., Pod]) -> None:
    pod = start_pod()
    body = job_body("job-stop", max_steps=3000, early_stopping_patience=100, save_merged=False)
    assert pod.http.post("/job", json=body).status_code == 202
    pod.wait(lambda p: len(p.eval_loss) >= 2 or p.state in TERMINAL_STATES)

    r = pod.http.post("/stop")
    assert r.status_code == 202
    p = pod.wait(lambda p: p.state in TERMINAL_STATES)
    assert p.state == "stopped", p.error
    assert 20 <= p.step < 3000
    assert p.eta_s == 0.0
    losses = [loss for _, loss in p.eval_loss]
    assert p.eval_loss[-1][0] == p.step  # a final eval ran at the stop step
    assert p.best_eval_loss == min(losses)
    assert p.best_step == p.eval_loss[losses.index(min(losses))][0]

    res = Results.model_validate_json(pod.http.get("/results").content)
    assert res.state == "stopped"
    assert res.best_eval_loss == p.best_eval_loss and res.best_step == p.best_step
    assert res.extra["trainer_best_step"] == p.best_step
    assert res.extra["final_eval_loss"] == pytest.approx(p.best_eval_loss, rel=1e-4)
    assert "merged_dir" not in res.extra
    assert len(res.generations) == 3
    check_adapter_tarball(pod)


def test_bad_job_fails_and_server_keeps_answering(start_pod: Callable[..., Pod]) -> None:
    pod = start_pod(as_script=True)  # `python jobs/train.py` entry point
    assert pod.http.post("/job", content=b'{"config": {}}').status_code == 400
    assert pod.http.post("/job", content=b"not json").status_code == 400
    assert pod.progress().state == "waiting"

    body = job_body("job-bad")
    body["train"] = []
    assert pod.http.post("/job", json=body).status_code == 202
    p = pod.wait(lambda p: p.state in TERMINAL_STATES, timeout=30)
    assert p.state == "failed"
    assert p.error is not None and "train split is empty" in p.error
    assert pod.http.get("/results").status_code == 409
    assert pod.http.get(f"/artifacts/{ADAPTER_ARTIFACT}").status_code == 404
    assert httpx.get(f"{pod.base}/health").json() == {"ok": True}
    assert pod.http.post("/job", json=job_body("job-next")).status_code == 409


def test_assistant_turn_required(start_pod: Callable[..., Pod]) -> None:
    pod = start_pod()
    body = job_body("job-noanswer")
    body["val"][3]["messages"] = body["val"][3]["messages"][:-1]
    assert pod.http.post("/job", json=body).status_code == 202
    p = pod.wait(lambda p: p.state in TERMINAL_STATES, timeout=30)
    assert p.state == "failed" and p.error is not None and "val[3]" in p.error


def test_early_stopping_keeps_best_not_last(start_pod: Callable[..., Pod]) -> None:
    """8 training rows + a high learning rate overfit fast: val loss turns up, patience stops the
    run, and the model kept is the best checkpoint, not the last one."""
    pod = start_pod()
    body = job_body(
        "job-es", max_steps=400, eval_steps=5, batch_size=4, learning_rate=2e-2,
        early_stopping_patience=2, warmup_ratio=0.0, save_merged=False,
    )
    body["train"] = body["train"][:8]
    assert pod.http.post("/job", json=body).status_code == 202
    p = pod.wait(lambda p: p.state in TERMINAL_STATES)
    assert p.state == "succeeded", p.error
    assert p.step < 400  # stopped early
    steps = [s for s, _ in p.eval_loss]
    losses = [loss for _, loss in p.eval_loss]
    best_i = losses.index(min(losses))
    assert p.best_step == steps[best_i] and p.best_eval_loss == losses[best_i]
    assert len(losses) - 1 - best_i == 2  # exactly `patience` evals without improvement
    assert losses[-1] > p.best_eval_loss
    res = Results.model_validate_json(pod.http.get("/results").content)
    assert res.best_step == p.best_step < p.step
    final = res.extra["final_eval_loss"]
    assert final == pytest.approx(p.best_eval_loss, rel=1e-4)  # best weights reloaded...
    assert final != pytest.approx(losses[-1], rel=1e-3)  # ...not the last ones
