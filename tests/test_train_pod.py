"""End-to-end tests of the pod training program (jobs/train.py) as a real subprocess over HTTP.

CPU only: a tiny random Llama + locally trained tokenizer (no hub), a learnable task
("reverse: a b c" -> "c b a"), a few dozen steps.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import itertools
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

from jobs import train as pod
from jobs.podproto import (
    ADAPTER_ARTIFACT,
    TERMINAL_STATES,
    ChatRow,
    JobRequest,
    Progress,
    Results,
    TrainConfig,
)
from tests.fakes.hf_fake import FakeHub

REPO = Path(__file__).resolve().parent.parent
TOKEN = "pod-secret-token-4f9a"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Pod:
    def __init__(self, proc: subprocess.Popen[bytes], base: str, log_path: Path, workdir: Path) -> None:
        self.proc, self.base, self.log_path, self.workdir = proc, base, log_path, workdir
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

    def start(as_script: bool = False, env: dict[str, str] | None = None, workdir: Path | None = None) -> Pod:
        port = free_port()
        env = {
            **os.environ,
            "TUNER_POD_TOKEN": TOKEN,
            "TUNER_POD_PORT": str(port),
            "TUNER_WORKDIR": str(workdir or tmp_path / f"work{len(pods)}"),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "HF_TOKEN": "",
            "TOKENIZERS_PARALLELISM": "false",
            **(env or {}),
        }
        cmd = [sys.executable, "jobs/train.py"] if as_script else [sys.executable, "-m", "jobs.train"]
        log_path = tmp_path / f"pod{len(pods)}.log"
        with log_path.open("wb") as fh:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
        pod = Pod(proc, f"http://127.0.0.1:{port}", log_path, Path(env["TUNER_WORKDIR"]))
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
    assert res.artifacts == [ADAPTER_ARTIFACT] and res.export.adapter
    assert res.stop_reason is None and p.stop_reason is None and res.extra["eval_steps"] == 10
    check_adapter_tarball(pod)
    # hf_repo is set but the pod has no HF_TOKEN: nothing leaves the pod, so no 16-bit merge is built
    assert res.hf_repo is None and not res.export.merged and not res.export.pushed
    assert res.export.push_error == "not pushed: no HF_TOKEN on the pod" and res.extra["hf_error"] is None
    assert not (pod.workdir / "merged").exists()
    assert pod.http.get("/artifacts/nope.tar.gz").status_code == 404
    assert pod.http.get("/artifacts/..%2Fpod0.log").status_code == 404
    assert TOKEN not in pod.log()


def test_stop_keeps_best_checkpoint(start_pod: Callable[..., Pod]) -> None:
    pod = start_pod()
    # 200 planned steps: eval_steps 10 is widened to 20 (at most 10 evals a run)
    body = job_body("job-stop", max_steps=200, eval_steps=10, early_stopping_patience=100, save_merged=False)
    assert pod.http.post("/job", json=body).status_code == 202
    pod.wait(lambda p: len(p.eval_loss) >= 2 or p.state in TERMINAL_STATES, timeout=300)

    r = pod.http.post("/stop")
    assert r.status_code == 202
    p = pod.wait(lambda p: p.state in TERMINAL_STATES)
    assert p.state == "stopped" and p.stop_reason == "user", p.error
    assert 40 <= p.step < 200
    assert [s for s, _ in p.eval_loss][:2] == [20, 40]
    assert p.eta_s == 0.0
    losses = [loss for _, loss in p.eval_loss]
    assert p.eval_loss[-1][0] == p.step  # a final eval ran at the stop step
    assert p.best_eval_loss == min(losses)
    assert p.best_step == p.eval_loss[losses.index(min(losses))][0]

    res = Results.model_validate_json(pod.http.get("/results").content)
    assert res.state == "stopped" and res.stop_reason == "user"
    assert res.best_eval_loss == p.best_eval_loss and res.best_step == p.best_step
    assert res.extra["trainer_best_step"] == p.best_step
    assert res.extra["final_eval_loss"] == pytest.approx(p.best_eval_loss, rel=1e-4)
    assert not res.export.merged
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
    assert p.state == "failed" and p.error_code == "bad_job"
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
    assert p.state == "failed" and p.error is not None and "val[3]" in p.error and p.error_code == "bad_job"


def test_early_stopping_keeps_best_not_last(start_pod: Callable[..., Pod]) -> None:
    """8 training rows + a high learning rate overfit fast: val loss turns up, patience stops the
    run, and the model kept is the best checkpoint, not the last one."""
    pod = start_pod()
    body = job_body(
        "job-es", max_steps=100, eval_steps=10, batch_size=4, learning_rate=2e-2,
        early_stopping_patience=2, warmup_ratio=0.0, save_merged=False,
    )
    body["train"] = body["train"][:8]
    assert pod.http.post("/job", json=body).status_code == 202
    p = pod.wait(lambda p: p.state in TERMINAL_STATES, timeout=300)
    assert p.state == "succeeded" and p.stop_reason == "early_stopping", p.error
    assert p.step < 100  # stopped early
    steps = [s for s, _ in p.eval_loss]
    losses = [loss for _, loss in p.eval_loss]
    best_i = losses.index(min(losses))
    assert p.best_step == steps[best_i] and p.best_eval_loss == losses[best_i]
    assert len(losses) - 1 - best_i == 2  # exactly `patience` evals without improvement
    assert losses[-1] > p.best_eval_loss
    res = Results.model_validate_json(pod.http.get("/results").content)
    assert res.best_step == p.best_step < p.step and res.stop_reason == "early_stopping"
    final = res.extra["final_eval_loss"]
    assert final == pytest.approx(p.best_eval_loss, rel=1e-4)  # best weights reloaded...
    assert final != pytest.approx(losses[-1], rel=1e-3)  # ...not the last ones


# ---------------------------------------------------------------------------
# GPU-path decisions, checked on CPU as pure functions (no GPU, no unsloth needed)
# ---------------------------------------------------------------------------


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ROW = ChatRow(
    messages=[
        {"role": "system", "content": "You reverse lists."},
        {"role": "user", "content": "reverse: a b c"},
        {"role": "assistant", "content": "c b a"},
    ]
)


def gpu_plan(cfg: TrainConfig, **kw: Any) -> pod.Plan:
    base = {"cuda": True, "bf16_supported": True, "unsloth_ok": True, "bnb_ok": True}
    return pod.make_plan(cfg, **{**base, **kw})


@pytest.mark.parametrize("cuda,four_bit,unsloth_ok,bnb_ok", list(itertools.product([False, True], repeat=4)))
def test_plan_requests_4bit_exactly_on_cuda_with_load_in_4bit(
    cuda: bool, four_bit: bool, unsloth_ok: bool, bnb_ok: bool
) -> None:
    cfg = TrainConfig(job_id="j", load_in_4bit=four_bit)
    plan = pod.make_plan(cfg, cuda=cuda, bf16_supported=True, unsloth_ok=unsloth_ok, bnb_ok=bnb_ok)
    assert plan.backend == ("unsloth" if cuda and unsloth_ok else "transformers")
    assert plan.load_in_4bit == (cuda and four_bit and (unsloth_ok or bnb_ok))
    assert plan.cuda == cuda and plan.bf16 == cuda and not plan.fp16
    bnb = pod.bnb_config_kwargs(plan)
    assert (bnb is not None) == (plan.load_in_4bit and plan.backend == "transformers")
    load = pod.transformers_load_kwargs(plan, "hf_tok")
    assert load["token"] == "hf_tok"
    assert ("device_map" in load) == cuda and load.get("dtype") == ("bfloat16" if cuda else None)


def test_plan_precision_and_tiny_model_stays_on_cpu() -> None:
    cfg = TrainConfig(job_id="j")
    old_gpu = gpu_plan(cfg, bf16_supported=False)  # e.g. T4/V100: fp16 autocast, fp16 weights
    assert (old_gpu.dtype, old_gpu.fp16, old_gpu.bf16) == ("float16", True, False)
    tiny = gpu_plan(TrainConfig(job_id="j", tiny_random_model=True))
    assert tiny == pod.Plan(backend="transformers", cuda=False, dtype=None, load_in_4bit=False)
    probed = pod.probe_plan(TrainConfig(job_id="j"))  # this machine: torch CPU build
    if not probed.cuda:
        assert probed == pod.Plan(backend="transformers", cuda=False, dtype=None, load_in_4bit=False)


def test_bitsandbytes_config_is_nf4_double_quant_in_training_dtype() -> None:
    from transformers import BitsAndBytesConfig

    for bf16 in (True, False):
        plan = gpu_plan(TrainConfig(job_id="j"), unsloth_ok=False, bf16_supported=bf16)
        kw = pod.bnb_config_kwargs(plan)
        assert kw is not None and kw["bnb_4bit_compute_dtype"] == plan.dtype
        bnb = BitsAndBytesConfig(**{**kw, "bnb_4bit_compute_dtype": pod._torch_dtype(kw["bnb_4bit_compute_dtype"])})
        assert bnb.load_in_4bit and not bnb.load_in_8bit
        assert bnb.bnb_4bit_quant_type == "nf4" and bnb.bnb_4bit_use_double_quant
        assert str(bnb.bnb_4bit_compute_dtype) == f"torch.{plan.dtype}"


def test_unsloth_kwargs_follow_documented_api() -> None:
    cfg = TrainConfig(job_id="j", base_model="unsloth/Qwen2.5-0.5B-Instruct", max_seq_len=1024, seed=7)
    plan = gpu_plan(cfg)
    load = pod.unsloth_load_kwargs(cfg, plan, "hf_x")
    assert load == {
        "model_name": "unsloth/Qwen2.5-0.5B-Instruct",
        "max_seq_length": 1024,
        "dtype": "bfloat16",  # pinned: must agree with SFTConfig bf16/fp16
        "load_in_4bit": True,
        "token": "hf_x",
    }
    assert pod.unsloth_load_kwargs(TrainConfig(job_id="j", load_in_4bit=False), plan, None)["load_in_4bit"] == plan.load_in_4bit
    peft = pod.unsloth_peft_kwargs(cfg)
    assert (peft["r"], peft["lora_alpha"]) == (16, 16)  # TrainConfig defaults
    assert peft["use_gradient_checkpointing"] == "unsloth" and peft["random_state"] == 7 and peft["bias"] == "none"
    assert set(peft["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_lora_config_kwargs_build_a_peft_lora_config() -> None:
    from peft import LoraConfig

    lora = LoraConfig(**pod.lora_config_kwargs(TrainConfig(job_id="j", lora_r=8, lora_alpha=32)))
    assert (lora.r, lora.lora_alpha, lora.bias, lora.modules_to_save) == (8, 32, "none", None)
    assert lora.task_type == "CAUSAL_LM"


@pytest.mark.parametrize("backend", ["unsloth", "transformers-qlora", "transformers-cpu"])
def test_sft_config_evaluates_keeps_best_and_is_valid_for_installed_trl(backend: str, tmp_path: Path) -> None:
    from trl import SFTConfig

    cfg = TrainConfig(job_id="j", eval_steps=25, max_steps=200, warmup_ratio=0.1)
    plan = {
        "unsloth": gpu_plan(cfg),
        "transformers-qlora": gpu_plan(cfg, unsloth_ok=False, bf16_supported=False),
        "transformers-cpu": pod.make_plan(cfg, cuda=False, bf16_supported=False, unsloth_ok=True, bnb_ok=True),
    }[backend]
    kw = pod.sft_config_kwargs(cfg, plan, str(tmp_path), n_train=800)
    assert set(kw) <= {f.name for f in dataclasses.fields(SFTConfig)}, set(kw) - {f.name for f in dataclasses.fields(SFTConfig)}
    assert kw["eval_strategy"] == "steps" and kw["eval_steps"] == 25
    assert kw["save_strategy"] == "steps" and kw["save_steps"] == 25  # a checkpoint at every eval
    assert kw["load_best_model_at_end"] is True
    assert kw["metric_for_best_model"] == "eval_loss" and kw["greater_is_better"] is False
    assert kw["dataset_kwargs"] == {"skip_prepare_dataset": True} and kw["remove_unused_columns"] is False
    assert kw["warmup_steps"] == 20 and kw["max_length"] == cfg.max_seq_len
    assert (kw["bf16"], kw["fp16"], kw["use_cpu"]) == (plan.bf16, plan.fp16, not plan.cuda)
    if backend == "unsloth":
        assert kw["optim"] == "adamw_8bit" and kw["gradient_checkpointing"] is False
    elif backend == "transformers-qlora":
        assert kw["optim"] == "paged_adamw_8bit" and kw["gradient_checkpointing"] is True
        assert kw["gradient_checkpointing_kwargs"] == {"use_reentrant": False}
    else:
        assert kw["optim"] == "adamw_torch" and kw["gradient_checkpointing"] is False
    if plan.bf16:  # TrainingArguments refuses bf16 on a machine without a bf16 GPU
        kw = {**kw, "bf16": False, "use_cpu": True}
    args = SFTConfig(**kw)
    assert str(args.eval_strategy.value) == "steps" and args.load_best_model_at_end
    assert args.metric_for_best_model == "eval_loss" and args.greater_is_better is False
    assert args.optim.value == kw["optim"]
    assert args.gradient_checkpointing == kw["gradient_checkpointing"]  # trl's default (True) overridden


def test_merge_and_gguf_decisions() -> None:
    cfg = TrainConfig(job_id="j", save_gguf=True)
    uns, qlora = gpu_plan(cfg), gpu_plan(cfg, unsloth_ok=False)
    cpu = pod.make_plan(cfg, cuda=False, bf16_supported=False, unsloth_ok=False, bnb_ok=False)
    assert pod.merge_method(cfg, uns) == "unsloth"
    assert pod.merge_method(cfg, qlora) == "reload_16bit"  # never merge into nf4 weights
    assert pod.merge_method(cfg, cpu) == "in_place"
    assert pod.merge_method(TrainConfig(job_id="j", save_merged=False), uns) is None

    def which(tools: set[str]) -> Callable[[str], str | None]:
        return lambda name: f"/usr/bin/{name}" if name in tools else None

    none = "/nonexistent/llama.cpp"  # no prebuilt llama.cpp: unsloth would have to build one
    assert pod.gguf_skip_reason(cfg, uns, which({"git", "make", "gcc"}), none) is None
    assert pod.gguf_skip_reason(cfg, uns, which({"git", "cmake", "cc"}), none) is None
    assert pod.gguf_skip_reason(cfg, uns, which({"gcc"}), none) == "image lacks git, cmake or make to build llama.cpp"
    assert "unsloth" in (pod.gguf_skip_reason(cfg, qlora, which({"git", "make", "gcc"}), none) or "")
    assert pod.gguf_skip_reason(TrainConfig(job_id="j"), uns, which({"git", "make", "gcc"}), none) == "not requested"
    # the unsloth image ships a prebuilt llama.cpp (UNSLOTH_LLAMA_CPP_PATH=/opt/unsloth/llama.cpp) and no cmake
    assert pod.gguf_skip_reason(cfg, uns, which({"gcc"}), str(Path(__file__).parent)) is None


def _tiny_tokenizer() -> Any:
    return pod.build_tiny_tokenizer([m["content"] for m in ROW.messages] * 20)


def _label_text(tok: Any, enc: dict[str, list[int]]) -> tuple[str, str]:
    """(text of the tokens trained on, text of the masked tokens)."""
    assert len(enc["input_ids"]) == len(enc["labels"]) == len(enc["attention_mask"])
    trained = [i for i, lab in zip(enc["input_ids"], enc["labels"]) if lab != -100]
    assert trained == [lab for lab in enc["labels"] if lab != -100]
    masked = [i for i, lab in zip(enc["input_ids"], enc["labels"]) if lab == -100]
    return tok.decode(trained), tok.decode(masked)


def test_prompt_tokens_are_masked_for_chat_templated_row() -> None:
    tok = _tiny_tokenizer()
    [enc] = pod.tokenize_rows(tok, [ROW], max_len=256)
    trained, masked = _label_text(tok, enc)
    assert trained == "c b a<|end|>"  # the answer and one end-of-turn, nothing else
    assert masked == "<|system|>You reverse lists.<|end|><|user|>reverse: a b c<|end|><|assistant|>"
    first = enc["labels"].index(next(lab for lab in enc["labels"] if lab != -100))
    assert all(lab == -100 for lab in enc["labels"][:first])


def test_chatml_row_masks_assistant_header_and_ends_on_single_eos() -> None:
    tok = _tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.eos_token = "<|im_end|>"
    tok.chat_template = CHATML  # renders "<|im_end|>\n" after each turn, like Qwen
    [enc] = pod.tokenize_rows(tok, [ROW], max_len=256)
    trained, masked = _label_text(tok, enc)
    assert trained == "c b a<|im_end|>"  # no newline after the eos, no second eos
    assert masked.endswith("<|im_start|>assistant\n")
    assert enc["input_ids"][-1] == tok.eos_token_id


# Chat templates of the supported families (jobs/catalog.py), reduced to their turn structure
# (the shipped tokenizers' templates add tool calls, dates, etc.), each with its end-of-turn.
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
GEMMA3 = (  # no system role: Gemma folds the system text into the first user turn
    "{{ bos_token }}{% set ns = namespace(sys='') %}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% set ns.sys = m['content'] + '\n\n' %}{% else %}"
    "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else 'user' }}\n"
    "{{ (ns.sys if m['role'] == 'user' else '') + m['content'] }}<end_of_turn>\n"
    "{% set ns.sys = '' %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)
PHI4 = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# family -> (template, eos, the assistant header the prompt ends with, the trained text)
FAMILY_TEMPLATES = {
    "llama-3": (LLAMA3, "<|eot_id|>", "<|start_header_id|>assistant<|end_header_id|>\n\n", "c b a<|eot_id|>"),
    "qwen-2.5": (CHATML, "<|im_end|>", "<|im_start|>assistant\n", "c b a<|im_end|>"),
    "gemma-3": (GEMMA3, "<end_of_turn>", "<start_of_turn>model\n", "c b a<end_of_turn>"),
    "mistral": (MISTRAL, "</s>", "[/INST]", "c b a</s>"),
    "phi-4": (PHI4, "<|end|>", "<|assistant|>", "c b a<|end|>"),
}


@pytest.mark.parametrize("family", sorted(FAMILY_TEMPLATES))
def test_response_only_masking_is_template_agnostic_across_supported_families(family: str) -> None:
    from jobs.catalog import SUPPORTED

    assert family in {m.family for m in SUPPORTED}
    template, eos, header, trained_expected = FAMILY_TEMPLATES[family]
    tok = _tiny_tokenizer()
    specials = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|im_start|>", "<|im_end|>",
                "<start_of_turn>", "<end_of_turn>", "<s>", "</s>", "[INST]", "[/INST]"]
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.bos_token, tok.eos_token, tok.chat_template = "<s>", eos, template
    [enc] = pod.tokenize_rows(tok, [ROW], max_len=256)
    trained, masked = _label_text(tok, enc)
    assert trained == trained_expected  # the answer and exactly one end of turn
    assert masked.endswith(header) and "c b a" not in masked
    if family != "mistral":  # Mistral v0.3's template drops the system turn
        assert "You reverse lists." in masked


def test_base_tokenizer_without_template_gets_fallback_and_pad() -> None:
    tok = _tiny_tokenizer()
    tok.chat_template = None
    tok.pad_token = None
    pod.ensure_chat_template(tok)
    assert tok.chat_template == pod.FALLBACK_TEMPLATE and tok.pad_token == tok.eos_token
    [enc] = pod.tokenize_rows(tok, [ROW], max_len=256)
    trained, masked = _label_text(tok, enc)
    assert trained == "c b a<|end|>" and masked.endswith("assistant\n")
    kept = _tiny_tokenizer()
    assert pod.ensure_chat_template(kept).chat_template == pod._TINY_TEMPLATE


def test_truncation_keeps_mask_and_drops_rows_with_no_answer_left() -> None:
    tok = _tiny_tokenizer()
    [full] = pod.tokenize_rows(tok, [ROW], max_len=256)
    n_prompt = full["labels"].count(-100)
    [cut] = pod.tokenize_rows(tok, [ROW], max_len=n_prompt + 1)
    assert cut["input_ids"] == full["input_ids"][: n_prompt + 1]
    assert cut["labels"][:n_prompt] == [-100] * n_prompt and cut["labels"][-1] != -100
    with pytest.raises(ValueError, match="truncated away"):
        pod.tokenize_rows(tok, [ROW], max_len=n_prompt)


# ---------------------------------------------------------------------------
# Library kwargs against the libraries' real signatures
# ---------------------------------------------------------------------------

# unsloth is not installed here (it needs a GPU). Parameter names copied from its real source:
# the PyPI wheel unsloth-2026.10.9-py3-none-any.whl, unsloth/models/loader.py
# FastLanguageModel.from_pretrained; unsloth/models/llama.py FastLlamaModel.get_peft_model (which
# FastLanguageModel.get_peft_model forwards to); unsloth/save.py unsloth_save_pretrained_merged and
# unsloth_save_pretrained_gguf (bound as model.save_pretrained_merged / save_pretrained_gguf).
UNSLOTH_FROM_PRETRAINED = {
    "model_name", "max_seq_length", "dtype", "load_in_4bit", "load_in_8bit", "load_in_16bit",
    "full_finetuning", "token", "device_map", "device_map_planner_kwargs", "rope_scaling", "fix_tokenizer",
    "trust_remote_code", "use_gradient_checkpointing", "resize_model_vocab", "revision",
    "use_exact_model_name", "offload_embedding", "float32_mixed_precision", "fast_inference",
    "gpu_memory_utilization", "float8_kv_cache", "random_state", "max_lora_rank", "disable_log_stats",
    "qat_scheme", "load_in_fp8", "unsloth_tiled_mlp", "text_only", "on_model_resolved",
}
UNSLOTH_GET_PEFT_MODEL = {
    "model", "r", "target_modules", "lora_alpha", "lora_dropout", "bias", "layers_to_transform",
    "layers_pattern", "finetune_last_n_layers", "use_gradient_checkpointing", "random_state",
    "max_seq_length", "use_rslora", "modules_to_save", "init_lora_weights", "loftq_config",
    "temporary_location", "qat_scheme", "target_parameters", "ensure_weight_tying", "offload_layers",
    "checkpoint_skip_layers",
}
UNSLOTH_SAVE_MERGED = {"self", "save_directory", "tokenizer", "save_method", "push_to_hub", "token"}  # a subset
UNSLOTH_SAVE_GGUF = {"self", "save_directory", "tokenizer", "quantization_method", "first_conversion"}  # subset


def test_unsloth_kwargs_exist_in_unsloths_real_signatures() -> None:
    cfg = TrainConfig(job_id="j")
    assert set(pod.unsloth_load_kwargs(cfg, gpu_plan(cfg), "hf_x")) <= UNSLOTH_FROM_PRETRAINED
    assert set(pod.unsloth_peft_kwargs(cfg)) <= UNSLOTH_GET_PEFT_MODEL
    src = inspect.getsource(pod.merge_16bit) + inspect.getsource(pod.export_gguf)
    assert 'save_pretrained_merged(str(merged_dir), tokenizer, save_method="merged_16bit")' in src
    assert "save_pretrained_gguf(str(gguf_dir), tokenizer, quantization_method=GGUF_QUANT)" in src
    assert {"save_method", "tokenizer"} <= UNSLOTH_SAVE_MERGED and "quantization_method" in UNSLOTH_SAVE_GGUF


def test_hub_and_generate_kwargs_exist_in_installed_signatures() -> None:
    from huggingface_hub import HfApi
    from transformers import DataCollatorForSeq2Seq, EarlyStoppingCallback

    assert {"private", "exist_ok"} <= set(inspect.signature(HfApi.create_repo).parameters)
    assert {"operations", "commit_message"} <= set(inspect.signature(HfApi.create_commit).parameters)
    assert {"padding", "label_pad_token_id"} <= {f.name for f in dataclasses.fields(DataCollatorForSeq2Seq)}
    assert "early_stopping_patience" in inspect.signature(EarlyStoppingCallback).parameters


# ---------------------------------------------------------------------------
# At most MAX_EVALS evaluations per run (+ the final one)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg_kw,n_train,expect",
    [
        ({"max_steps": 1000, "eval_steps": 1}, 100, 100),  # 1000 evals asked: widened to 10
        ({"max_steps": 200, "eval_steps": 25}, 100, 25),  # 8 evals: kept
        ({"max_steps": 95, "eval_steps": 5}, 100, 10),  # ceil(95 / 10)
        ({"num_epochs": 3.0, "eval_steps": 20, "batch_size": 8}, 800, 30),  # 300 planned steps
        ({"num_epochs": 1.0, "eval_steps": 200, "batch_size": 8}, 800, 200),  # fewer than 10: kept
    ],
)
def test_eval_steps_are_widened_to_at_most_ten_evals(cfg_kw: dict[str, Any], n_train: int, expect: int,
                                                     tmp_path: Path) -> None:
    from trl import SFTConfig

    cfg = TrainConfig(job_id="j", **cfg_kw)
    plan = pod.make_plan(cfg, cuda=False, bf16_supported=False, unsloth_ok=False, bnb_ok=False)
    kw = pod.sft_config_kwargs(cfg, plan, str(tmp_path), n_train=n_train)
    assert kw["eval_steps"] == kw["save_steps"] == expect  # checkpoints follow the evals
    assert pod.planned_steps(cfg, n_train) // kw["eval_steps"] <= pod.MAX_EVALS
    args = SFTConfig(**kw)
    assert args.eval_steps == args.save_steps == expect


# ---------------------------------------------------------------------------
# CUDA guard: pure judgement of injected facts, plus the real probe through the server
# ---------------------------------------------------------------------------

SMI_OLD_DRIVER = """\
Thu Dec  3 10:00:00 2026
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 535.104.05             Driver Version: 535.104.05   CUDA Version: 12.2     |
|-----------------------------------------+------------------------+----------------------+
| GPU  Name                 Persistence-M | Bus-Id          Disp.A | Volatile Uncorr. ECC |
|   0  NVIDIA A40                     On  |   00000000:01:00.0 Off |                    0 |
+-----------------------------------------+------------------------+----------------------+
"""


def facts(**kw: Any) -> pod.CudaFacts:
    base: dict[str, Any] = {"torch_version": "2.11.0+cu128", "torch_cuda": "12.8", "cuda_available": True,
                            "device_count": 1, "torch_error": None, "driver": "570.86.15",
                            "smi_line": "NVIDIA-SMI 570.86.15  Driver Version: 570.86.15  CUDA Version: 12.8"}
    return pod.CudaFacts(**{**base, **kw})


def test_parse_nvidia_smi_header_and_errors() -> None:
    line, driver, cuda = pod.parse_nvidia_smi(SMI_OLD_DRIVER)
    assert line == "NVIDIA-SMI 535.104.05  Driver Version: 535.104.05  CUDA Version: 12.2"
    assert (driver, cuda) == ("535.104.05", "12.2")
    err = "Failed to initialize NVML: Driver/library version mismatch\nNVML library version: 550.54\n"
    assert pod.parse_nvidia_smi(err) == ("Failed to initialize NVML: Driver/library version mismatch", None, None)


def test_cuda_problem_explains_each_failure_with_the_facts() -> None:
    assert pod.cuda_problem(facts()) is None
    old = pod.cuda_problem(facts(
        cuda_available=False, device_count=0, driver="535.104.05", smi_line=pod.parse_nvidia_smi(SMI_OLD_DRIVER)[0],
        torch_error="CUDA initialization: The NVIDIA driver on your system is too old (found version 12020)"))
    assert old is not None
    assert "the host driver supports CUDA 12.2 at most, older than the CUDA 12.8 this image's torch needs" in old
    assert "driver 535.104.05" in old and "torch 2.11.0+cu128 built for CUDA 12.8" in old
    assert "nvidia-smi: NVIDIA-SMI 535.104.05  Driver Version: 535.104.05  CUDA Version: 12.2" in old
    assert "driver on your system is too old" in old
    no_gpu = pod.cuda_problem(facts(cuda_available=False, device_count=0, driver=None, smi_line=None))
    assert no_gpu is not None and "no NVIDIA GPU or driver is visible" in no_gpu
    assert "nvidia-smi: nvidia-smi not found" in no_gpu and "driver unknown" in no_gpu
    cpu_build = pod.cuda_problem(facts(torch_version="2.13.0+cpu", torch_cuda=None, cuda_available=False,
                                       device_count=0))
    assert cpu_build is not None and "no CUDA (CPU-only build)" in cpu_build and "no CUDA support" in cpu_build
    assert pod.cuda_problem(facts(device_count=0)) is not None  # "available" with no device is not usable


def test_check_cuda_only_guards_real_jobs() -> None:
    calls: list[int] = []

    def broken() -> pod.CudaFacts:
        calls.append(1)
        return facts(cuda_available=False, device_count=0)

    pod.check_cuda(TrainConfig(job_id="j", tiny_random_model=True), broken)  # the tiny model is CPU-only
    pod.check_cuda(TrainConfig(job_id="j", require_cuda=False), broken)
    assert calls == []
    pod.check_cuda(TrainConfig(job_id="j"), facts)
    with pytest.raises(pod.JobFailure) as err:
        pod.check_cuda(TrainConfig(job_id="j"), broken)
    assert err.value.code == "cuda_unavailable" and calls == [1]


@pytest.mark.parametrize("smi", ["absent", "old-driver"])
def test_real_job_fails_fast_without_usable_cuda(start_pod: Callable[..., Pod], tmp_path: Path, smi: str) -> None:
    """This machine's torch is a CPU build: a real job (not the tiny model) must refuse at once, before
    any model is loaded (its base model path does not even exist), quoting the facts."""
    import torch

    path = [d for d in os.environ["PATH"].split(os.pathsep) if not (Path(d) / "nvidia-smi").exists()]
    if smi == "old-driver":
        shims = tmp_path / "bin"
        shims.mkdir()
        (shims / "nvidia-smi").write_text(f"#!/bin/sh\ncat <<'EOF'\n{SMI_OLD_DRIVER}EOF\n")
        (shims / "nvidia-smi").chmod(0o755)
        path.insert(0, str(shims))
    pod_ = start_pod(env={"PATH": os.pathsep.join(path)})
    body = job_body("job-cuda", tiny_random_model=False, require_cuda=True, base_model=str(tmp_path / "no-model"))
    assert pod_.http.post("/job", json=body).status_code == 202
    p = pod_.wait(lambda p: p.state in TERMINAL_STATES, timeout=120)
    assert p.state == "failed" and p.error_code == "cuda_unavailable", p.error
    assert p.error is not None and p.error.startswith("CUDA is not usable on this pod")
    assert f"torch {torch.__version__} built for no CUDA (CPU-only build)" in p.error
    if smi == "absent":
        assert "nvidia-smi: nvidia-smi not found" in p.error and "driver unknown" in p.error
    else:
        assert "nvidia-smi: NVIDIA-SMI 535.104.05  Driver Version: 535.104.05  CUDA Version: 12.2" in p.error
        assert "driver 535.104.05" in p.error
    assert p.step == 0 and p.backend == "" and p.elapsed_s < 60  # before any model or trainer
    assert pod_.http.get("/results").status_code == 409


def test_failures_carry_a_machine_readable_code(tmp_path: Path) -> None:
    class OutOfMemoryError(RuntimeError):  # torch.cuda.OutOfMemoryError's name
        pass

    assert pod.error_code_for(pod.JobFailure("bad_job", "x")) == "bad_job"
    assert pod.error_code_for(OutOfMemoryError("boom")) == "out_of_memory"
    assert pod.error_code_for(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")) == "out_of_memory"
    assert pod.error_code_for(ValueError("x")) == "internal"
    job = JobRequest.model_validate(job_body("j", tiny_random_model=False, require_cuda=False,
                                             base_model=str(tmp_path / "missing-model")))
    plan = pod.make_plan(job.config, cuda=False, bf16_supported=False, unsloth_ok=False, bnb_ok=False)
    with pytest.raises(pod.JobFailure) as err:
        pod.load_model(job, plan, None)
    assert err.value.code == "model_load" and str(tmp_path / "missing-model") in str(err.value)


# ---------------------------------------------------------------------------
# The spec's base model is what the pod loads
# ---------------------------------------------------------------------------


def save_local_base(model_dir: Path) -> None:
    rows = [m["content"] for r in reverse_rows(64, random.Random(1)) for m in r["messages"]]
    tok = pod.build_tiny_tokenizer(rows)
    pod.build_tiny_llama(tok, seed=1, max_len=64).save_pretrained(str(model_dir))
    tok.save_pretrained(str(model_dir))


def test_spec_base_model_is_the_model_the_pod_loads(start_pod: Callable[..., Pod], tmp_path: Path) -> None:
    """A real (non-tiny) job through the real from_pretrained path: offline, only the spec's model
    (a local directory here) can load; the default model would fail."""
    base = tmp_path / "spec-base-model"
    save_local_base(base)
    pod_ = start_pod()
    body = job_body("job-base", tiny_random_model=False, require_cuda=False, base_model=str(base),
                    max_steps=6, eval_steps=3, save_merged=False)
    assert pod_.http.post("/job", json=body).status_code == 202
    p = pod_.wait(lambda p: p.state in TERMINAL_STATES, timeout=300)
    assert p.state == "succeeded", p.error
    res = Results.model_validate_json(pod_.http.get("/results").content)
    assert res.extra["base_model"] == str(base)
    with tarfile.open(fileobj=io.BytesIO(pod_.http.get(f"/artifacts/{ADAPTER_ARTIFACT}").content)) as tar:
        member = next(n for n in tar.getnames() if n.endswith("adapter_config.json"))
        adapter_cfg = json.load(tar.extractfile(member))  # type: ignore[arg-type]
    assert adapter_cfg["base_model_name_or_path"] == str(base)


# ---------------------------------------------------------------------------
# Time cap and stop reasons
# ---------------------------------------------------------------------------


def test_time_cap_stops_training_keeps_best_and_says_so(start_pod: Callable[..., Pod]) -> None:
    pod_ = start_pod()
    body = job_body("job-cap", max_steps=3000, eval_steps=10, early_stopping_patience=0, save_merged=False,
                    max_train_s=4)
    assert pod_.http.post("/job", json=body).status_code == 202
    p = pod_.wait(lambda p: p.state in TERMINAL_STATES, timeout=300)
    assert p.state == "stopped" and p.stop_reason == "time_cap", p.error
    assert 0 < p.step < 3000
    assert p.eval_loss and p.eval_loss[-1][0] == p.step  # the final eval ran at the stop step
    losses = [loss for _, loss in p.eval_loss]
    assert p.best_eval_loss == min(losses)
    res = Results.model_validate_json(pod_.http.get("/results").content)
    assert res.state == "stopped" and res.stop_reason == "time_cap"
    assert res.extra["final_eval_loss"] == pytest.approx(p.best_eval_loss, rel=1e-4)  # best weights kept
    assert len(res.generations) == 3
    check_adapter_tarball(pod_)


# ---------------------------------------------------------------------------
# Held-out generation: max_new_tokens, batches, same outputs as one by one
# ---------------------------------------------------------------------------


def test_batched_generation_matches_one_by_one() -> None:
    rng = random.Random(3)
    rows = []
    for _ in range(20):
        words = [rng.choice("abcdef") for _ in range(rng.randint(1, 8))]  # prompts of different lengths
        rows.append({"messages": [{"role": "system", "content": "You reverse lists."},
                                  {"role": "user", "content": "reverse: " + " ".join(words)},
                                  {"role": "assistant", "content": " ".join(reversed(words))}]})
    prompts = [{"id": f"p{i}", "messages": r["messages"][:-1]} for i, r in enumerate(rows[:7])]
    job = JobRequest.model_validate({"config": {"job_id": "j", "tiny_random_model": True, "seed": 5,
                                                "max_new_tokens": 12, "gen_batch_size": 1},
                                     "train": rows, "val": rows[:4], "eval_prompts": prompts})
    model, tok = pod.build_tiny_model(job)
    plan = pod.make_plan(job.config, cuda=False, bf16_supported=False, unsloth_ok=False, bnb_ok=False)
    lengths = {len(tok(pod.render_prompt(tok, p.messages))["input_ids"]) for p in job.eval_prompts}
    assert len(lengths) > 2  # batches really are padded

    def run(**cfg: Any) -> list[str]:
        out = pod.generate(job.model_copy(update={"config": job.config.model_copy(update=cfg)}), model, tok, plan)
        assert [g.id for g in out] == [p.id for p in job.eval_prompts]  # order kept
        return [g.output for g in out]

    single = run()
    assert any(o == "" for o in single) and any(len(o) > 5 for o in single)  # some rows stop at once, some run
    assert run(gen_batch_size=3) == single
    assert run(gen_batch_size=8) == single
    assert tok.padding_side == "right"  # restored for training
    short = run(gen_batch_size=8, max_new_tokens=3)
    assert all(len(s) <= len(o) for s, o in zip(short, single)) and short != single


def test_new_tokens_cuts_at_the_first_stop_id_and_drops_padding() -> None:
    assert pod.new_tokens([5, 6, 2, 7, 8], stops=[2, 9], pad_id=0) == [5, 6]
    assert pod.new_tokens([5, 9, 2], stops=[2, 9], pad_id=0) == [5]
    assert pod.new_tokens([5, 6, 0, 0], stops=[2], pad_id=0) == [5, 6]
    assert pod.new_tokens([2, 5], stops=[2], pad_id=None) == []


# ---------------------------------------------------------------------------
# Export: merge only for a push, Hub repo only with merged weights (loopback Hub fake)
# ---------------------------------------------------------------------------

HF_TOKEN = "hf_" + "Q" * 34  # the shape of a real token, so the scrubber would catch a leak


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    with FakeHub.running() as h:
        h.add_token(HF_TOKEN, "tuner-bot", orgs=("acme",))
        yield h


def run_to_end(pod_: Pod, body: dict[str, Any]) -> tuple[Progress, set[str]]:
    seen: set[str] = set()
    assert pod_.http.post("/job", json=body).status_code == 202

    def done(p: Progress) -> bool:
        seen.add(p.state)
        return p.state in TERMINAL_STATES

    return pod_.wait(done, timeout=300), seen


def test_push_puts_a_loadable_merged_model_and_the_adapter_on_the_hub(
    start_pod: Callable[..., Pod], hub: FakeHub, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    hub.commit_delay_s = 2.0  # a Hub commit takes a moment: the pod says "exporting" meanwhile
    pod_ = start_pod(env={**hub.env(), "HF_TOKEN": HF_TOKEN})
    body = job_body("job-push", hf_repo="acme/tuner-p1-r1", max_steps=40, eval_steps=1)
    p, seen = run_to_end(pod_, body)
    assert p.state == "succeeded", p.error
    assert {"training", "generating", "exporting"} <= seen
    assert [s for s, _ in p.eval_loss] == list(range(4, 41, 4))  # eval_steps 1 widened: 10 evals
    res = Results.model_validate_json(pod_.http.get("/results").content)
    assert res.hf_repo == "acme/tuner-p1-r1"
    assert res.export.merged and res.export.pushed and res.export.adapter_pushed and res.export.adapter
    assert res.export.push_error is None and res.export.merged_error is None and res.export.gguf_files == []
    repo = hub.repos["acme/tuner-p1-r1"]
    assert repo.private and len(repo.commits) == 1  # one atomic commit
    assert {"config.json", "model.safetensors", "adapter/adapter_config.json",
            "adapter/adapter_model.safetensors"} <= set(repo.files)
    assert "adapter_config.json" not in repo.files  # the root is a plain 16-bit model
    local = tmp_path / "from-hub"
    for path, data in repo.files.items():
        if "/" not in path:
            (local / path).parent.mkdir(parents=True, exist_ok=True)
            (local / path).write_bytes(data)
    merged = AutoModelForCausalLM.from_pretrained(str(local))
    assert merged.config.model_type == "llama" and sum(p.numel() for p in merged.parameters()) > 10_000
    assert HF_TOKEN not in pod_.log()


@pytest.mark.parametrize("token,repo_id,status", [("hf_" + "X" * 34, "tuner-bot/tuner-p1-r2", "401"),
                                                   (HF_TOKEN, "someone-else/tuner-p1-r2", "403")])
def test_failed_push_is_reported_and_the_run_still_succeeds(
    start_pod: Callable[..., Pod], hub: FakeHub, token: str, repo_id: str, status: str
) -> None:
    pod_ = start_pod(env={**hub.env(), "HF_TOKEN": token})
    p, _ = run_to_end(pod_, job_body("job-pushfail", hf_repo=repo_id, max_steps=6, eval_steps=3))
    assert p.state == "succeeded", p.error
    res = Results.model_validate_json(pod_.http.get("/results").content)
    assert res.hf_repo is None  # never a Hub URI without a model
    assert res.export.merged and not res.export.pushed and not res.export.adapter_pushed
    assert res.export.push_error is not None and status in res.export.push_error
    assert token not in res.export.push_error and token not in pod_.log()
    assert res.extra["hf_error"] == res.export.push_error  # what the bot's Deploy step explains
    assert repo_id not in hub.repos
    check_adapter_tarball(pod_)  # the adapter is still there for the bot


def test_failed_merge_pushes_no_weightless_repo(start_pod: Callable[..., Pod], hub: FakeHub, tmp_path: Path) -> None:
    workdir = tmp_path / "work-mergefail"
    workdir.mkdir()
    (workdir / "merged").write_text("a file where the merged model directory should go")  # the merge fails
    pod_ = start_pod(env={**hub.env(), "HF_TOKEN": HF_TOKEN}, workdir=workdir)
    p, _ = run_to_end(pod_, job_body("job-mergefail", hf_repo="acme/tuner-p1-r3", max_steps=6, eval_steps=3))
    assert p.state == "succeeded", p.error
    res = Results.model_validate_json(pod_.http.get("/results").content)
    assert not res.export.merged and res.export.merged_error
    assert res.hf_repo is None and not res.export.pushed and "merge failed" in (res.export.push_error or "")
    assert hub.requests == [] and hub.repos == {}  # the Hub was never touched
    check_adapter_tarball(pod_)


# ---------------------------------------------------------------------------
# bench/gpu_smoke.py: its CPU-side parts
# ---------------------------------------------------------------------------


def _gpu_smoke() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_smoke", REPO / "bench" / "gpu_smoke.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_smoke_builds_a_local_llama_that_loads_like_a_hub_model(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    smoke = _gpu_smoke()
    job = smoke.smoke_job(tmp_path / "base", steps=120)
    assert not job.config.tiny_random_model and job.config.require_cuda and job.config.load_in_4bit
    assert job.config.base_model == str(tmp_path / "base")
    assert pod.planned_steps(job.config, len(job.train)) // pod.eval_every(job.config, len(job.train)) <= 10
    smoke.build_local_model(tmp_path / "base", pod.job_texts(job))
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"))
    tok = pod.ensure_chat_template(AutoTokenizer.from_pretrained(str(tmp_path / "base")))
    assert model.config.model_type == "llama" and model.config.hidden_size % 64 == 0
    assert model.config.vocab_size == len(tok)
    [enc] = pod.tokenize_rows(tok, [ChatRow.model_validate(job.train[0].model_dump())], max_len=96)
    assert any(lab != -100 for lab in enc["labels"])  # the chat template survived the save


def test_gpu_smoke_without_cuda_prints_one_line_and_exits_0() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the smoke test would really run")
    out = subprocess.run([sys.executable, "bench/gpu_smoke.py"], cwd=REPO, capture_output=True, text=True,
                         timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_smoke: skipped, no usable CUDA here (")
