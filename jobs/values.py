"""Plain data passed between jobs/ services and the agent (no Slack, no SDK types)."""

from __future__ import annotations

from dataclasses import dataclass, field

from jobs.errors import TunerError


class RunPodError(RuntimeError):
    """A RunPod API call failed. The message is safe for Slack and logs: it carries the
    server's short message at most, never the GraphQL text (which holds env secrets)."""


class RunPodTransientError(RunPodError):
    """Rate limit (429), 5xx / HTML error page, connection error or timeout, or a GraphQL
    internal error: the same request may work later. Never means "no capacity"."""

    def __init__(self, message: str, *, retry_after: float | None = None,
                 status: int | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after  # seconds, from a Retry-After header
        self.status = status


class NoCapacityError(RunPodError):
    """RunPod has no GPU of this type/cloud (or of any configured one) to give."""


class RunPodAuthError(RunPodError):
    """RunPod refused the API key (HTTP 401/403)."""


class RunPodRequestError(RunPodError):
    """RunPod refused the request for another reason (retrying it will not help)."""


class PlainError(TunerError):
    """A failure whose message is written for the user: shown as is, without its type."""


class UnsupportedModelError(PlainError):
    """The spec names a base model that is not in jobs/catalog.py."""


class RunTimeCapError(PlainError):
    """A run passed its wall-clock cap and its pod was terminated."""



class BudgetExceededError(RuntimeError):
    """Launching would exceed the project's budget cap."""


@dataclass(frozen=True)
class GpuChoice:
    gpu_type: str
    cloud_type: str
    price_per_hour: float


@dataclass(frozen=True)
class LaunchEstimate:
    gpu_type: str
    cloud_type: str
    price_per_hour: float
    est_minutes: float
    est_usd: float
    spent_usd: float
    budget_usd: float
    price_is_live: bool
    base_model: str = ""
    cap_minutes: float = 0.0  # the run's wall-clock cap (estimate x factor, hard-capped)

    @property
    def over_budget(self) -> bool:
        return self.spent_usd + self.est_usd > self.budget_usd


@dataclass
class RunSnapshot:
    run_id: int
    state: str
    step: int = 0
    max_steps: int = 0
    epoch: float = 0.0
    train_loss: list[tuple[int, float]] = field(default_factory=list)
    eval_loss: list[tuple[int, float]] = field(default_factory=list)
    best_step: int | None = None
    best_eval_loss: float | None = None
    eta_s: float | None = None
    cost_usd: float = 0.0
    warnings: list[str] = field(default_factory=list)
    # seconds the pod's proxy has not answered (None: it answers); shown as
    # "pod unreachable, retrying" until TUNER_POD_UNREACHABLE_GRACE_S runs out
    unreachable_s: float | None = None


@dataclass
class RunOutcome:
    run_id: int
    status: str  # succeeded | stopped | failed
    best_eval_loss: float | None = None
    best_step: int | None = None
    artifact_uri: str | None = None
    hf_repo: str | None = None
    generations: dict[str, str] = field(default_factory=dict)  # eval prompt id -> output
    cost_usd: float = 0.0
    error: str | None = None
    stop_reason: str | None = None  # stopped runs: "user" | "time_cap" | "early_stopping"
    # plain-words notes for the thread when training ends (export/push problems, caps)
    notes: list[str] = field(default_factory=list)
