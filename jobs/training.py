"""Training orchestration: estimate, launch, run a RunPod pod to completion, stop.

How the pod program gets onto the pod: the pod runs the prebuilt unsloth image
(settings.tuner_pod_image; torch, CUDA 12.8, unsloth, trl, peft, bitsandbytes, llama.cpp
baked in) with a docker start command (`POD_START_CMD`, RunPod's dockerArgs: it replaces
the image's CMD and runs under its ENTRYPOINT) that unpacks env TUNER_TRAIN_B64 (a base64
tar.gz of jobs/__init__.py + jobs/podproto.py + jobs/train.py, ~25 KB, well inside
GraphQL request limits), installs nothing when the image has the training stack, and
runs `python -m jobs.train` (control server on 0.0.0.0:8000, exposed as `8000/http`).
POD_ENV switches off the image entrypoint's own GPU check, so a pod whose CUDA is unusable
still starts the server and reports why (error_code cuda_unavailable) instead of exiting.

Crash safety (invariants: one Run per launch, one pod per Run at a time, no leaked
pod, nothing billed after termination, each pod billed once):
- launch(): the launch claim `launch:<project>:<n>` and the Run row commit in ONE
  transaction, so concurrent clicks make one Run and a crash cannot leave a claim
  without its Run (which would block the project's launches for good).
- The Run gets a fresh pod token + started_at (a compare-and-set on the previous
  token/pod_id: only one process wins the right to create the pod) before the pod is
  created, and its pod_id right after, so a crashed bot leaves a record. A loser waits
  for the winner's pod; a token with no pod_id is taken over only after CREATE_LEASE_S.
- The pod is named `tuner-run-<run_id>`; `run()` re-attaches to that pod after a
  restart, or adopts it by name when the crash fell between create and saving pod_id.
- A run that had submitted its job ("running") whose pod is gone/exited when re-attached
  fails at once with a clear error (no silent restart on a new paid pod); one that never
  got its job onto a pod ("starting") starts over on a new pod.
- Each run has a wall-clock cap (jobs/run_plan.py): past stop_at_s the bot sends POST
  /stop (best checkpoint kept), past cap_s it terminates the pod; the pod also caps its
  own training phase (TrainConfig.max_train_s).
- The pod is billed only once it is really terminated. If terminate keeps failing, the
  run ends anyway, the pod is left to the reaper (jobs/reaper.py, terminates any `tuner-`
  pod with no live run), which bills it up to its real termination time. Pod seconds are
  recorded exactly once per pod (unique claim `pod_billed:<id>`).
"""

from __future__ import annotations

import base64
import io
import logging
import re
import secrets
import tarfile
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import update
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select

from jobs.catalog import GpuSpec, gpu_spec
from jobs.estimate import RunEstimate, estimate_run
from jobs.export_report import export_notes, model_on_hub, report_of
from jobs.podclient import PodClient, PodError, PodGone, PodUnreachable
from jobs.podproto import (
    ADAPTER_ARTIFACT,
    TERMINAL_STATES,
    TOKEN_ENV,
    ChatRow,
    EvalPrompt,
    JobRequest,
    Progress,
    Results,
    TrainConfig,
)
from jobs.run_plan import (
    MAX_EVAL_PROMPTS,
    RunPlan,
    approved_spec,
    gpu_types_to_try,
    hub_configured,
    make_plan,
    max_new_tokens_for,
    model_for,
    workload_for,
)
from jobs.runpod_api import RunPodAPI, pod_is_alive
from jobs.values import (
    BudgetExceededError,
    LaunchEstimate,
    PlainError,
    RunOutcome,
    RunSnapshot,
    RunTimeCapError,
)
from storage import spend
from storage.db import Database
from storage.models import Example, MetricPoint, Project, Run, SlackEventClaim, utcnow
from storage.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")

ACTIVE_STATUSES = ("pending", "starting", "running")
TERMINAL_RUN_STATUSES = ("succeeded", "failed", "stopped", "reaped")

# Warnings shown with progress.
OVERFIT_CONSECUTIVE_RISES = 2  # eval loss rose this many evals in a row while train loss fell
LOW_EVAL_LOSS = 0.3  # best eval loss below this: far under the usual 0.6-0.7 band
# Pod creation lease: a pod token with no pod_id younger than this belongs to a process
# that is creating the pod right now; older, its creator died (adopt by name or take over).
CREATE_LEASE_S = 180.0
RELEASE_ATTEMPTS = 4  # terminate tries before leaving the pod to the reaper

# The time estimate is jobs/estimate.py (formula and sources there). A GPU type named in
# TUNER_GPU_TYPES that the catalog does not know is estimated with these (A5000-like) figures.
UNKNOWN_GPU = GpuSpec("unknown", 24, 111.1, 768, 0.24)

# The pod's start command (RunPod dockerArgs). The default image's ENTRYPOINT
# (unsloth docker/entrypoint.sh, installed as /usr/local/bin/unsloth-entrypoint) runs its
# checks and then `exec "$@"` with this command as "$@"; dockerArgs replaces only the CMD
# (runpod/docs pods/templates/manage-templates.mdx). No `$` in it: it stays literal however
# RunPod splits it. Steps: unpack the bundle; if the image lacks the training stack (a
# user's TUNER_POD_IMAGE), install pinned versions with the image's torch frozen by a
# constraints file (never pull another torch: an unpinned install swaps in a CUDA 13 build
# that old host drivers cannot run), and only when pip manages that torch; then serve.
POD_STACK = "pydantic torch transformers peft trl datasets accelerate"
# The versions this repository's tests run (pyproject "train" extra + the venv); bitsandbytes
# >= 0.49.2 as in unsloth's image (docker/Dockerfile). pydantic first, alone: the server needs
# only it, so a stack that cannot resolve against the frozen torch still lets the pod report.
POD_PINS_SERVER = "pydantic==2.14.4"
POD_PINS_STACK = ("transformers==5.25.0 peft==0.21.2 trl==1.16.0 accelerate==1.16.0 datasets==5.2.0 "
                  "bitsandbytes==0.49.2")
POD_CONSTRAINTS = "/tmp/tuner-constraints.txt"
POD_PIP = (
    "if python3 -c 'import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in sys.argv[1:]))' "
    f"{POD_STACK}; then echo 'tuner: training stack present, nothing to install'; else "
    f"python3 -m pip freeze 2>/dev/null | grep -i -E '^(torch|torchvision|torchaudio)==' > {POD_CONSTRAINTS}; "
    f"if grep -q -i '^torch==' {POD_CONSTRAINTS}; then "
    f"python3 -m pip install -q -c {POD_CONSTRAINTS} {POD_PINS_SERVER} {POD_PINS_STACK} "
    f"|| python3 -m pip install -q -c {POD_CONSTRAINTS} {POD_PINS_SERVER} "
    "|| echo 'tuner: install failed; the job will report what is missing' >&2; "
    "else echo 'tuner: no pip-managed torch in this image; installing nothing' >&2; fi; fi"
)
POD_START_CMD = (
    'bash -c "mkdir -p /opt/tuner && cd /opt/tuner && python3 -c '
    "\\\"import base64,io,os,tarfile; tarfile.open(fileobj=io.BytesIO(base64.b64decode("
    "os.environ['TUNER_TRAIN_B64']))).extractall()\\\" && { "
    + POD_PIP
    + '; } && exec python3 -m jobs.train"'
)
# Pod env the start needs (merged into the env of every training pod):
POD_ENV = {
    # unsloth's entrypoint exits 1 before our command when nvidia-smi sees no GPU or torch
    # cannot use it (docker/entrypoint.sh checks 1-2); skipped, train.py reports it instead.
    "UNSLOTH_SKIP_GPU_CHECK": "1",
    # no copying/refreshing of the notebooks into /workspace at boot (docker/DOCKERHUB.md:
    # "costs 10 to 20 seconds"; 206 MB of notebooks on the container disk).
    "UNSLOTH_SKIP_NOTEBOOK_SYNC": "1",
    # no second copy of the 16-bit base in the HF cache during the merge (unsloth/save.py).
    "UNSLOTH_PREWARM_HUB_CACHE": "0",
}
BUNDLE_FILES = ("jobs/__init__.py", "jobs/podproto.py", "jobs/train.py")
MAX_BUNDLE_B64 = 64_000


def pod_bundle_b64(root: Path | None = None) -> str:
    """base64 tar.gz of the pod program (deterministic: no mtimes)."""
    root = root or Path(__file__).resolve().parents[1]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for rel in BUNDLE_FILES:
            data = (root / rel).read_bytes()
            info = tarfile.TarInfo(rel)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    out = base64.b64encode(buf.getvalue()).decode()
    if len(out) > MAX_BUNDLE_B64:
        raise RuntimeError(f"pod bundle too large for a GraphQL value ({len(out)} chars)")
    return out


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


class _RunEnded(Exception):
    """Another process ended the run while this one waited to attach."""


def pod_name(run_id: int) -> str:
    return f"tuner-run-{run_id}"


def run_id_from_pod_name(name: str) -> int | None:
    m = re.fullmatch(r"tuner-run-(\d+)", name or "")
    return int(m.group(1)) if m else None


def _aware(dt: datetime | None) -> datetime | None:
    if dt is None:
        return None
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)


def pod_seconds(run: Run, end: datetime | None = None) -> float:
    start = _aware(run.started_at)
    if start is None:
        return 0.0
    return max(0.0, ((_aware(end) or utcnow()) - start).total_seconds())


def bill_pod_once(db: Database, run: Run | None, pod_id: str, seconds: float, price: float) -> bool:
    """Record a pod's seconds in the ledger; only the first call per pod records."""
    if not db.claim(f"pod_billed:{pod_id}"):
        return False
    spend.record(
        db, kind="pod_seconds", quantity=seconds, usd=seconds * price / 3600.0,
        project_id=run.project_id if run else None, run_id=run.id if run else None,
        detail=f"pod:{pod_id}",
    )
    return True


def training_warnings(train: list[tuple[int, float]], evals: list[tuple[int, float]]) -> list[str]:
    out: list[str] = []
    n = OVERFIT_CONSECUTIVE_RISES
    if len(evals) > n:
        tail = [loss for _, loss in evals[-(n + 1):]]
        rising = all(b > a for a, b in zip(tail, tail[1:]))
        t0 = _train_loss_at(train, evals[-(n + 1)][0])
        t1 = _train_loss_at(train, evals[-1][0])
        if rising and t0 is not None and t1 is not None and t1 < t0:
            out.append(
                f"Possible overfitting: eval loss rose for {n} evals in a row while train loss fell."
            )
    if evals and min(loss for _, loss in evals) < LOW_EVAL_LOSS:
        out.append(
            f"Eval loss far below the 0.6-0.7 band (<{LOW_EVAL_LOSS}): the data may be too "
            "easy or repetitive, or val overlaps train."
        )
    return out


def _train_loss_at(train: list[tuple[int, float]], step: int) -> float | None:
    before = [loss for s, loss in train if s <= step]
    return before[-1] if before else None


class TrainingService:
    def __init__(self, db: Database, settings: Settings, api: RunPodAPI, artifacts_dir: Path) -> None:
        self.db = db
        self.settings = settings
        self.api = api
        self.artifacts_dir = Path(artifacts_dir)
        self._detach = threading.Event()

    # ------------------------------------------------------------ estimate/launch
    def estimate(self, project_id: int, dataset_id: int) -> LaunchEstimate:
        return self.plan_launch(project_id, dataset_id)[0]

    def plan_launch(self, project_id: int, dataset_id: int) -> tuple[LaunchEstimate, RunPlan, RunEstimate]:
        """The launch card's estimate and the run's plan, from the approved spec + dataset."""
        with self.db.session() as s:
            project = s.get(Project, project_id)
        budget = project.budget_usd if project else self.settings.tuner_project_budget_usd
        spec = approved_spec(self.db, project_id)
        model = model_for(spec)
        cfg: dict[str, Any] = {"base_model": model.id, "max_new_tokens": max_new_tokens_for(spec),
                               "save_gguf": self._gguf_wanted(spec),
                               **self.settings.train_overrides}
        gpus = gpu_types_to_try(self.settings, model)
        gpu, cloud, price, live = self._pick_price(gpus)
        work = workload_for(self.db, dataset_id, spec, model, cfg, push=hub_configured(self.settings))
        est = estimate_run(model, gpu_spec(gpu) or UNKNOWN_GPU, work)
        plan = make_plan(est, self.settings, model=model, gpu_types=gpus,
                         max_new_tokens=int(cfg["max_new_tokens"]), gguf=bool(cfg["save_gguf"]))
        minutes = est.total_s / 60.0
        card = LaunchEstimate(
            gpu_type=gpu, cloud_type=cloud, price_per_hour=price, est_minutes=round(minutes, 1),
            est_usd=round(minutes / 60.0 * price, 4),
            spent_usd=spend.total(self.db, project_id=project_id), budget_usd=budget,
            price_is_live=live, base_model=model.id, cap_minutes=round(plan.cap_s / 60.0, 1),
        )
        return card, plan, est

    def _gguf_wanted(self, spec: dict[str, Any]) -> bool:
        return bool(spec.get("gguf")) or self.settings.tuner_gguf

    def _pick_price(self, gpu_types: list[str]) -> tuple[str, str, float, bool]:
        cloud = (self.settings.cloud_types or ["SECURE"])[0]
        fallback: tuple[str, str, float, bool] | None = None
        for gpu in gpu_types:
            price, live = self.api.gpu_price(gpu, cloud)
            if price is not None and live:
                return gpu, cloud, price, True
            if price is not None and fallback is None:
                fallback = (gpu, cloud, price, False)
        if fallback:
            return fallback
        return (gpu_types or ["unknown"])[0], cloud, 0.0, False

    def launch(
        self, project_id: int, dataset_id: int, *, user_id: str, config: dict[str, Any] | None = None
    ) -> int:
        """Create a pending Run. Returns the active run's id instead if one exists."""
        active = self.active_run(project_id)
        if active is not None:
            return int(active.id)  # type: ignore[arg-type]
        est, plan, _ = self.plan_launch(project_id, dataset_id)
        if est.over_budget:
            raise BudgetExceededError(
                f"launch needs ~${est.est_usd:.2f}; spent ${est.spent_usd:.2f} of the "
                f"${est.budget_usd:.2f} budget"
            )
        cfg = dict(config or {})
        cfg["launched_by"] = user_id
        cfg["plan"] = plan.to_config()
        with self.db.session() as s:
            n = len(s.exec(select(Run.id).where(Run.project_id == project_id)).all())
        # Checked AFTER counting: a run committed before the count is seen here; one
        # committed after it holds the same slot claim, so our insert below fails.
        active = self.active_run(project_id)
        if active is not None:
            return int(active.id)  # type: ignore[arg-type]
        run = Run(project_id=project_id, dataset_id=dataset_id, status="pending", config=cfg,
                  price_per_hour=est.price_per_hour, gpu_type=est.gpu_type)
        with self.db.session() as s:
            s.add(SlackEventClaim(key=f"launch:{project_id}:{n}"))
            s.add(run)
            try:
                s.commit()
            except IntegrityError:  # a concurrent click took this slot (claim + run)
                s.rollback()
            else:
                s.refresh(run)
                return int(run.id)  # type: ignore[arg-type]
        with self.db.session() as s:
            newest = s.exec(select(Run).where(Run.project_id == project_id)
                            .order_by(col(Run.id).desc())).first()
        if newest is None:  # cannot happen: the claim commits together with its run
            raise RuntimeError("another launch for this project is in progress")
        return int(newest.id)  # type: ignore[arg-type]

    def active_run(self, project_id: int) -> Run | None:
        with self.db.session() as s:
            return s.exec(
                select(Run).where(Run.project_id == project_id, col(Run.status).in_(ACTIVE_STATUSES))
                .order_by(col(Run.id).desc())
            ).first()

    def resumable_runs(self) -> list[int]:
        """Runs a restarted bot should call run() on again (re-attaches to their pods)."""
        with self.db.session() as s:
            return list(s.exec(select(Run.id).where(col(Run.status).in_(("starting", "running")))).all())

    def request_stop(self, run_id: int) -> bool:
        with self.db.session() as s:
            run = s.get(Run, run_id)
            if run is None or run.status not in ACTIVE_STATUSES:
                return False
            run.stop_requested = True
            s.add(run)
            s.commit()
        return True

    def detach(self) -> None:
        """Graceful shutdown: make run() return without terminating the pod (re-attach later)."""
        self._detach.set()

    # ----------------------------------------------------------------------- run
    def _load(self, run_id: int) -> Run:
        with self.db.session() as s:
            run = s.get(Run, run_id)
        if run is None:
            raise KeyError(f"run {run_id} not found")
        return run

    def _update(self, run_id: int, **fields: Any) -> Run:
        with self.db.session() as s:
            run = s.get(Run, run_id)
            assert run is not None
            for k, v in fields.items():
                setattr(run, k, v)
            s.add(run)
            s.commit()
            s.refresh(run)
            return run

    def _config_dict(self, run: Run | None) -> dict[str, Any]:
        cfg: dict[str, Any] = dict(self.settings.train_overrides)
        if run is not None:
            cfg.update({k: v for k, v in (run.config or {}).items() if k in TrainConfig.model_fields})
        return cfg

    def run_plan(self, run: Run) -> RunPlan:
        """The plan made at launch (recomputed for runs launched before plans existed)."""
        plan = RunPlan.from_config((run.config or {}).get("plan"))
        if plan is None:
            plan = self.plan_launch(run.project_id, int(run.dataset_id or 0))[1]
        return plan

    def build_job(self, run: Run) -> JobRequest:
        plan = self.run_plan(run)
        spec = approved_spec(self.db, run.project_id)
        cfg: dict[str, Any] = {
            "base_model": plan.base_model, "max_new_tokens": plan.max_new_tokens,
            "eval_steps": plan.eval_steps, "max_train_s": plan.max_train_s,
            "save_gguf": self._gguf_wanted(spec),
        }
        cfg.update(self._config_dict(run))  # TUNER_TRAIN_OVERRIDES, then the run's own
        cfg["job_id"] = f"run-{run.id}"
        ns = self.settings.tuner_hf_namespace
        if ns and self.settings.hf_token and not cfg.get("hf_repo"):
            cfg["hf_repo"] = f"{ns}/tuner-p{run.project_id}-r{run.id}"
        config = TrainConfig.model_validate(cfg)
        with self.db.session() as s:
            examples = s.exec(
                select(Example).where(Example.dataset_id == run.dataset_id).order_by(col(Example.id))
            ).all()
        system = str(spec.get("system_prompt") or "")

        def head(prompt: str) -> list[dict[str, str]]:
            msgs = [{"role": "system", "content": system}] if system else []
            return msgs + [{"role": "user", "content": prompt}]

        def row(e: Example) -> ChatRow:
            return ChatRow(messages=head(e.prompt) + [{"role": "assistant", "content": e.response}])

        train = [row(e) for e in examples if e.split == "train"]
        val = [row(e) for e in examples if e.split == "val"]
        held = [e for e in examples if e.split == "test"] or [e for e in examples if e.split == "val"]
        prompts = [EvalPrompt(id=str(e.id), messages=head(e.prompt)) for e in held[:MAX_EVAL_PROMPTS]]
        return JobRequest(config=config, train=train, val=val, eval_prompts=prompts)

    def run(self, run_id: int, on_progress: Callable[[RunSnapshot], None]) -> RunOutcome:
        """Drive a run to a terminal state. Safe to call again after a crash/restart, and
        from two processes at once (they share one pod)."""
        run = self._load(run_id)
        if run.status in TERMINAL_RUN_STATUSES:
            return self._outcome(run)
        if run.stop_requested and not run.pod_id:
            return self._outcome(self._end(run_id, status="stopped"))
        pod_id: str | None = None
        detached = False
        try:
            job = self.build_job(run)
            pod_id, run, submitted = self._attach_or_create(run)
            url = self.api.pod_url(pod_id)
            poll = self.settings.tuner_poll_interval_s
            # Re-attaching to a pod that already ran our job: its server was up, so a pod
            # that stays unreachable counts as crashed after the same grace as in _poll.
            grace = self.settings.tuner_pod_unreachable_grace_s
            timeout = grace if submitted else self.settings.tuner_pod_ready_timeout_s
            with PodClient(url, run.pod_token or "") as client:
                client.wait_ready(timeout, interval=min(2.0, poll),
                                  gone=lambda: self._pod_gone(pod_id or ""), gone_every_s=poll)
                self._while_unreachable(lambda: client.submit(job), pod_id, "sending the job")
                run = self._update(run_id, status="running")
                outcome = self._poll(run, client, on_progress)
                if outcome is None:
                    detached = True
                    return RunOutcome(run_id=run_id, status="detached")
                return outcome
        except _RunEnded:
            return self._outcome(self._load(run_id))
        except Exception as exc:  # noqa: BLE001 - any failure ends the run, pod is freed below
            log.warning("run %s failed: %s", run_id, type(exc).__name__)
            run = self._end(run_id, status="failed", error=self._crash_text(pod_id, exc))
            return self._outcome(run)
        finally:
            if pod_id and not detached:
                self._release(run_id, pod_id)

    def _pod_gone(self, pod_id: str) -> str | None:
        """Why RunPod says this pod can never answer again, or None (alive / API hiccup)."""
        try:  # one try: every caller asks again on its next round
            pod = self.api.get_pod(pod_id, attempts=1)
        except Exception:  # noqa: BLE001 - an API hiccup is not a dead pod
            return None
        if pod is None:
            return f"pod {pod_id} is gone from RunPod"
        if not pod_is_alive(pod):  # only a terminal status: a booting pod is alive
            return f"pod {pod_id} is {pod.get('desiredStatus')} on RunPod (its container exited)"
        return None

    def _while_unreachable(self, call: Callable[[], T], pod_id: str, what: str) -> T:
        """call(), tried again while the pod's proxy fails (Cloudflare 52x, 502-504, 404,
        resets), for up to TUNER_POD_UNREACHABLE_GRACE_S; only safe for idempotent calls."""
        grace = self.settings.tuner_pod_unreachable_grace_s
        start = time.monotonic()
        while True:
            try:
                return call()
            except PodGone:
                raise
            except PodUnreachable as exc:
                if (gone := self._pod_gone(pod_id)) is not None:
                    raise PodGone(f"{gone} while {what}") from None
                if time.monotonic() - start > grace:
                    raise PodUnreachable(
                        f"pod {pod_id} stopped answering for {_minutes(grace)} while {what} "
                        f"({exc})"
                    ) from None
            time.sleep(min(1.0, self.settings.tuner_poll_interval_s))

    def _attach_or_create(self, run: Run) -> tuple[str, Run, bool]:
        """(pod_id, run, job_submitted_before). Exactly one process creates a pod for a run."""
        rid = run.id
        assert rid is not None
        deadline = time.monotonic() + CREATE_LEASE_S + 60.0
        while True:
            if run.status in TERMINAL_RUN_STATUSES:
                raise _RunEnded()
            if run.pod_id and run.pod_token:
                gone = self._pod_gone(run.pod_id)
                if gone is None:
                    log.info("run %s: re-attaching to pod %s", rid, run.pod_id)
                    return run.pod_id, run, run.status == "running"
                # Its pod is gone or exited: terminate (an exited pod still bills) and bill it.
                self._release(rid, run.pod_id, end_run=False)
                if run.status == "running":  # it had our job: fail clearly, no silent re-spend
                    raise PodGone(f"{gone} while the bot was away; training was lost")
            elif run.pod_token:  # crashed between create and saving pod_id? adopt by name
                found = self.api.find_pod(pod_name(rid), {TOKEN_ENV: run.pod_token})
                if found is not None:
                    log.info("run %s: adopting pod %s by name", rid, found)
                    return found, self._update(rid, pod_id=found), False
            lease_over = pod_seconds(run) > CREATE_LEASE_S
            if run.pod_token is None or run.pod_id is not None or lease_over:
                token = secrets.token_urlsafe(32)
                if self._claim_pod_slot(run, token):
                    return self._create(rid, token)
            elif time.monotonic() > deadline:
                raise RuntimeError("timed out waiting for another process to create the pod")
            # Another process holds the slot: wait for its pod (or its verdict).
            time.sleep(min(1.0, self.settings.tuner_poll_interval_s))
            run = self._load(rid)

    def _claim_pod_slot(self, run: Run, token: str) -> bool:
        """Compare-and-set: swap in a new pod token only if nobody changed token/pod_id since
        we read the run. The winner alone creates the pod."""
        tok, pid = col(Run.pod_token), col(Run.pod_id)
        stmt = (
            update(Run)
            .where(col(Run.id) == run.id,
                   tok.is_(None) if run.pod_token is None else tok == run.pod_token,
                   pid.is_(None) if run.pod_id is None else pid == run.pod_id,
                   col(Run.status).in_(ACTIVE_STATUSES))
            .values(pod_token=token, pod_id=None, status="starting", started_at=utcnow(), error=None)
        )
        with self.db.session() as s:
            won = s.connection().execute(stmt).rowcount == 1
            s.commit()
        return won

    def _create(self, run_id: int, token: str) -> tuple[str, Run, bool]:
        env = {**POD_ENV, TOKEN_ENV: token, "TUNER_TRAIN_B64": pod_bundle_b64(), "PYTHONUNBUFFERED": "1",
               # the pod removes itself when the bot has been gone this long after training
               "TUNER_POD_IDLE_TIMEOUT_S": str(self.settings.tuner_pod_idle_timeout_s)}
        if self.settings.hf_token:
            env["HF_TOKEN"] = self.settings.hf_token.get_secret_value()
        plan = self.run_plan(self._load(run_id))
        pod_id, choice = self.api.create_pod_with_fallback(
            pod_name(run_id), self.settings.tuner_pod_image, env,
            plan.gpu_types, self.settings.cloud_types, docker_args=POD_START_CMD,
            container_disk_gb=plan.container_disk_gb, allowed_cuda_versions=plan.cuda_versions,
        )
        run = self._update(run_id, pod_id=pod_id, gpu_type=choice.gpu_type,
                           cloud_type=choice.cloud_type, price_per_hour=choice.price_per_hour)
        return pod_id, run, False

    def _poll(self, run: Run, client: PodClient,
              on_progress: Callable[[RunSnapshot], None]) -> RunOutcome | None:
        assert run.id is not None and run.pod_id is not None
        stop_sent = False
        down_since: float | None = None  # the proxy has failed every poll since then
        grace = self.settings.tuner_pod_unreachable_grace_s
        last: Progress | None = None
        while True:
            self._enforce_cap(run.id)
            if not stop_sent and self._load(run.id).stop_requested:
                try:
                    client.stop()
                    stop_sent = True
                except PodUnreachable:
                    pass
            try:
                p = client.progress()
                down_since = None
            except PodUnreachable as exc:
                now = time.monotonic()
                down_since = now if down_since is None else down_since
                gone = self._pod_gone(run.pod_id)
                if gone is not None:
                    raise PodGone(f"{gone} mid-training (pod disappeared or crashed)") from None
                if now - down_since > grace:
                    raise PodUnreachable(
                        f"pod {run.pod_id} stopped answering for {_minutes(now - down_since)} "
                        f"({exc}); the training process probably crashed or RunPod's proxy is down"
                    ) from None
                self._notify(run, on_progress, self._snapshot(run, last, unreachable_s=now - down_since))
                p = None
            if p is not None and p.job_id != f"run-{run.id}":
                raise PodError(
                    f"pod {run.pod_id} no longer has this run's job (state {p.state}): its "
                    "training process restarted and the training was lost"
                )
            if p is not None:
                last = p
                self._store_metrics(run.id, p)
                self._notify(run, on_progress, self._snapshot(run, p))
                if p.state in TERMINAL_STATES:
                    return self._finish(run, client, p)
            if self._detach.wait(self.settings.tuner_poll_interval_s):
                log.info("run %s detached at step %s", run.id, last.step if last else 0)
                return None

    @staticmethod
    def _notify(run: Run, on_progress: Callable[[RunSnapshot], None], snap: RunSnapshot) -> None:
        try:
            on_progress(snap)
        except Exception:  # noqa: BLE001 - a UI failure must not kill training
            log.exception("on_progress callback failed for run %s", run.id)

    def _snapshot(self, run: Run, p: Progress | None, *,
                  unreachable_s: float | None = None) -> RunSnapshot:
        """p: the pod's latest progress (None before its first answer)."""
        cost = pod_seconds(run) * (run.price_per_hour or 0.0) / 3600.0
        if p is None:
            return RunSnapshot(run_id=int(run.id), state="starting", cost_usd=cost,  # type: ignore[arg-type]
                               unreachable_s=unreachable_s)
        return RunSnapshot(
            run_id=int(run.id),  # type: ignore[arg-type]
            state=p.state, step=p.step, max_steps=p.max_steps, epoch=p.epoch,
            train_loss=list(p.train_loss), eval_loss=list(p.eval_loss),
            best_step=p.best_step, best_eval_loss=p.best_eval_loss, eta_s=p.eta_s,
            cost_usd=cost, warnings=training_warnings(list(p.train_loss), list(p.eval_loss)),
            unreachable_s=unreachable_s,
        )

    def _store_metrics(self, run_id: int, p: Progress) -> None:
        with self.db.session() as s:
            have = {(m.step, m.kind) for m in s.exec(select(MetricPoint).where(MetricPoint.run_id == run_id))}
            new = [
                MetricPoint(run_id=run_id, step=step, kind=kind, loss=float(loss), epoch=p.epoch)
                for kind, points in (("train", p.train_loss), ("eval", p.eval_loss))
                for step, loss in points
                if (step, kind) not in have
            ]
            if not new:
                return
            s.add_all(new)
            try:
                s.commit()
            except IntegrityError:  # another attached process stored them first
                s.rollback()

    def _enforce_cap(self, run_id: int) -> None:
        """Past the plan's stop_at_s ask the pod to stop (keeping its best checkpoint);
        past cap_s give up on it: RunTimeCapError ends the run and frees the pod."""
        run = self._load(run_id)
        plan = RunPlan.from_config((run.config or {}).get("plan"))
        if plan is None or run.started_at is None:
            return
        age = pod_seconds(run)
        if age >= plan.cap_s:
            raise RunTimeCapError(
                f"Run {run_id} reached its time cap ({_minutes(plan.cap_s)}) before its pod "
                "finished, so tuner terminated the pod (nothing is billed after that). The "
                "pod did not finish in time after being asked to stop, so no checkpoint could "
                "be fetched. Launch again; TUNER_MAX_RUN_HOURS and TUNER_RUN_CAP_FACTOR set the cap."
            )
        if age >= plan.stop_at_s and not run.stop_requested:
            log.info("run %s: time cap reached after %.0fs, stopping", run_id, age)
            self._update(run_id, stop_requested=True,
                         config={**(run.config or {}), "stop_reason": "time_cap"})

    def _finish(self, run: Run, client: PodClient, p: Progress) -> RunOutcome:
        assert run.id is not None
        if p.state == "failed":
            run = self._end(run.id, status="failed", error=pod_failure_text(p),
                            best_eval_loss=p.best_eval_loss, best_step=p.best_step)
            return self._outcome(run)
        pod_id = str(run.pod_id)
        results = self._while_unreachable(client.results, pod_id, "fetching the results")
        out_dir = self.artifacts_dir / f"run_{run.id}"
        out_dir.mkdir(parents=True, exist_ok=True)
        adapter_dir = None
        if ADAPTER_ARTIFACT in results.artifacts:
            data = self._while_unreachable(lambda: client.artifact(ADAPTER_ARTIFACT), pod_id,
                                           "fetching the adapter")
            (out_dir / ADAPTER_ARTIFACT).write_bytes(data)
            adapter_dir = str(out_dir)
        # Deployment pulls the merged model from the Hub, so a repo holding one wins; a
        # repo with only the adapter (or nothing) is never recorded as the model.
        repo = model_on_hub(results)
        artifact_uri = f"hf://{repo}" if repo else adapter_dir
        gens = {g.id: g.output for g in results.generations}
        status = results.state if results.state in ("succeeded", "stopped") else p.state
        rid = run.id
        assert rid is not None
        current = self._load(rid)
        stop_reason = ((current.config or {}).get("stop_reason") or results.stop_reason
                       or p.stop_reason) if status == "stopped" else None
        report = report_of(results)
        notes = self._notes(current, results, stop_reason)
        run = self._end(
            rid, status=status,
            best_eval_loss=results.best_eval_loss, best_step=results.best_step,
            artifact_uri=artifact_uri,
            # generations are kept on the run: the judge and later nightly comparisons
            # against this run (as champion) read them from here.
            config={**(current.config or {}), "hf_repo": repo, "adapter_dir": adapter_dir,
                    "hf_error": report.push_error, "export": report.model_dump(),
                    "stop_reason": stop_reason, "notes": notes, "generations": gens},
        )
        return self._outcome(run)

    def _notes(self, run: Run, results: Results, stop_reason: str | None) -> list[str]:
        """What the thread is told when training ends: time cap, exports."""
        out: list[str] = []
        if stop_reason == "time_cap":
            plan = RunPlan.from_config((run.config or {}).get("plan"))
            cap = f" ({_minutes(plan.cap_s)})" if plan else ""
            best = (f" (step {results.best_step}, eval loss {results.best_eval_loss:.4f})"
                    if results.best_step is not None and results.best_eval_loss is not None else "")
            out.append(
                f"Run {run.id} was stopped at its time cap{cap}; the best checkpoint{best} was "
                f"kept. The cap is the estimate x {self.settings.tuner_run_cap_factor:g}, at most "
                f"TUNER_MAX_RUN_HOURS={self.settings.tuner_max_run_hours:g} h."
            )
        spec = approved_spec(self.db, run.project_id)
        out += export_notes(results, hub_configured=hub_configured(self.settings),
                            namespace=self.settings.tuner_hf_namespace,
                            gguf_asked=self._gguf_wanted(spec))
        return out

    def _crash_text(self, pod_id: str | None, exc: Exception) -> str:
        if isinstance(exc, PlainError):
            return str(exc)
        if isinstance(exc, PodError):
            return f"Training pod failed: {exc}"
        return f"Training could not run: {type(exc).__name__}: {str(exc)[:300]}"

    def _end(self, run_id: int, **fields: Any) -> Run:
        """Move a run to a terminal status unless another process already did (first wins)."""
        with self.db.session() as s:
            run = s.get(Run, run_id)
            assert run is not None
            if run.status in TERMINAL_RUN_STATUSES:
                return run
            for k, v in {"ended_at": utcnow(), **fields}.items():
                setattr(run, k, v)
            s.add(run)
            s.commit()
            s.refresh(run)
            return run

    def _release(self, run_id: int, pod_id: str, *, end_run: bool = True) -> bool:
        """Terminate the pod (retrying with backoff), then bill it once up to that moment.
        If it cannot be terminated, nothing is billed here: the pod belongs to no live run,
        so the reaper terminates it later and bills up to then. Never raises."""
        delay = min(1.0, max(0.01, self.settings.tuner_poll_interval_s))
        for attempt in range(RELEASE_ATTEMPTS):
            try:
                self.api.terminate_pod(pod_id)
                break
            except Exception as exc:  # noqa: BLE001
                log.warning("terminate %s failed (%s); attempt %d", pod_id, type(exc).__name__, attempt + 1)
                if attempt + 1 < RELEASE_ATTEMPTS:
                    time.sleep(delay * 2**attempt)
        else:
            log.error("pod %s could not be terminated; left to the reaper", pod_id)
            return False
        end = utcnow()  # billing runs until the pod is terminated
        try:
            run = self._update(run_id, ended_at=end) if end_run else self._load(run_id)
            bill_pod_once(self.db, run, pod_id, pod_seconds(run, end), run.price_per_hour or 0.0)
        except Exception:  # noqa: BLE001
            log.exception("billing pod %s failed", pod_id)
        return True

    def _outcome(self, run: Run) -> RunOutcome:
        return RunOutcome(
            run_id=int(run.id),  # type: ignore[arg-type]
            status=run.status, best_eval_loss=run.best_eval_loss, best_step=run.best_step,
            artifact_uri=run.artifact_uri, hf_repo=(run.config or {}).get("hf_repo"),
            generations=dict((run.config or {}).get("generations") or {}),
            cost_usd=pod_seconds(run, run.ended_at) * (run.price_per_hour or 0.0) / 3600.0,
            error=run.error, stop_reason=(run.config or {}).get("stop_reason"),
            notes=list((run.config or {}).get("notes") or []),
        )


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


CUDA_HELP = (
    "This usually means the host's NVIDIA driver is too old for the CUDA build in the "
    "training image, or no GPU was visible inside the container. tuner terminates the pod "
    "right away, so nothing more is billed. Launch again to get another machine; if it keeps "
    "happening, set TUNER_POD_CUDA_VERSIONS to the host CUDA versions your image supports "
    "or choose other TUNER_GPU_TYPES."
)


def pod_failure_text(p: Progress) -> str:
    """A failed pod job in plain words, by its error code."""
    detail = p.error or "no details"
    if p.error_code == "cuda_unavailable":
        return f"the training pod could not use its GPU. {detail.rstrip('.')}. {CUDA_HELP}"
    if p.error_code == "out_of_memory":
        return (f"the GPU ran out of memory ({detail}). Choose a smaller base model or "
                "GPU types with more memory (TUNER_GPU_TYPES), then launch again.")
    if p.error_code == "model_load":
        return (f"the base model could not be downloaded or loaded on the pod ({detail}). "
                "If the model is gated, HF_TOKEN must have access to it; then launch again.")
    return f"training failed on the pod: {detail}"
