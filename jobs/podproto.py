"""Wire contract between the bot-side trainer client and `jobs/train.py` on the pod.

This module must stay importable on the pod with only pydantic installed.

HTTP, port 8000 on 0.0.0.0, reached through TUNER_POD_URL_TEMPLATE.
Every endpoint except GET /health requires `Authorization: Bearer <TUNER_POD_TOKEN>`
(the token is passed in the pod env); a wrong or missing token gets 401.

  GET  /health              -> {"ok": true}
  POST /job   JobRequest    -> 202 Progress (starts training in a background thread;
                               re-posting the same job_id is a no-op 200; another job_id 409)
  GET  /progress            -> Progress
  POST /stop                -> 202 Progress (stop early, keep the best checkpoint)
  GET  /results             -> Results (409 until state is succeeded|stopped)
  GET  /artifacts/{name}    -> bytes (e.g. adapter.tar.gz)

Failure contract: a job that cannot run ends in state "failed" with `error` (plain words,
no secrets) and `error_code` (one of ERROR_CODES) so the bot can explain it without
parsing text. A stopped job says why in `stop_reason`. What happened to the exports
(merge, Hub push, GGUF) is reported in Results.export, so the bot can tell the user when
training ends instead of when they click Deploy.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

POD_PORT = 8000
TOKEN_ENV = "TUNER_POD_TOKEN"
ADAPTER_ARTIFACT = "adapter.tar.gz"

State = Literal[
    "waiting",  # server up, no job yet
    "loading",  # checking the machine, loading the base model
    "training",
    "generating",  # held-out outputs for the judge
    "exporting",  # adapter, merged 16-bit model, GGUF, Hub push
    "succeeded",
    "stopped",  # stopped early (see stop_reason); the best checkpoint is kept
    "failed",
]
TERMINAL_STATES: frozenset[str] = frozenset({"succeeded", "stopped", "failed"})

# Why a job stopped before its planned steps.
StopReason = Literal["user", "time_cap", "early_stopping"]
# Machine-readable failure kinds (Progress.error_code).
ErrorCode = Literal[
    "cuda_unavailable",  # a real job on a machine whose CUDA torch cannot use (driver/build)
    "bad_job",  # the job failed validation before any heavy import
    "out_of_memory",  # CUDA OOM while loading or training
    "model_load",  # the base model could not be downloaded or loaded
    "internal",  # anything else
]


class TrainConfig(BaseModel):
    job_id: str
    base_model: str = "unsloth/Llama-3.2-1B-Instruct"
    max_seq_len: int = 2048
    load_in_4bit: bool = True
    lora_r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    learning_rate: float = 2e-4
    num_epochs: float = 3.0
    max_steps: int = -1
    batch_size: int = 8
    grad_accum: int = 1
    warmup_ratio: float = 0.05
    eval_steps: int = 20
    early_stopping_patience: int = 3
    seed: int = 42
    save_merged: bool = True  # 16-bit merge; only done when hf_repo is set (nothing else uses it)
    save_gguf: bool = False  # GGUF export, uploaded to hf_repo; only when asked for
    hf_repo: str | None = None  # push adapters/merged model here when HF_TOKEN is set
    max_new_tokens: int = 1024  # held-out generation length: the spec's max output tokens
    gen_batch_size: int = 8  # held-out prompts generated per batch
    # Training-phase wall-clock cap (seconds, 0 = none): past it the trainer stops as if
    # POST /stop had arrived (stop_reason "time_cap"), keeping the best checkpoint.
    max_train_s: float = 0.0
    # A real job refuses to run without usable CUDA (error_code "cuda_unavailable")
    # instead of training for hours on the CPU of a paid GPU pod. Tests set False.
    require_cuda: bool = True
    # Test-only: build a tiny randomly initialised model + tokenizer locally (no hub).
    tiny_random_model: bool = False


class ChatRow(BaseModel):
    """OpenAI chat format row: system?/user/assistant messages."""

    messages: list[dict[str, str]]


class EvalPrompt(BaseModel):
    id: str
    messages: list[dict[str, str]]  # system?/user; the model writes the assistant turn


class JobRequest(BaseModel):
    config: TrainConfig
    train: list[ChatRow]
    val: list[ChatRow]
    eval_prompts: list[EvalPrompt] = Field(default_factory=list)


class Progress(BaseModel):
    job_id: str | None = None
    state: State = "waiting"
    step: int = 0
    max_steps: int = 0
    epoch: float = 0.0
    train_loss: list[tuple[int, float]] = Field(default_factory=list)  # (step, loss)
    eval_loss: list[tuple[int, float]] = Field(default_factory=list)
    best_step: int | None = None
    best_eval_loss: float | None = None
    eta_s: float | None = None
    elapsed_s: float = 0.0
    backend: str = ""  # "unsloth" | "transformers"
    error: str | None = None
    error_code: ErrorCode | None = None
    stop_reason: StopReason | None = None


class Generation(BaseModel):
    id: str
    output: str


class ExportReport(BaseModel):
    """What the pod managed to save and upload. Errors are short, scrubbed of secrets."""

    adapter: bool = False  # adapter.tar.gz is served under /artifacts
    merged: bool = False  # a 16-bit merged model was written
    merged_error: str | None = None
    adapter_pushed: bool = False  # the adapter is on the Hub under adapter/
    pushed: bool = False  # the merged 16-bit weights are on the Hub: what a deployment serves
    push_error: str | None = None
    gguf_files: list[str] = Field(default_factory=list)  # uploaded to hf_repo
    gguf_error: str | None = None


class Results(BaseModel):
    job_id: str
    state: State
    best_step: int | None
    best_eval_loss: float | None
    stop_reason: StopReason | None = None
    generations: list[Generation] = Field(default_factory=list)
    artifacts: list[str] = Field(default_factory=list)
    # Set only when a loadable model reached the Hub repo (never for a repo without weights).
    hf_repo: str | None = None
    export: ExportReport = Field(default_factory=ExportReport)
    extra: dict[str, Any] = Field(default_factory=dict)  # diagnostics: backend, dtype, steps...
