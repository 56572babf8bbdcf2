"""Graph state: ids and small data only. Datasets, runs and results live in storage."""

from __future__ import annotations

from typing import Any, TypedDict


class AgentState(TypedDict, total=False):
    thread_id: str  # team:channel:thread_ts
    project_id: int
    messages: list[dict[str, str]]  # define conversation: {"role", "content"}
    spec: dict[str, Any] | None  # TaskSpec.model_dump()
    spec_row_id: int | None
    guidelines: list[str]  # sample feedback, applied to every later generation
    samples: list[dict[str, str]]  # current sample round: {"prompt", "response"}
    edited: list[int]  # indexes into `samples` the user edited this round
    gold_examples: list[dict[str, str]]  # user-edited samples: few-shot + train split
    sample_round: int
    dataset_id: int | None
    launch_card: dict[str, Any] | None  # {"estimate": {...}, "dataset": {...}}
    launch_user: str | None
    run_id: int | None
    best_eval_loss: float | None
    generations: dict[str, str]  # held-out example id -> model output (until judged)
    eval_id: int | None
    eval_summary: dict[str, float] | None  # win_rate, ci_low, ci_high for the deploy card
    deployment_id: int | None
    deploy_info: dict[str, str] | None  # endpoint_id, curl for the deployed card
    # an upload until imported: {"filename", "examples", "stats", "user", "comment",
    # "progress"} (agent/importing.py), or {"filename", "content"} from older checkpoints
    pending_import: dict[str, Any] | None
    return_to: str | None  # waiting node to go back to when an import fails
    failed_node: str | None  # node to re-run from the retry card
    error: str | None
