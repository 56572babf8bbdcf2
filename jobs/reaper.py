"""Terminate any `tuner-` pod that has no live run (pods bill until terminated).

A pod is live when a Run in status pending/starting/running owns it: the Run's pod_id
is the pod's id, or (creation window) the Run has no pod_id yet, is named
`tuner-run-<run_id>`, and the Run's pod slot was taken less than `creation_window_s` ago
(its creator may still be saving the pod_id; after that its creator is dead and a resumed
run() makes a new pod, so the waiting pod, which never got a job, is reaped: this is the
"bot was down too long" policy). A pod whose Run has a pod_id and is active is never
reaped: the restarted bot re-attaches to it, however long it was away.

Everything else named `tuner-...` is an orphan: it is terminated, its run (if it owned
it and is not already terminal) is marked "reaped", and its seconds are billed once (same
`pod_billed:<id>` claim as jobs.training) up to the moment the reaper terminated it. A
pod that cannot be terminated is skipped (logged) and retried on the next pass; nothing
is billed for it until it really is terminated.

With a TemplateCleaner, each pass (the start-up one included) also retries the deletion
of serverless templates RunPod refused while they were "in use" (jobs.template_cleanup).
Pod status does not decide liveness here (the run does): a booting (CREATED, RESTARTING)
pod of a live run is left alone like a RUNNING one, and an orphan bills whatever its
status, so it is terminated. Pods RunPod already TERMINATED (it keeps listing them) are
left out by RunPodAPI.list_pods: never terminated or reported again (jobs/podstatus.py).
"""

from __future__ import annotations

import logging
import threading

from sqlmodel import select

from jobs.runpod_api import POD_NAME_PREFIX, RunPodAPI
from jobs.template_cleanup import TemplateCleaner
from jobs.training import (
    ACTIVE_STATUSES,
    CREATE_LEASE_S,
    TERMINAL_RUN_STATUSES,
    bill_pod_once,
    pod_seconds,
    run_id_from_pod_name,
)
from storage.db import Database
from storage.models import Run, utcnow

log = logging.getLogger(__name__)

# Longer than training's create lease: a creator that is still alive has saved its pod_id.
CREATION_WINDOW_S = CREATE_LEASE_S * 2


def _owner(db: Database, pod: dict) -> Run | None:
    with db.session() as s:
        run = s.exec(select(Run).where(Run.pod_id == str(pod["id"]))).first()
        if run is None:
            rid = run_id_from_pod_name(str(pod.get("name") or ""))
            run = s.get(Run, rid) if rid is not None else None
    return run


def _is_live(run: Run | None, pod_id: str, creation_window_s: float) -> bool:
    if run is None or run.status not in ACTIVE_STATUSES:
        return False
    if run.pod_id == pod_id:
        return True
    return run.pod_id is None and pod_seconds(run) < creation_window_s


def reap(db: Database, api: RunPodAPI, *, creation_window_s: float = CREATION_WINDOW_S) -> list[str]:
    """One pass. Returns the ids of the pods it terminated."""
    reaped: list[str] = []
    for pod in api.list_pods():
        name, pod_id = str(pod.get("name") or ""), str(pod["id"])
        if not name.startswith(POD_NAME_PREFIX):
            continue
        run = _owner(db, pod)
        if _is_live(run, pod_id, creation_window_s):
            continue
        try:
            api.terminate_pod(pod_id)
        except Exception as exc:  # noqa: BLE001 - keep going; next pass retries this one
            log.warning("could not terminate orphan pod %s (%s); retrying next pass",
                        pod_id, type(exc).__name__)
            continue
        end = utcnow()  # billing stops here, not when the run ended
        reaped.append(pod_id)
        log.warning("reaped orphan pod %s (%s)", pod_id, name)
        owned = run is not None and run.pod_id == pod_id
        if owned and run is not None:
            with db.session() as s:
                row = s.get(Run, run.id)
                if row is not None and row.status not in TERMINAL_RUN_STATUSES:
                    row.status, row.ended_at = "reaped", end
                    row.error = row.error or "pod had no live run; terminated by the reaper"
                    s.add(row)
                    s.commit()
                    run = row
            price = run.price_per_hour or float(pod.get("costPerHr") or 0)
            bill_pod_once(db, run, pod_id, pod_seconds(run, end), price)
        else:
            seconds = float(pod.get("uptimeSeconds") or 0)
            mine = run is not None and run_id_from_pod_name(name) == run.id
            bill_pod_once(db, run if mine else None, pod_id, seconds, float(pod.get("costPerHr") or 0))
    return reaped


class Reaper:
    """Runs reap() now and then every interval_s seconds on a daemon thread."""

    def __init__(self, db: Database, api: RunPodAPI, interval_s: float, *,
                 creation_window_s: float = CREATION_WINDOW_S,
                 templates: TemplateCleaner | None = None) -> None:
        self.db, self.api, self.interval_s = db, api, interval_s
        self.creation_window_s = creation_window_s
        self.templates = templates
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.passes = 0
        self.reaped: list[str] = []

    def run_once(self) -> list[str]:
        try:
            out = reap(self.db, self.api, creation_window_s=self.creation_window_s)
        except Exception as exc:  # noqa: BLE001 - keep the loop alive; retry next interval
            log.warning("reaper pass failed: %s", type(exc).__name__)
            out = []
        self._retry_templates()
        self.passes += 1
        self.reaped.extend(out)
        return out

    def _retry_templates(self) -> None:
        if self.templates is None:
            return
        try:
            self.templates.retry_pending()
        except Exception as exc:  # noqa: BLE001 - rows stay pending; retried next pass
            log.warning("template clean-up pass failed: %s", type(exc).__name__)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.run_once()
            self._stop.wait(self.interval_s)

    def start(self) -> Reaper:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="tuner-reaper", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
