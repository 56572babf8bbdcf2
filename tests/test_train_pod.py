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


# ---------------------------------------------------------------------------
# GPU-path decisions, checked on CPU as pure functions (no GPU, no unsloth needed)
# ---------------------------------------------------------------------------

import dataclasses  # noqa: E402
import itertools  # noqa: E402

from jobs import train as pod  # noqa: E402
from jobs.podproto import ChatRow, TrainConfig  # noqa: E402

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

    assert pod.gguf_skip_reason(cfg, uns, which({"git", "make", "gcc"})) is None
    assert pod.gguf_skip_reason(cfg, uns, which({"git", "cmake", "cc"})) is None
    assert pod.gguf_skip_reason(cfg, uns, which({"gcc"})) == "image lacks git, cmake or make to build llama.cpp"
    assert "unsloth" in (pod.gguf_skip_reason(cfg, qlora, which({"git", "make", "gcc"})) or "")
    assert pod.gguf_skip_reason(TrainConfig(job_id="j"), uns, which({"git", "make", "gcc"})) == "not requested"


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
