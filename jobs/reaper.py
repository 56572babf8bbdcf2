"""Terminate any `tuner-` pod that has no live run (pods bill until terminated).

A pod is live when a Run in status pending/starting/running owns it: the Run's pod_id
is the pod's id, or (creation window) the Run has no pod_id yet and the pod is named
`tuner-run-<run_id>`. Everything else named `tuner-...` is an orphan: it is terminated,
its run (if any, and not already terminal) is marked "reaped", and its seconds are
billed once (same `pod_billed:<id>` claim as jobs.training).
"""

from __future__ import annotations

import logging
import threading

from sqlmodel import select

from jobs.runpod_api import POD_NAME_PREFIX, RunPodAPI
from jobs.training import (
    ACTIVE_STATUSES,
    TERMINAL_RUN_STATUSES,
    bill_pod_once,
    pod_seconds,
    run_id_from_pod_name,
)
from storage.db import Database
from storage.models import Run, utcnow

log = logging.getLogger(__name__)


def _owner(db: Database, pod: dict) -> Run | None:
    with db.session() as s:
        run = s.exec(select(Run).where(Run.pod_id == str(pod["id"]))).first()
        if run is None:
            rid = run_id_from_pod_name(str(pod.get("name") or ""))
            run = s.get(Run, rid) if rid is not None else None
    return run


def _is_live(run: Run | None, pod_id: str) -> bool:
    if run is None or run.status not in ACTIVE_STATUSES:
        return False
    return run.pod_id in (None, pod_id)


def reap(db: Database, api: RunPodAPI) -> list[str]:
    """One pass. Returns the ids of the pods it terminated."""
    reaped: list[str] = []
    for pod in api.list_pods():
        name, pod_id = str(pod.get("name") or ""), str(pod["id"])
        if not name.startswith(POD_NAME_PREFIX):
            continue
        run = _owner(db, pod)
        if _is_live(run, pod_id):
            continue
        api.terminate_pod(pod_id)
        reaped.append(pod_id)
        log.warning("reaped orphan pod %s (%s)", pod_id, name)
        owned = run is not None and run.pod_id == pod_id
        if owned and run is not None:
            end = utcnow()
            with db.session() as s:
                row = s.get(Run, run.id)
                if row is not None and row.status not in TERMINAL_RUN_STATUSES:
                    row.status, row.ended_at = "reaped", end
                    row.error = row.error or "pod had no live run; terminated by the reaper"
                    s.add(row)
                    s.commit()
                    run = row
            seconds = pod_seconds(run, run.ended_at or end)
            bill_pod_once(db, run, pod_id, seconds, run.price_per_hour or float(pod.get("costPerHr") or 0))
        else:
            seconds = float(pod.get("uptimeSeconds") or 0)
            bill_pod_once(db, None, pod_id, seconds, float(pod.get("costPerHr") or 0))
    return reaped


class Reaper:
    """Runs reap() now and then every interval_s seconds on a daemon thread."""

    def __init__(self, db: Database, api: RunPodAPI, interval_s: float) -> None:
        self.db, self.api, self.interval_s = db, api, interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.passes = 0
        self.reaped: list[str] = []

    def run_once(self) -> list[str]:
        try:
            out = reap(self.db, self.api)
        except Exception as exc:  # noqa: BLE001 - keep the loop alive; retry next interval
            log.warning("reaper pass failed: %s", type(exc).__name__)
            out = []
        self.passes += 1
        self.reaped.extend(out)
        return out

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
