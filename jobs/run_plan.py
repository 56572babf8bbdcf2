"""From an approved spec and a dataset to what one run needs: model, GPUs, disk, caps.

The plan is computed once, at launch, and kept on the Run (config["plan"]) so a bot that
restarts mid-run builds the same job and enforces the same time cap. Everything it
derives comes from jobs/catalog.py (model and GPU facts) and jobs/estimate.py (time).

Wall-clock cap (seconds from the pod's creation, Run.started_at):
  cap_s       = min(max(TUNER_RUN_CAP_FACTOR x estimated total, estimated total +
                CAP_FLOOR_S), TUNER_MAX_RUN_HOURS): past it the bot terminates the pod,
                whatever it is doing.
  stop_at_s   = cap_s - min(factor x estimated generation+export+teardown, cap_s / 2):
                past it the bot sends POST /stop (the pod keeps its best checkpoint and
                still generates and exports).
  max_train_s = min(max(factor x estimated training+evals, that + TRAIN_CAP_FLOOR_S),
                stop_at_s - estimated boot+load), at least 1 s: the pod's own cap on its
                training phase (TrainConfig.max_train_s), so a pod the bot cannot reach
                still stops in time.
The floors matter for small runs, whose time is dominated by what the estimate knows
least: image pull, and unsloth's torch.compile warm-up (~5 min by unsloth's own
benchmarks page); a factor of a few minutes would stop them for no reason. The hard
TUNER_MAX_RUN_HOURS always wins.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from sqlmodel import col, select

from jobs.catalog import (
    SupportedModel,
    cuda_versions_for_image,
    gpu_types_for,
    lookup,
    supported_list_text,
)
from jobs.estimate import RunEstimate, Workload, row_tokens
from jobs.podproto import TrainConfig
from jobs.values import UnsupportedModelError
from storage.db import Database
from storage.models import Example, TaskSpecRow
from storage.settings import Settings

DEFAULT_BASE_MODEL = TrainConfig.model_fields["base_model"].default
MAX_EVAL_PROMPTS = 50  # held-out prompts the pod generates answers for
CAP_FLOOR_S = 900.0  # the run's cap is at least the estimate + 15 min
TRAIN_CAP_FLOOR_S = 600.0  # the pod's training cap is at least its estimate + 10 min


@dataclass(frozen=True)
class RunPlan:
    base_model: str
    max_new_tokens: int
    eval_steps: int
    max_train_s: float
    cap_s: float
    stop_at_s: float
    gpu_types: list[str]
    container_disk_gb: int
    cuda_versions: list[str]
    est_total_s: float

    def to_config(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_config(cls, value: Any) -> RunPlan | None:
        if not isinstance(value, dict):
            return None
        try:
            return cls(**{k: value[k] for k in cls.__dataclass_fields__})
        except (KeyError, TypeError):
            return None


def approved_spec(db: Database, project_id: int) -> dict[str, Any]:
    with db.session() as s:
        row = s.exec(
            select(TaskSpecRow).where(TaskSpecRow.project_id == project_id, TaskSpecRow.approved)
            .order_by(col(TaskSpecRow.version).desc(), col(TaskSpecRow.id).desc())
        ).first()
    return dict(row.spec or {}) if row else {}


def unsupported_text(model_id: str) -> str:
    return (f"`{model_id}` is not a supported base model. Supported models:\n"
            + supported_list_text())


def model_for(spec: dict[str, Any]) -> SupportedModel:
    wanted = str(spec.get("base_model") or DEFAULT_BASE_MODEL)
    model = lookup(wanted)
    if model is None:
        raise UnsupportedModelError(unsupported_text(wanted))
    return model


def max_new_tokens_for(spec: dict[str, Any]) -> int:
    value = spec.get("max_output_tokens")
    default = TrainConfig.model_fields["max_new_tokens"].default
    return int(value) if isinstance(value, int) and value > 0 else default


def hub_configured(settings: Settings) -> bool:
    return bool(settings.hf_token and settings.tuner_hf_namespace)


def workload_for(db: Database, dataset_id: int, spec: dict[str, Any], model: SupportedModel,
                 cfg: dict[str, Any], *, push: bool) -> Workload:
    """The dataset as token lengths, with the TrainConfig values the pod will use."""
    tc = TrainConfig.model_validate({"job_id": "plan", **cfg})
    system = len(str(spec.get("system_prompt") or ""))
    with db.session() as s:
        rows = s.exec(select(Example.split, Example.prompt, Example.response)
                      .where(Example.dataset_id == dataset_id).order_by(col(Example.id))).all()

    def toks(split: str) -> list[int]:
        return [row_tokens(system + len(p) + len(r), model.family) for sp, p, r in rows if sp == split]

    held = [r for sp, _, r in rows if sp == "test"] or [r for sp, _, r in rows if sp == "val"]
    return Workload(
        train_tokens=toks("train"), val_tokens=toks("val"),
        gen_tokens=[math.ceil(len(r) / 4) + 1 for r in held[:MAX_EVAL_PROMPTS]],
        epochs=tc.num_epochs, batch_size=tc.batch_size, grad_accum=tc.grad_accum,
        max_seq_len=tc.max_seq_len, max_steps=tc.max_steps,
        eval_steps=int(cfg["eval_steps"]) if "eval_steps" in cfg else None,
        max_new_tokens=tc.max_new_tokens, gen_batch_size=tc.gen_batch_size,
        push=push and tc.save_merged, gguf=tc.save_gguf,
    )


def make_plan(est: RunEstimate, settings: Settings, *, model: SupportedModel, gpu_types: list[str],
              max_new_tokens: int, gguf: bool) -> RunPlan:
    factor = settings.tuner_run_cap_factor
    wanted = max(factor * est.total_s, est.total_s + CAP_FLOOR_S)
    cap_s = min(wanted, settings.tuner_max_run_hours * 3600.0)
    stop_at_s = cap_s - min(factor * est.post_train_s, cap_s / 2)
    train_cap = max(factor * est.train_phase_s, est.train_phase_s + TRAIN_CAP_FLOOR_S)
    max_train_s = max(1.0, min(train_cap, stop_at_s - est.pre_train_s))
    return RunPlan(
        base_model=model.id, max_new_tokens=max_new_tokens, eval_steps=est.eval_steps,
        max_train_s=round(max_train_s, 1), cap_s=round(cap_s, 1), stop_at_s=round(stop_at_s, 1),
        gpu_types=list(gpu_types), container_disk_gb=model.pod_disk_gb(gguf=gguf),
        cuda_versions=cuda_versions_for_image(settings.tuner_pod_image, settings.pod_cuda_versions),
        est_total_s=round(est.total_s, 1),
    )


def gpu_types_to_try(settings: Settings, model: SupportedModel) -> list[str]:
    """TUNER_GPU_TYPES when set, else the cheapest catalog class that fits the model."""
    return settings.gpu_types or gpu_types_for(model)
