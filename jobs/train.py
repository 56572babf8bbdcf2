"""Pod-side training program: an authenticated HTTP control server plus a QLoRA trainer.

Runs on a RunPod GPU pod as ``python jobs/train.py`` (or ``python -m jobs.train``).
Only this file, ``jobs/podproto.py`` and ``jobs/__init__.py`` are copied to the pod, so it
imports nothing but the stdlib, pydantic and the ML stack (torch/transformers/peft/trl,
unsloth when present). The wire contract lives in ``jobs/podproto.py``.

Sections (one concern each, to become modules of a package later): job state and errors,
plan (machine probe, CUDA guard, backend/precision, trainer arguments), data, model,
trainer, generation, export, job orchestration, HTTP server.

A real job (not the tiny test model) first checks that CUDA is usable and fails fast with
error_code "cuda_unavailable" otherwise: a GPU pod whose torch cannot see the GPU would
otherwise train on its CPU for hours. Then: unsloth QLoRA when unsloth imports, else
transformers + peft + trl (4-bit via bitsandbytes nf4 when ``load_in_4bit``); on CPU (tests)
fp32. Training uses the assistant response only (prompt labels -100), evaluates at most
MAX_EVALS times, keeps the best eval-loss checkpoint, stops early on patience, on
``POST /stop`` or past ``max_train_s``. Held-out prompts are generated in batches. The
16-bit merge is built only when it will be pushed to the Hub, and the Hub repo is
reported only once merged weights are there. Every GPU-only decision is a pure function,
unit-tested on CPU.
"""

from __future__ import annotations

import sys

if __package__ in (None, ""):  # `python jobs/train.py`: import `jobs` as a package, and keep
    import os.path  # jobs/ off sys.path so jobs/types.py cannot shadow the stdlib `types`

    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    sys.path.insert(0, os.path.dirname(_here))

import hmac
import json
import logging
import math
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from jobs.podproto import (
    ADAPTER_ARTIFACT,
    POD_PORT,
    TERMINAL_STATES,
    TOKEN_ENV,
    ChatRow,
    ExportReport,
    Generation,
    JobRequest,
    Progress,
    Results,
    TrainConfig,
)

log = logging.getLogger("tuner.train")

# unsloth's merge pre-warms the HF hub cache with the 16-bit base before merging, which puts a
# second copy of the base on the container disk (unsloth/save.py, 2026.10.9). unsloth is imported
# lazily (probe_plan), after this; the pod env sets it too (jobs/training.py POD_ENV).
os.environ["UNSLOTH_PREWARM_HUB_CACHE"] = "0"

# ---------------------------------------------------------------------------
# Job state and errors (shared by the HTTP handlers and the training thread)
# ---------------------------------------------------------------------------


class JobFailure(Exception):
    """A job that cannot run, with the machine-readable kind (podproto.ErrorCode)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def error_code_for(exc: BaseException) -> str:
    if isinstance(exc, JobFailure):
        return exc.code
    if type(exc).__name__ == "OutOfMemoryError" or "CUDA out of memory" in str(exc):
        return "out_of_memory"
    return "internal"


class StopRequested:
    """Thread-safe flag set by POST /stop and polled by the trainer callback."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()


class JobState:
    """Everything the HTTP handlers and the training thread share; guarded by one lock."""

    def __init__(self, workdir: Path, secrets: list[str]) -> None:
        self.workdir = workdir
        self.artifacts_dir = workdir / "artifacts"
        self.lock = threading.Lock()
        self.progress = Progress()
        self.results: Results | None = None
        self.stop = StopRequested()
        self.thread: threading.Thread | None = None
        self._secrets = [s for s in secrets if s]
        self._started = 0.0
        self.final_eval_loss: float | None = None  # val loss of the kept (best) model
        self.last_contact = time.monotonic()  # last authorised request from the bot

    # -- progress ---------------------------------------------------------
    def snapshot(self) -> Progress:
        with self.lock:
            if self._started and self.progress.state not in TERMINAL_STATES:
                self.progress.elapsed_s = round(time.monotonic() - self._started, 3)
            return self.progress.model_copy(deep=True)

    def update(self, **fields: Any) -> None:
        with self.lock:
            for key, value in fields.items():
                setattr(self.progress, key, value)
            if self._started:
                self.progress.elapsed_s = round(time.monotonic() - self._started, 3)

    def record_eval(self, step: int, loss: float) -> None:
        with self.lock:
            p = self.progress
            p.eval_loss.append((step, loss))
            if p.best_eval_loss is None or loss < p.best_eval_loss:
                p.best_eval_loss, p.best_step = loss, step

    def record_train(self, step: int, loss: float) -> None:
        with self.lock:
            self.progress.train_loss.append((step, loss))

    # -- lifecycle --------------------------------------------------------
    def start(self, job: JobRequest) -> tuple[int, Progress]:
        with self.lock:
            current = self.progress.job_id
            if current is not None:
                if current == job.config.job_id:
                    return HTTPStatus.OK, self.progress.model_copy(deep=True)
                return HTTPStatus.CONFLICT, self.progress.model_copy(deep=True)
            self.progress = Progress(job_id=job.config.job_id, state="loading")
            self._started = time.monotonic()
            self.thread = threading.Thread(target=self._run, args=(job,), name="train", daemon=True)
            self.thread.start()
            return HTTPStatus.ACCEPTED, self.progress.model_copy(deep=True)

    def _run(self, job: JobRequest) -> None:
        try:
            results = run_job(job, self)
        except Exception as exc:  # noqa: BLE001 - any failure becomes state "failed"
            log.error("job failed: %s", self.scrub(traceback.format_exc()))
            text = str(exc) if isinstance(exc, JobFailure) else f"{type(exc).__name__}: {exc}"
            self.update(state="failed", error=self.scrub(text)[:1000], error_code=error_code_for(exc), eta_s=None)
            return
        with self.lock:
            self.results = results
            self.progress.state = results.state
            self.progress.stop_reason = results.stop_reason
            self.progress.eta_s = 0.0
            self.progress.elapsed_s = round(time.monotonic() - self._started, 3)

    def scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return re.sub(r"hf_[A-Za-z0-9]{20,}", "hf_***", text)


# ---------------------------------------------------------------------------
# Plan: machine probe and CUDA guard (pure decisions fed by one real probe)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CudaFacts:
    """What the machine says about CUDA; gathered by probe_cuda_facts, judged by cuda_problem."""

    torch_version: str
    torch_cuda: str | None  # torch.version.cuda; None for a CPU-only torch build
    cuda_available: bool  # torch.cuda.is_available()
    device_count: int
    torch_error: str | None  # what torch said while initialising CUDA (e.g. "driver too old")
    driver: str | None  # host NVIDIA driver version
    smi_line: str | None  # nvidia-smi's header line (or its error); None: nvidia-smi not found


def parse_nvidia_smi(output: str) -> tuple[str | None, str | None, str | None]:
    """(the line worth quoting, driver version, highest CUDA the driver supports) from `nvidia-smi`."""
    lines = [ln.strip(" |+") for ln in output.splitlines() if ln.strip(" |+-=")]
    line = next((ln for ln in lines if "Driver Version" in ln), lines[0] if lines else None)
    driver = re.search(r"Driver Version:\s*([\d.]+)", output)
    cuda = re.search(r"CUDA Version:\s*([\d.]+)", output)
    clean = re.sub(r"\s{2,}", "  ", line) if line else None
    return clean, driver.group(1) if driver else None, cuda.group(1) if cuda else None


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:2])


def cuda_problem(f: CudaFacts) -> str | None:
    """None when training can use the GPU; otherwise the plain-words reason, with the facts."""
    if f.cuda_available and f.device_count > 0:
        return None
    smi = f.smi_line or "nvidia-smi not found"
    build = f"CUDA {f.torch_cuda}" if f.torch_cuda else "no CUDA (CPU-only build)"
    facts = f"driver {f.driver or 'unknown'}, torch {f.torch_version} built for {build}, nvidia-smi: {smi}"
    if not f.torch_cuda:
        why = "this image's torch has no CUDA support"
    elif f.smi_line is None:
        why = "no NVIDIA GPU or driver is visible in the container"
    else:
        why = "torch cannot use the GPU"
        driver_cuda = parse_nvidia_smi(f.smi_line)[2]
        if driver_cuda and _version_tuple(driver_cuda) < _version_tuple(f.torch_cuda):
            why = (f"the host driver supports CUDA {driver_cuda} at most, older than the CUDA "
                   f"{f.torch_cuda} this image's torch needs")
    detail = f" ({f.torch_error})" if f.torch_error else ""
    return f"CUDA is not usable on this pod: {why}{detail}. {facts}. Nothing was trained."


def probe_cuda_facts() -> CudaFacts:
    """The one real probe: torch's view of CUDA, then nvidia-smi's (or /proc's) view of the driver."""
    import warnings

    import torch

    err: str | None = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            available = bool(torch.cuda.is_available())
            count = int(torch.cuda.device_count()) if available else 0
        except Exception as exc:  # noqa: BLE001 - a broken driver raises from inside torch
            available, count, err = False, 0, f"{type(exc).__name__}: {exc}"
    if err is None and caught:
        err = str(caught[0].message).splitlines()[0][:300]
    smi_line = driver = None
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi], capture_output=True, text=True, timeout=30, check=False)
            smi_line, driver, _ = parse_nvidia_smi((out.stdout or "") + (out.stderr or ""))
            smi_line = smi_line or f"exit status {out.returncode}, no output"
        except (OSError, subprocess.SubprocessError) as exc:
            smi_line = f"could not run nvidia-smi ({type(exc).__name__})"
    if driver is None and Path("/proc/driver/nvidia/version").is_file():
        m = re.search(r"Kernel Module\s+([\d.]+)", Path("/proc/driver/nvidia/version").read_text(errors="replace"))
        driver = m.group(1) if m else None
    return CudaFacts(
        torch_version=str(torch.__version__), torch_cuda=getattr(torch.version, "cuda", None),
        cuda_available=available, device_count=count, torch_error=err, driver=driver, smi_line=smi_line,
    )


def check_cuda(cfg: TrainConfig, probe: Callable[[], CudaFacts] = probe_cuda_facts) -> None:
    """Raise JobFailure("cuda_unavailable") for a real job on a machine whose CUDA is unusable."""
    if not cfg.require_cuda or cfg.tiny_random_model:
        return
    problem = cuda_problem(probe())
    if problem:
        raise JobFailure("cuda_unavailable", problem)


# ---------------------------------------------------------------------------
# Plan: backend, precision, library kwargs (pure; unit-tested on CPU)
# ---------------------------------------------------------------------------

UNSLOTH_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GGUF_QUANT = "q4_k_m"
MAX_EVALS = 10  # validation passes per run during training, plus the final one
# ChatML closed by the tokenizer's own eos: for base models that ship no chat template.
FALLBACK_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class Plan:
    """How this pod trains: which stack, on which device, in which precision, 4-bit base or not."""

    backend: str  # "unsloth" | "transformers"
    cuda: bool
    dtype: str | None  # torch dtype name of weights/autocast: "bfloat16" | "float16"; None = fp32 (CPU)
    load_in_4bit: bool  # QLoRA: nf4 base weights

    @property
    def bf16(self) -> bool:
        return self.dtype == "bfloat16"

    @property
    def fp16(self) -> bool:
        return self.dtype == "float16"


def make_plan(cfg: TrainConfig, *, cuda: bool, bf16_supported: bool, unsloth_ok: bool, bnb_ok: bool) -> Plan:
    """unsloth only on CUDA; 4-bit exactly when CUDA + load_in_4bit (+ bitsandbytes for transformers)."""
    cuda = cuda and not cfg.tiny_random_model
    backend = "unsloth" if cuda and unsloth_ok else "transformers"
    dtype = ("bfloat16" if bf16_supported else "float16") if cuda else None
    four_bit = cfg.load_in_4bit and cuda and (backend == "unsloth" or bnb_ok)
    return Plan(backend=backend, cuda=cuda, dtype=dtype, load_in_4bit=four_bit)


def probe_plan(cfg: TrainConfig) -> Plan:
    """Inspect the machine. Imports unsloth (when usable) before transformers/trl/peft so it can patch them."""
    if cfg.tiny_random_model:
        return make_plan(cfg, cuda=False, bf16_supported=False, unsloth_ok=False, bnb_ok=False)
    import torch

    cuda = torch.cuda.is_available()
    unsloth_ok = False
    if cuda:
        try:
            import unsloth  # noqa: F401
        except Exception as exc:  # noqa: BLE001 - any import failure means "no unsloth"
            log.warning("unsloth unavailable (%s: %s); using transformers+peft+trl", type(exc).__name__, exc)
        else:
            unsloth_ok = True
    plan = make_plan(
        cfg,
        cuda=cuda,
        bf16_supported=cuda and torch.cuda.is_bf16_supported(),
        unsloth_ok=unsloth_ok,
        bnb_ok=cuda and _importable("bitsandbytes"),
    )
    if cfg.load_in_4bit and cuda and not plan.load_in_4bit:
        log.warning("load_in_4bit requested but bitsandbytes is missing: loading the base in %s", plan.dtype)
    return plan


def pick_backend(cfg: TrainConfig) -> str:
    return probe_plan(cfg).backend


def bnb_config_kwargs(plan: Plan) -> dict[str, Any] | None:
    """BitsAndBytesConfig kwargs for a QLoRA base (nf4, double quant, compute in the training dtype)."""
    if not plan.load_in_4bit or plan.backend != "transformers":
        return None
    return {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": plan.dtype,
    }


def transformers_load_kwargs(plan: Plan, hf_token: str | None) -> dict[str, Any]:
    """AutoModelForCausalLM.from_pretrained kwargs minus quantization_config (dtype as a name)."""
    kwargs: dict[str, Any] = {"token": hf_token}
    if plan.cuda:
        kwargs.update(dtype=plan.dtype, device_map={"": 0})
    return kwargs


def lora_config_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    return {
        "r": cfg.lora_r,
        "lora_alpha": cfg.lora_alpha,
        "lora_dropout": cfg.lora_dropout,
        "target_modules": "all-linear",
        "bias": "none",
        "task_type": "CAUSAL_LM",
        # A random base has near-zero logits; let the tiny test model train its head and embeddings.
        "modules_to_save": ["lm_head", "embed_tokens"] if cfg.tiny_random_model else None,
    }


def unsloth_load_kwargs(cfg: TrainConfig, plan: Plan, hf_token: str | None) -> dict[str, Any]:
    """FastLanguageModel.from_pretrained kwargs. dtype is pinned (as a name) so it always matches the
    trainer's bf16/fp16 flags; unsloth refuses a bf16 model trained with fp16=True and vice versa."""
    return {
        "model_name": cfg.base_model,
        "max_seq_length": cfg.max_seq_len,
        "dtype": plan.dtype,
        "load_in_4bit": plan.load_in_4bit,
        "token": hf_token,
    }


def unsloth_peft_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    return {
        "r": cfg.lora_r,
        "target_modules": list(UNSLOTH_TARGET_MODULES),
        "lora_alpha": cfg.lora_alpha,
        "lora_dropout": cfg.lora_dropout,
        "bias": "none",
        "use_gradient_checkpointing": "unsloth",
        "random_state": cfg.seed,
    }


def planned_steps(cfg: TrainConfig, n_train: int) -> int:
    """Optimizer steps the run will take if nothing stops it early."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    per_epoch = math.ceil(math.ceil(n_train / cfg.batch_size) / cfg.grad_accum)
    return max(1, math.ceil(cfg.num_epochs * per_epoch))


def warmup_steps(cfg: TrainConfig, n_train: int) -> int:
    """Integer warmup steps from warmup_ratio (works on transformers 4.x and 5.x)."""
    return math.ceil(planned_steps(cfg, n_train) * max(cfg.warmup_ratio, 0.0))


def eval_every(cfg: TrainConfig, n_train: int) -> int:
    """The requested eval_steps, widened so a run evaluates at most MAX_EVALS times (+ the final
    re-evaluation): each validation pass is paid GPU time that trains nothing."""
    return max(cfg.eval_steps, math.ceil(planned_steps(cfg, n_train) / MAX_EVALS))


def optimizer_name(plan: Plan) -> str:
    if plan.backend == "unsloth":
        return "adamw_8bit"
    return "paged_adamw_8bit" if plan.load_in_4bit else "adamw_torch"


def sft_config_kwargs(cfg: TrainConfig, plan: Plan, output_dir: str, n_train: int) -> dict[str, Any]:
    """trl SFTConfig kwargs: eval on val every eval_every() steps, checkpoint at each eval, reload the
    lowest eval_loss checkpoint at the end; the dataset is pre-tokenized with prompt labels already -100."""
    unsloth = plan.backend == "unsloth"
    checkpointing = plan.cuda and not unsloth  # unsloth applies its own ("unsloth") in get_peft_model
    every = eval_every(cfg, n_train)
    kwargs: dict[str, Any] = {
        "output_dir": output_dir,
        "per_device_train_batch_size": cfg.batch_size,
        "per_device_eval_batch_size": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "learning_rate": cfg.learning_rate,
        "num_train_epochs": cfg.num_epochs,
        "max_steps": cfg.max_steps,
        "warmup_steps": warmup_steps(cfg, n_train),
        "lr_scheduler_type": "linear",
        "logging_steps": max(1, min(10, every)),
        "eval_strategy": "steps",
        "eval_steps": every,
        "save_strategy": "steps",
        "save_steps": every,  # a checkpoint at every eval: load_best_model_at_end needs it
        "save_total_limit": 2,  # the best checkpoint is never rotated out while load_best_model_at_end
        "save_only_model": True,
        "load_best_model_at_end": True,
        "metric_for_best_model": "eval_loss",
        "greater_is_better": False,
        "seed": cfg.seed,
        "report_to": "none",
        "disable_tqdm": True,
        "use_cpu": not plan.cuda,
        "bf16": plan.bf16,
        "fp16": plan.fp16,
        "optim": optimizer_name(plan),
        "max_length": cfg.max_seq_len,
        "packing": False,
        "dataset_kwargs": {"skip_prepare_dataset": True},
        "remove_unused_columns": False,
        "dataloader_num_workers": 0,
        "gradient_checkpointing": checkpointing,
    }
    if checkpointing:
        kwargs["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
    if unsloth:
        kwargs["dataset_text_field"] = ""  # unsloth's recipe for pre-tokenized data: never re-tokenize
    return kwargs


def merge_method(cfg: TrainConfig, plan: Plan) -> str | None:
    """How to produce the 16-bit merged model worker-vllm serves (None: not requested).
    A 4-bit base is never merged in place: that would bake quantization error into 16-bit weights."""
    if not cfg.save_merged:
        return None
    if plan.backend == "unsloth":
        return "unsloth"  # save_pretrained_merged(save_method="merged_16bit") dequantizes properly
    return "reload_16bit" if plan.load_in_4bit else "in_place"


def push_target(cfg: TrainConfig, hf_token: str | None) -> str | None:
    """The Hub repo the exports go to, or None: without a repo and a token nothing leaves the pod,
    so nothing but the adapter (served under /artifacts) is built."""
    return cfg.hf_repo if cfg.hf_repo and hf_token else None


def gguf_skip_reason(
    cfg: TrainConfig, plan: Plan, which: Any = None, llama_cpp_dir: str | None = None
) -> str | None:
    """None: try save_pretrained_gguf. Otherwise why not (only recorded when GGUF was requested).
    unsloth uses a prebuilt llama.cpp at UNSLOTH_LLAMA_CPP_PATH (the unsloth image ships one at
    /opt/unsloth/llama.cpp), else builds it, which needs git, cmake or make, and a C compiler."""
    if not cfg.save_gguf:
        return "not requested"
    if plan.backend != "unsloth":
        return "GGUF export needs the unsloth backend (CUDA + unsloth)"
    if llama_cpp_dir is None:
        llama_cpp_dir = os.environ.get("UNSLOTH_LLAMA_CPP_PATH") or str(Path.home() / ".unsloth" / "llama.cpp")
    if Path(llama_cpp_dir).is_dir():
        return None
    which = which or shutil.which
    missing = [
        " or ".join(alts) for alts in (("git",), ("cmake", "make"), ("cc", "gcc")) if not any(which(a) for a in alts)
    ]
    return f"image lacks {', '.join(missing)} to build llama.cpp" if missing else None


# ---------------------------------------------------------------------------
# Data preparation (pure python; no heavy imports)
# ---------------------------------------------------------------------------

_ROLES = ("system", "user", "assistant")


def validate_job(job: JobRequest) -> None:
    """Cheap checks before the heavy ML imports, so a bad job fails fast with a clear error."""
    cfg = job.config
    if not job.train:
        raise ValueError("train split is empty")
    if not job.val:
        raise ValueError("val split is empty")
    for name, rows in (("train", job.train), ("val", job.val)):
        for i, row in enumerate(rows):
            split_row(row, where=f"{name}[{i}]")
    if cfg.lora_r < 1 or cfg.lora_alpha < 1:
        raise ValueError("lora_r and lora_alpha must be >= 1")
    if cfg.eval_steps < 1 or cfg.batch_size < 1 or cfg.grad_accum < 1 or cfg.max_seq_len < 8:
        raise ValueError("eval_steps, batch_size, grad_accum must be >= 1 and max_seq_len >= 8")
    if cfg.max_steps == 0 or (cfg.max_steps < 0 and cfg.num_epochs <= 0):
        raise ValueError("need max_steps > 0 or num_epochs > 0")
    if not (0 < cfg.learning_rate < 1):
        raise ValueError("learning_rate must be in (0, 1)")
    if cfg.max_new_tokens < 1 or cfg.gen_batch_size < 1 or cfg.max_train_s < 0:
        raise ValueError("max_new_tokens and gen_batch_size must be >= 1 and max_train_s >= 0")


def split_row(row: ChatRow, where: str = "row") -> tuple[list[dict[str, str]], dict[str, str]]:
    """Prompt = every message before the final assistant turn; completion = that turn."""
    msgs = row.messages
    if not msgs or msgs[-1].get("role") != "assistant":
        raise ValueError(f"{where}: last message must have role 'assistant'")
    for m in msgs:
        if m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}: each message needs role system|user|assistant and string content")
    if len(msgs) < 2:
        raise ValueError(f"{where}: needs at least one prompt message before the assistant turn")
    return msgs[:-1], msgs[-1]


def _answer_ids(tokenizer: Any, answer_text: str) -> list[int]:
    """Assistant-turn ids ending in exactly one end-of-sequence token: text a template puts after the
    eos (Qwen/ChatML's trailing newline) is dropped, and an eos is appended when the template has none."""
    ids = list(tokenizer(answer_text, add_special_tokens=False)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is None:
        return ids
    if eos in ids:
        return ids[: len(ids) - ids[::-1].index(eos)]
    return ids + [eos]


def tokenize_rows(tokenizer: Any, rows: list[ChatRow], max_len: int) -> list[dict[str, list[int]]]:
    """input_ids/attention_mask/labels with the prompt masked (-100): train on responses only.

    Same effect as unsloth's ``train_on_responses_only`` but template-agnostic (Llama 3, Qwen/ChatML,
    Gemma, Mistral, Phi all work through the tokenizer's own chat template): the prompt is the template
    rendered with ``add_generation_prompt=True``, so the assistant header is masked too."""
    out: list[dict[str, list[int]]] = []
    for row in rows:
        prompt, answer = split_row(row)
        prompt_text = render_prompt(tokenizer, prompt)
        full_text = tokenizer.apply_chat_template(prompt + [answer], tokenize=False)
        if not full_text.startswith(prompt_text):  # template renders the prompt differently
            cut = full_text.rfind(answer["content"])
            if cut < 0:
                raise ValueError("chat template does not reproduce the assistant text")
            prompt_text = full_text[:cut]
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        answer_ids = _answer_ids(tokenizer, full_text[len(prompt_text) :])
        ids = (prompt_ids + answer_ids)[:max_len]
        labels = ([-100] * len(prompt_ids) + answer_ids)[:max_len]
        if all(t == -100 for t in labels):
            continue  # prompt alone fills max_len: nothing to learn
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    if not out:
        raise ValueError("every example was truncated away; raise max_seq_len")
    return out


def render_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The chat template up to and including the assistant header: what the model continues."""
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def job_texts(job: JobRequest) -> list[str]:
    rows = [m for r in job.train + job.val for m in r.messages] + [m for p in job.eval_prompts for m in p.messages]
    return [m.get("content", "") for m in rows]


# ---------------------------------------------------------------------------
# Model loading
# ---------------------------------------------------------------------------

# Tiny-tokenizer special tokens and chat template (test and smoke-test models only).
_ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
_END, _PAD = "<|end|>", "<|pad|>"
_TINY_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def ensure_chat_template(tokenizer: Any) -> Any:
    """Base models without a chat template get ChatML closed by their eos; pad falls back to eos.
    A template the tokenizer ships (instruct models) is always kept: it is what the model knows."""
    if not getattr(tokenizer, "chat_template", None):
        if tokenizer.eos_token is None:
            raise ValueError("tokenizer has neither a chat template nor an eos token")
        tokenizer.chat_template = FALLBACK_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _torch_dtype(name: str | None) -> Any:
    import torch

    return getattr(torch, name) if name else None


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def build_tiny_tokenizer(texts: list[str], vocab_size: int = 400) -> Any:
    """Byte-level BPE trained on the given texts, with the tiny chat template (test-only model)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [_PAD, _END, *_ROLE_TOKENS.values()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=_PAD, eos_token=_END, additional_special_tokens=list(_ROLE_TOKENS.values())
    )
    tokenizer.chat_template = _TINY_TEMPLATE
    return tokenizer


def build_tiny_llama(
    tokenizer: Any, *, seed: int, max_len: int, hidden: int = 64, layers: int = 2, heads: int = 4
) -> Any:
    """A randomly initialised Llama sized for the tokenizer (tests; bench/gpu_smoke.py uses it bigger)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max(max_len, 64),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def build_tiny_model(job: JobRequest) -> tuple[Any, Any]:
    """Tiny random Llama + a byte-level BPE tokenizer trained on the job's own texts. No hub."""
    tokenizer = build_tiny_tokenizer(job_texts(job))
    return build_tiny_llama(tokenizer, seed=job.config.seed, max_len=job.config.max_seq_len), tokenizer


def load_transformers(job: JobRequest, plan: Plan, hf_token: str | None) -> tuple[Any, Any]:
    """transformers + peft: CPU fp32, CUDA 16-bit, or CUDA QLoRA (bitsandbytes nf4 + kbit prep)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = job.config
    if cfg.tiny_random_model:
        model, tokenizer = build_tiny_model(job)
    else:
        tokenizer = ensure_chat_template(AutoTokenizer.from_pretrained(cfg.base_model, token=hf_token))
        kwargs = transformers_load_kwargs(plan, hf_token)
        if "dtype" in kwargs:
            kwargs["dtype"] = _torch_dtype(kwargs["dtype"])
        bnb = bnb_config_kwargs(plan)
        if bnb is not None:
            from transformers import BitsAndBytesConfig

            bnb["bnb_4bit_compute_dtype"] = _torch_dtype(bnb["bnb_4bit_compute_dtype"])
            kwargs["quantization_config"] = BitsAndBytesConfig(**bnb)
        model = AutoModelForCausalLM.from_pretrained(cfg.base_model, **kwargs)
        if bnb is not None:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
            )
    return get_peft_model(model, LoraConfig(**lora_config_kwargs(cfg))), tokenizer


def load_unsloth(job: JobRequest, plan: Plan, hf_token: str | None) -> tuple[Any, Any]:
    from unsloth import FastLanguageModel

    cfg = job.config
    kwargs = unsloth_load_kwargs(cfg, plan, hf_token)
    kwargs["dtype"] = _torch_dtype(kwargs["dtype"])
    model, tokenizer = FastLanguageModel.from_pretrained(**kwargs)
    model = FastLanguageModel.get_peft_model(model, **unsloth_peft_kwargs(cfg))
    return model, ensure_chat_template(tokenizer)


def load_model(job: JobRequest, plan: Plan, hf_token: str | None) -> tuple[Any, Any]:
    """Load the spec's base model (TrainConfig.base_model, never replaced here) with LoRA attached."""
    loader = load_unsloth if plan.backend == "unsloth" else load_transformers
    try:
        return loader(job, plan, hf_token)
    except Exception as exc:  # classified for the bot
        if error_code_for(exc) == "out_of_memory":
            raise
        raise JobFailure("model_load", f"could not load base model {job.config.base_model!r}: "
                                       f"{type(exc).__name__}: {exc}") from exc


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


def make_callback(state: JobState, max_train_s: float = 0.0) -> Any:
    from transformers import TrainerCallback

    class ProgressCallback(TrainerCallback):
        """Mirrors trainer state into Progress; turns POST /stop or the time cap into a graceful stop
        (final eval so the last stretch can win "best", then the best checkpoint is reloaded)."""

        def __init__(self) -> None:
            self._t0 = time.monotonic()
            self.stop_reason: str | None = None

        def on_train_begin(self, args: Any, tstate: Any, control: Any, **kw: Any) -> None:
            self._t0 = time.monotonic()
            state.update(state="training", max_steps=int(tstate.max_steps))

        def on_step_end(self, args: Any, tstate: Any, control: Any, **kw: Any) -> Any:
            step = int(tstate.global_step)
            elapsed = time.monotonic() - self._t0
            eta = max(int(tstate.max_steps) - step, 0) * elapsed / max(step, 1)
            state.update(step=step, epoch=float(tstate.epoch or 0.0), eta_s=round(eta, 1))
            if self.stop_reason is None:
                if state.stop.is_set():
                    self.stop_reason = "user"
                elif max_train_s > 0 and elapsed >= max_train_s:
                    self.stop_reason = "time_cap"
                if self.stop_reason is not None:
                    log.warning("stopping at step %d (%s)", step, self.stop_reason)
                    state.update(stop_reason=self.stop_reason)
                    control.should_training_stop = True
                    control.should_evaluate = True
                    control.should_save = True
            return control

        def on_log(self, args: Any, tstate: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any) -> None:
            if logs and "loss" in logs and math.isfinite(logs["loss"]):
                state.record_train(int(tstate.global_step), float(logs["loss"]))

        def on_evaluate(
            self, args: Any, tstate: Any, control: Any, metrics: dict[str, float] | None = None, **kw: Any
        ) -> None:
            if metrics and "eval_loss" in metrics:
                state.record_eval(int(tstate.global_step), float(metrics["eval_loss"]))

    return ProgressCallback()


@dataclass
class TrainOutcome:
    model: Any
    best_step: int | None  # the trainer's own best step (load_best_model_at_end)
    stop_reason: str | None  # "user" | "time_cap" | "early_stopping" | None (ran to the end)
    eval_every: int


def train_model(job: JobRequest, state: JobState, model: Any, tokenizer: Any, plan: Plan) -> TrainOutcome:
    """Train; the returned model is the best-eval-loss one (load_best_model_at_end)."""
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, EarlyStoppingCallback
    from trl import SFTConfig, SFTTrainer

    cfg = job.config
    train_ds = Dataset.from_list(tokenize_rows(tokenizer, job.train, cfg.max_seq_len))
    val_ds = Dataset.from_list(tokenize_rows(tokenizer, job.val, cfg.max_seq_len))
    kwargs = sft_config_kwargs(cfg, plan, str(state.workdir / "checkpoints"), len(train_ds))
    progress = make_callback(state, cfg.max_train_s)
    callbacks = [progress]
    if cfg.early_stopping_patience > 0:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience))
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(**kwargs),
        train_dataset=train_ds,
        eval_dataset=val_ds,
        processing_class=tokenizer,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
        callbacks=callbacks,
    )
    trainer.train()
    reason = progress.stop_reason
    if reason is None and trainer.state.global_step < trainer.state.max_steps:
        reason = "early_stopping"  # the only other way a run ends before its planned steps
    # Re-evaluate the model we keep: equals the best eval loss iff the best checkpoint was reloaded.
    final = trainer.evaluate(metric_key_prefix="final").get("final_loss")
    state.final_eval_loss = float(final) if final is not None else None
    best = getattr(trainer.state, "best_global_step", None)
    return TrainOutcome(trainer.model, best, reason, int(kwargs["eval_steps"]))


# ---------------------------------------------------------------------------
# Held-out generation (for the judge)
# ---------------------------------------------------------------------------


def stop_ids(model: Any, tokenizer: Any) -> list[int]:
    """End-of-turn ids: the model's generation_config ones (e.g. Llama 3 <|eot_id|>) plus the tokenizer's."""
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = list(gen) if isinstance(gen, (list, tuple)) else ([gen] if gen is not None else [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def new_tokens(row: list[int], stops: list[int], pad_id: int | None) -> list[int]:
    """A generated row's tokens up to (not including) its first stop id; trailing padding dropped."""
    out: list[int] = []
    for t in row:
        if t in stops:
            break
        out.append(t)
    while out and pad_id is not None and out[-1] == pad_id:
        out.pop()
    return out


def generate(job: JobRequest, model: Any, tokenizer: Any, plan: Plan) -> list[Generation]:
    """Greedy outputs for the held-out prompts, up to max_new_tokens each, gen_batch_size prompts at a
    time. Decoder-only batches are left-padded so every row's continuation starts at the same column."""
    import torch

    prompts = job.eval_prompts
    if not prompts:
        return []
    if plan.backend == "unsloth":
        from unsloth import FastLanguageModel

        FastLanguageModel.for_inference(model)  # unsloth's fast generation path
    model.eval()
    device = next(model.parameters()).device
    stops = stop_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops[0] if stops else None)
    texts = [render_prompt(tokenizer, p.messages) for p in prompts]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths batch together
    outputs: dict[int, str] = {}
    size = job.config.gen_batch_size
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for start in range(0, len(order), size):
            idx = order[start : start + size]
            enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = enc.to(device)
            with torch.no_grad():
                ids = model.generate(
                    **enc, max_new_tokens=job.config.max_new_tokens, do_sample=False, use_cache=True,
                    pad_token_id=pad_id, eos_token_id=stops,
                )
            width = enc["input_ids"].shape[1]
            for i, row in zip(idx, ids.tolist()):
                text = tokenizer.decode(new_tokens(row[width:], stops, pad_id), skip_special_tokens=True)
                outputs[i] = text.strip()
    finally:
        tokenizer.padding_side = side
    return [Generation(id=p.id, output=outputs[i]) for i, p in enumerate(prompts)]


# ---------------------------------------------------------------------------
# Export: adapter (always), 16-bit merge + Hub push (only together), GGUF (only when asked)
# ---------------------------------------------------------------------------


def _err(state: JobState, exc: BaseException) -> str:
    return state.scrub(f"{type(exc).__name__}: {exc}")[:300]


def save_adapter(state: JobState, model: Any, tokenizer: Any) -> Path:
    """LoRA adapter dir + the tarball the bot downloads from /artifacts."""
    adapter_dir = state.workdir / "adapter"
    model.save_pretrained(str(adapter_dir))  # LoRA adapters only
    tokenizer.save_pretrained(str(adapter_dir))
    state.artifacts_dir.mkdir(parents=True, exist_ok=True)
    tmp = state.artifacts_dir / (ADAPTER_ARTIFACT + ".part")
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(str(adapter_dir), arcname="adapter")
    tmp.replace(state.artifacts_dir / ADAPTER_ARTIFACT)
    return adapter_dir


def merge_16bit(
    method: str, cfg: TrainConfig, plan: Plan, model: Any, tokenizer: Any, adapter_dir: Path, merged_dir: Path,
    hf_token: str | None,
) -> None:
    """LoRA merged into 16-bit weights (what worker-vllm serves). "unsloth": save_pretrained_merged
    (dequantizes the 4-bit base properly; fetches the 16-bit base shards it needs); "reload_16bit":
    load the base again in 16 bit on the CPU and apply the saved adapter; "in_place": merge the trained
    model itself (a 16/32-bit base only; call it last, it unloads LoRA)."""
    if method == "unsloth":
        model.save_pretrained_merged(str(merged_dir), tokenizer, save_method="merged_16bit")
    elif method == "reload_16bit":
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(cfg.base_model, dtype=_torch_dtype(plan.dtype), token=hf_token)
        merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
        merged.save_pretrained(str(merged_dir))
        tokenizer.save_pretrained(str(merged_dir))
    else:
        merged = model.merge_and_unload()
        merged.save_pretrained(str(merged_dir))
        tokenizer.save_pretrained(str(merged_dir))
    if not any(merged_dir.glob("*.safetensors")) and not any(merged_dir.glob("*.bin")):
        raise RuntimeError("the merge wrote no weight files")


def _folder_ops(folder: Path, prefix: str = "") -> list[Any]:
    from huggingface_hub import CommitOperationAdd

    return [
        CommitOperationAdd(path_in_repo=prefix + p.relative_to(folder).as_posix(), path_or_fileobj=str(p))
        for p in sorted(folder.rglob("*")) if p.is_file()
    ]


def push_model(repo: str, hf_token: str, merged_dir: Path, adapter_dir: Path) -> None:
    """One commit: the merged weights at the repo root (what a deployment loads) and the adapter
    under adapter/. Atomic, so the repo never holds a half-uploaded model."""
    from huggingface_hub import HfApi

    api = HfApi(token=hf_token)
    api.create_repo(repo, private=True, exist_ok=True)
    ops = _folder_ops(merged_dir) + _folder_ops(adapter_dir, "adapter/")
    api.create_commit(repo, operations=ops, commit_message="tuner: merged 16-bit model + LoRA adapter")


def export_gguf(repo: str, hf_token: str, model: Any, tokenizer: Any, gguf_dir: Path) -> list[str]:
    """unsloth's GGUF (q4_k_m) uploaded under gguf/ in the same repo; returns the repo paths."""
    from huggingface_hub import CommitOperationAdd, HfApi

    result = model.save_pretrained_gguf(str(gguf_dir), tokenizer, quantization_method=GGUF_QUANT)
    listed = result.get("gguf_files") if isinstance(result, dict) else None  # unsloth >= 2026.10 returns them
    pattern = gguf_dir.name + "*"
    found = sorted(gguf_dir.parent.glob(pattern + "/**/*.gguf")) + sorted(gguf_dir.parent.glob(pattern + ".gguf"))
    files = [Path(f) for f in listed] if listed else found
    files = [f for f in files if f.is_file()]
    if not files:
        raise RuntimeError("save_pretrained_gguf wrote no .gguf file")
    ops = [CommitOperationAdd(path_in_repo=f"gguf/{f.name}", path_or_fileobj=str(f)) for f in files]
    HfApi(token=hf_token).create_commit(repo, operations=ops, commit_message="tuner: GGUF " + GGUF_QUANT)
    return [op.path_in_repo for op in ops]


def export_outputs(
    job: JobRequest, state: JobState, model: Any, tokenizer: Any, plan: Plan, hf_token: str | None
) -> ExportReport:
    """Adapter always (served under /artifacts). Merge, push and GGUF only for a run that will reach
    the Hub: a merged model or a GGUF that nothing uploads dies with the pod. Failures are reported
    in the ExportReport, never fatal: the adapter is already safe."""
    cfg = job.config
    state.update(state="exporting", eta_s=None)
    report = ExportReport()
    adapter_dir = save_adapter(state, model, tokenizer)
    report.adapter = True
    repo = push_target(cfg, hf_token)
    method = merge_method(cfg, plan)
    if repo is None or method is None:
        why = ("no hf_repo" if not cfg.hf_repo else "no HF_TOKEN on the pod" if not hf_token
               else "save_merged is off, so there is no servable model")
        report.push_error = f"not pushed: {why}" if cfg.hf_repo else None
        report.gguf_error = f"not built: {why}, nothing would upload it" if cfg.save_gguf else None
        return report
    assert hf_token is not None
    merged_dir = state.workdir / "merged"
    try:
        merge_16bit(method, cfg, plan, model, tokenizer, adapter_dir, merged_dir, hf_token)
        report.merged = True
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - unsloth may sys.exit on a failed merge
        report.merged_error = _err(state, exc)
        report.push_error = "not pushed: the 16-bit merge failed, and a repo without a model cannot be deployed"
        return report
    try:
        push_model(repo, hf_token, merged_dir, adapter_dir)
        report.pushed = report.adapter_pushed = True
    except Exception as exc:  # noqa: BLE001 - reported to the bot at the end of the run
        report.push_error = _err(state, exc)
        return report
    skip = gguf_skip_reason(cfg, plan)
    if cfg.save_gguf and skip is not None:
        report.gguf_error = skip
    elif cfg.save_gguf:
        shutil.rmtree(merged_dir, ignore_errors=True)  # on the Hub now; the GGUF conversion needs the disk
        try:
            report.gguf_files = export_gguf(repo, hf_token, model, tokenizer, state.workdir / "gguf")
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - no llama.cpp must never fail the run
            report.gguf_error = _err(state, exc)
    return report


# ---------------------------------------------------------------------------
# Job orchestration
# ---------------------------------------------------------------------------


def run_job(job: JobRequest, state: JobState) -> Results:
    cfg = job.config
    try:
        validate_job(job)
    except ValueError as exc:
        raise JobFailure("bad_job", str(exc)) from exc
    check_cuda(cfg)  # before any model is downloaded or loaded
    hf_token = os.environ.get("HF_TOKEN") or None
    plan = probe_plan(cfg)
    state.update(backend=plan.backend)
    model, tokenizer = load_model(job, plan, hf_token)
    trained = train_model(job, state, model, tokenizer, plan)
    state.update(state="generating", eta_s=None)
    generations = generate(job, trained.model, tokenizer, plan)
    report = export_outputs(job, state, trained.model, tokenizer, plan, hf_token)
    p = state.snapshot()
    return Results(
        job_id=cfg.job_id,
        state="stopped" if trained.stop_reason in ("user", "time_cap") else "succeeded",
        best_step=p.best_step,
        best_eval_loss=p.best_eval_loss,
        stop_reason=trained.stop_reason,  # type: ignore[arg-type]
        generations=generations,
        artifacts=[ADAPTER_ARTIFACT] if report.adapter else [],
        hf_repo=cfg.hf_repo if report.pushed else None,
        export=report,
        extra={
            "backend": plan.backend,
            "base_model": "tiny-random" if cfg.tiny_random_model else cfg.base_model,
            "load_in_4bit": plan.load_in_4bit,
            "dtype": plan.dtype,
            "steps": p.step,
            "eval_steps": trained.eval_every,
            "trainer_best_step": trained.best_step,
            "final_eval_loss": state.final_eval_loss,
            # what older bots read: why an attempted push left no model on the Hub
            "hf_error": (report.merged_error or report.push_error) if push_target(cfg, hf_token) else None,
        },
    )


# ---------------------------------------------------------------------------
# HTTP server
# ---------------------------------------------------------------------------

_MAX_BODY = 512 * 1024 * 1024


def make_handler(state: JobState, token: str) -> type[BaseHTTPRequestHandler]:
    expected = f"Bearer {token}".encode()

    class Handler(BaseHTTPRequestHandler):
        server_version = "tuner-pod/1"
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - no headers logged
            log.info("%s %s", self.address_string(), format % args)

        def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, obj: Any) -> None:
            data = obj.model_dump_json() if hasattr(obj, "model_dump_json") else json.dumps(obj)
            self._send(status, data.encode())

        def _authorised(self) -> bool:
            given = self.headers.get("Authorization", "").encode()
            if hmac.compare_digest(given, expected):
                state.last_contact = time.monotonic()
                return True
            self.close_connection = True  # any unread request body must not poison keep-alive
            self._json(HTTPStatus.UNAUTHORIZED, {"error": "unauthorized"})
            return False

        def do_GET(self) -> None:  # noqa: N802
            if self.path == "/health":
                return self._json(HTTPStatus.OK, {"ok": True})
            if not self._authorised():
                return None
            if self.path == "/progress":
                return self._json(HTTPStatus.OK, state.snapshot())
            if self.path == "/results":
                with state.lock:
                    results = state.results
                if results is None:
                    return self._json(HTTPStatus.CONFLICT, {"error": f"no results in state {state.snapshot().state}"})
                return self._json(HTTPStatus.OK, results)
            if self.path.startswith("/artifacts/"):
                return self._artifact(self.path.removeprefix("/artifacts/"))
            return self._json(HTTPStatus.NOT_FOUND, {"error": "not found"})

        def _artifact(self, name: str) -> None:
            path = state.artifacts_dir / name
            if "/" in name or name.startswith(".") or not path.is_file():
                return self._json(HTTPStatus.NOT_FOUND, {"error": "no such artifact"})
            self._send(HTTPStatus.OK, path.read_bytes(), "application/octet-stream")

        def do_POST(self) -> None:  # noqa: N802
            if not self._authorised():  # before reading: strangers never make us buffer a body
                return None
            length = int(self.headers.get("Content-Length") or 0)
            if length > _MAX_BODY:
                self.close_connection = True
                return self._json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": "body too large"})
            body = self.rfile.read(length) if length else b""
            if self.path == "/job":
                try:
                    job = JobRequest.model_validate_json(body)
                except ValidationError as exc:
                    return self._json(HTTPStatus.BAD_REQUEST, {"error": str(exc)[:1000]})
                status, progress = state.start(job)
                return self._json(status, progress)
            if self.path == "/stop":
                if state.snapshot().job_id is not None:  # no job yet: nothing to stop
                    state.stop.set()
                return self._json(HTTPStatus.ACCEPTED, state.snapshot())
            return self._json(HTTPStatus.NOT_FOUND, {"error": "not found"})

    return Handler


IDLE_ENV = "TUNER_POD_IDLE_TIMEOUT_S"
DEFAULT_IDLE_TIMEOUT_S = 3600.0


def idle_watchdog(state: JobState, timeout_s: float, on_idle: Any, tick_s: float = 5.0) -> None:
    """Dead-man's switch: a pod nobody talks to must not bill forever.

    While training runs the pod never gives up; once the job is finished (or none ever
    arrived) and the bot has not polled for `timeout_s`, `on_idle()` removes the pod.
    """
    while True:
        time.sleep(min(tick_s, timeout_s))
        busy = state.snapshot().state not in TERMINAL_STATES | {"waiting"}
        if busy:
            continue
        if time.monotonic() - state.last_contact >= timeout_s:
            on_idle()
            return


def remove_this_pod() -> None:
    """Terminate the pod from inside with runpodctl's pod-scoped key, then exit."""
    pod_id = os.environ.get("RUNPOD_POD_ID", "")
    log.warning("no contact from the bot; removing pod %s", pod_id or "(unknown)")
    if pod_id and shutil.which("runpodctl"):
        try:
            subprocess.run(["runpodctl", "remove", "pod", pod_id], timeout=60, check=False)
        except (OSError, subprocess.SubprocessError) as exc:
            log.error("runpodctl failed: %s", type(exc).__name__)
    os._exit(3)


def make_server(host: str, port: int, token: str, workdir: Path) -> tuple[ThreadingHTTPServer, JobState]:
    state = JobState(workdir, secrets=[token, os.environ.get("HF_TOKEN", "")])
    server = ThreadingHTTPServer((host, port), make_handler(state, token))
    server.daemon_threads = True
    return server, state


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="tuner pod training server")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=int(os.environ.get("TUNER_POD_PORT", POD_PORT)))
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    token = os.environ.get(TOKEN_ENV, "")
    if not token:
        log.error("%s is not set; refusing to start", TOKEN_ENV)
        return 2
    default_dir = "/workspace/tuner" if Path("/workspace").is_dir() else tempfile.mkdtemp(prefix="tuner-")
    workdir = Path(os.environ.get("TUNER_WORKDIR") or default_dir)
    workdir.mkdir(parents=True, exist_ok=True)
    server, state = make_server(ns.host, ns.port, token, workdir)
    idle_s = float(os.environ.get(IDLE_ENV) or DEFAULT_IDLE_TIMEOUT_S)
    threading.Thread(target=idle_watchdog, args=(state, idle_s, remove_this_pod),
                     name="idle-watchdog", daemon=True).start()
    log.info("listening on %s:%d, workdir %s", ns.host, server.server_address[1], workdir)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
