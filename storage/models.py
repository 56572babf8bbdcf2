"""SQLModel tables. One Slack thread = one project.

Statuses are StrEnums (stored as their string values) with the active/terminal sets next
to them, so "is this run still going?" has one answer everywhere.
"""

from __future__ import annotations

from datetime import datetime, timezone
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, Column, UniqueConstraint
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class ProjectStatus(StrEnum):
    DEFINING = "defining"  # the task is being defined / the spec waits for approval
    SAMPLING = "sampling"  # sample examples are being written or reviewed
    GENERATING = "generating"  # the dataset is being generated
    READY = "ready"  # a dataset exists; nothing is training or deployed
    TRAINING = "training"  # a run is active
    JUDGING = "judging"  # the judge is comparing the trained model
    DEPLOYED = "deployed"  # an endpoint is live
    FAILED = "failed"  # the last step failed; the thread offers what to do next


class RunStatus(StrEnum):
    PENDING = "pending"  # launched, no pod slot claimed yet
    STARTING = "starting"  # a pod is being created / booting; no job on it yet
    RUNNING = "running"  # the job was submitted to the pod
    SUCCEEDED = "succeeded"  # trained to the end; results fetched
    STOPPED = "stopped"  # stopped early (user, time cap, early stopping); best checkpoint kept
    FAILED = "failed"  # could not train (pod, CUDA, data...); the error says why
    REAPED = "reaped"  # its pod was terminated by the reaper (no live bot owned it)


ACTIVE_RUN_STATUSES: frozenset[RunStatus] = frozenset(
    {RunStatus.PENDING, RunStatus.STARTING, RunStatus.RUNNING})
TERMINAL_RUN_STATUSES: frozenset[RunStatus] = frozenset(
    {RunStatus.SUCCEEDED, RunStatus.STOPPED, RunStatus.FAILED, RunStatus.REAPED})
# runs that produced a model the judge and deploy can use
MODEL_RUN_STATUSES: frozenset[RunStatus] = frozenset({RunStatus.SUCCEEDED, RunStatus.STOPPED})


class DeploymentStatus(StrEnum):
    CREATING = "creating"  # template/endpoint being created, smoke requests running
    HEALTHY = "healthy"  # live: answered its smoke requests
    FAILED = "failed"  # could not be brought up; torn down
    REMOVED = "removed"  # undeployed


ACTIVE_DEPLOYMENT_STATUSES: frozenset[DeploymentStatus] = frozenset(
    {DeploymentStatus.CREATING, DeploymentStatus.HEALTHY})


class NightlyStatus(StrEnum):
    RUNNING = "running"  # claimed for (project, date); work in progress
    SKIPPED = "skipped"  # nothing to do (no or too little new data, a run already active)
    PROMOTED = "promoted"  # retrained and the new model became the champion
    KEPT = "kept"  # retrained; the champion stays
    FAILED = "failed"  # the nightly could not finish; the report says why


TERMINAL_NIGHTLY_STATUSES: frozenset[NightlyStatus] = frozenset(
    {NightlyStatus.SKIPPED, NightlyStatus.PROMOTED, NightlyStatus.KEPT, NightlyStatus.FAILED})


class Project(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    thread_id: str = Field(index=True, unique=True)  # team:channel:thread_ts
    team_id: str
    channel_id: str
    thread_ts: str
    created_by: str
    name: str = ""
    status: str = ProjectStatus.DEFINING
    budget_usd: float = 50.0
    nightly_enabled: bool = False
    champion_run_id: int | None = None
    created_at: datetime = Field(default_factory=utcnow)


class TaskSpecRow(SQLModel, table=True):
    __tablename__ = "task_spec"
    id: int | None = Field(default=None, primary_key=True)
    project_id: int = Field(foreign_key="project.id", index=True)
    version: int = 1
    spec: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    approved: bool = False
    created_at: datetime = Field(default_factory=utcnow)


class Dataset(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    project_id: int = Field(foreign_key="project.id", index=True)
    source: str = "synthetic"  # synthetic|import|nightly
    n_train: int = 0
    n_val: int = 0
    n_test: int = 0
    n_dropped_duplicates: int = 0
    n_dropped_invalid: int = 0
    seed: int = 0
    created_at: datetime = Field(default_factory=utcnow)


class Example(SQLModel, table=True):
    __table_args__ = (UniqueConstraint("project_id", "content_hash"),)
    id: int | None = Field(default=None, primary_key=True)
    project_id: int = Field(foreign_key="project.id", index=True)
    dataset_id: int | None = Field(default=None, foreign_key="dataset.id", index=True)
    prompt: str
    response: str
    reference: str | None = None  # big-model / old-pipeline output for judging
    split: str = "train"  # train|val|test
    source: str = "synthetic"  # synthetic|import|correction
    content_hash: str
    created_at: datetime = Field(default_factory=utcnow)


class SlackEventClaim(SQLModel, table=True):
    """Unique claims: an event id or a (channel, ts) message key is processed once."""

    __tablename__ = "slack_event_claim"
    key: str = Field(primary_key=True)
    created_at: datetime = Field(default_factory=utcnow)


class Run(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    project_id: int = Field(foreign_key="project.id", index=True)
    dataset_id: int | None = Field(default=None, foreign_key="dataset.id")
    kind: str = "train"  # train|nightly
    status: str = RunStatus.PENDING
    pod_id: str | None = Field(default=None, index=True)
    pod_token: str | None = None  # bearer token of the pod control server (never logged)
    gpu_type: str | None = None
    cloud_type: str | None = None
    price_per_hour: float | None = None
    config: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    stop_requested: bool = False
    best_eval_loss: float | None = None
    best_step: int | None = None
    artifact_uri: str | None = None  # local dir or hf://repo
    error: str | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    created_at: datetime = Field(default_factory=utcnow)


class MetricPoint(SQLModel, table=True):
    __tablename__ = "metric_point"
    __table_args__ = (UniqueConstraint("run_id", "step", "kind"),)
    id: int | None = Field(default=None, primary_key=True)
    run_id: int = Field(foreign_key="run.id", index=True)
    step: int
    epoch: float = 0.0
    kind: str = "train"  # train|eval
    loss: float


class EvalResult(SQLModel, table=True):
    __tablename__ = "eval_result"
    id: int | None = Field(default=None, primary_key=True)
    run_id: int = Field(foreign_key="run.id", index=True)
    against: str = "reference"  # reference|champion
    n: int = 0
    wins: int = 0
    ties: int = 0
    losses: int = 0
    win_rate: float = 0.0
    ci_low: float = 0.0
    ci_high: float = 0.0
    promoted: bool = False
    details: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON))
    created_at: datetime = Field(default_factory=utcnow)


class Deployment(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    project_id: int = Field(foreign_key="project.id", index=True)
    run_id: int | None = Field(default=None, foreign_key="run.id")
    endpoint_id: str | None = Field(default=None, index=True)
    template_id: str | None = None
    model_ref: str = ""
    status: str = DeploymentStatus.CREATING
    cost_per_1k_usd: float | None = None
    big_model_cost_per_1k_usd: float | None = None
    created_at: datetime = Field(default_factory=utcnow)
    removed_at: datetime | None = None


class TemplateCleanup(SQLModel, table=True):
    """A serverless template still to delete once RunPod stops counting it as in use
    (refused for up to ~2 minutes after its endpoint is deleted). Templates do not bill;
    the row survives restarts so the reaper finishes the job."""

    __tablename__ = "template_cleanup"
    id: int | None = Field(default=None, primary_key=True)
    template_name: str = Field(index=True, unique=True)
    template_id: str | None = None
    deployment_id: int | None = Field(default=None, foreign_key="deployment.id")
    attempts: int = 0
    last_error: str = ""
    created_at: datetime = Field(default_factory=utcnow)
    done_at: datetime | None = None  # deleted (or found already gone)
    gave_up_at: datetime | None = None  # too many refusals: left to the RunPod console


class SpendEntry(SQLModel, table=True):
    __tablename__ = "spend_entry"
    id: int | None = Field(default=None, primary_key=True)
    project_id: int | None = Field(default=None, foreign_key="project.id", index=True)
    run_id: int | None = Field(default=None, foreign_key="run.id")
    kind: str  # claude_tokens|pod_seconds|endpoint
    quantity: float = 0.0  # tokens or seconds
    usd: float = 0.0
    detail: str = ""
    created_at: datetime = Field(default_factory=utcnow)


class NightlyRun(SQLModel, table=True):
    __tablename__ = "nightly_run"
    __table_args__ = (UniqueConstraint("project_id", "run_date"),)
    id: int | None = Field(default=None, primary_key=True)
    project_id: int = Field(foreign_key="project.id", index=True)
    run_date: str  # YYYY-MM-DD
    status: str = NightlyStatus.RUNNING
    run_id: int | None = Field(default=None, foreign_key="run.id")  # its training run
    new_examples: int = 0
    report: str = ""
    created_at: datetime = Field(default_factory=utcnow)


class MessageRef(SQLModel, table=True):
    """The Slack ts of a message edited in place, so edits survive a restart."""

    __tablename__ = "message_ref"
    __table_args__ = (UniqueConstraint("thread_id", "key"),)
    id: int | None = Field(default=None, primary_key=True)
    thread_id: str = Field(index=True)
    key: str
    channel_id: str
    ts: str
