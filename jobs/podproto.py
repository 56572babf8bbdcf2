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
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

POD_PORT = 8000
TOKEN_ENV = "TUNER_POD_TOKEN"
ADAPTER_ARTIFACT = "adapter.tar.gz"

State = Literal["waiting", "loading", "training", "generating", "succeeded", "stopped", "failed"]
TERMINAL_STATES: frozenset[str] = frozenset({"succeeded", "stopped", "failed"})


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
    save_merged: bool = True
    save_gguf: bool = False
    hf_repo: str | None = None  # push adapters/merged model here when HF_TOKEN is set
    max_new_tokens: int = 256
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


class Generation(BaseModel):
    id: str
    output: str


class Results(BaseModel):
    job_id: str
    state: State
    best_step: int | None
    best_eval_loss: float | None
    generations: list[Generation] = Field(default_factory=list)
    artifacts: list[str] = Field(default_factory=list)
    hf_repo: str | None = None
    extra: dict[str, Any] = Field(default_factory=dict)
