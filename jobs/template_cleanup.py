"""Delete serverless templates that RunPod still refuses because they are "in use".

RunPod refuses to delete a template for up to ~2 minutes after its endpoint is deleted
(runpod/docs sdks/graphql/manage-pod-templates.mdx, "Delete a template"). Undeploy and a
failed deploy therefore hand the template here instead of failing: `schedule` stores a
TemplateCleanup row first (nothing is forgotten on a restart), then retries on a daemon
thread, off the caller's thread, with exponential backoff (`first_delay_s` doubling up to
`max_delay_s`) for `window_s` seconds. A template still refused after that is retried by
the reaper (`retry_pending`, every pass, the start-up pass included) until it is deleted;
after `max_attempts` refusals in all it is logged for deletion in the RunPod console.
Templates do not bill, so none of this is a cost risk and none of it is a failed undeploy.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Protocol

from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select

from jobs.serverless import ServerlessError, TemplateInUse
from storage.db import Database
from storage.models import TemplateCleanup, utcnow

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 200  # ~16 hours of reaper passes at the default 5-minute interval


class TemplateDeleter(Protocol):
    """jobs.serverless.ServerlessClient as the cleaner uses it."""

    def delete_template(self, template_name: str) -> None: ...


class TemplateCleaner:
    """Durable, retried template deletion (see the module docstring)."""

    def __init__(
        self,
        db: Database,
        client: TemplateDeleter,
        *,
        window_s: float = 300.0,
        first_delay_s: float = 2.0,
        max_delay_s: float = 30.0,
        max_attempts: int = MAX_ATTEMPTS,
    ) -> None:
        self.db, self.client = db, client
        self.window_s, self.first_delay_s, self.max_delay_s = window_s, first_delay_s, max_delay_s
        self.max_attempts = max_attempts
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one delete call at a time: the reaper and retries share it
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------ public
    def schedule(self, template_name: str, *, template_id: str | None = None,
                 deployment_id: int | None = None) -> None:
        """Record the template as to-delete and start its background retries. Returns at once."""
        self._record(template_name, template_id, deployment_id)
        thread = threading.Thread(target=self._retry_loop, args=(template_name,),
                                  name=f"template-cleanup-{template_name}", daemon=True)
        self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()

    def pending(self) -> list[TemplateCleanup]:
        """Templates still to delete (not done, not given up), oldest first."""
        with self.db.session() as s:
            return list(s.exec(select(TemplateCleanup).where(
                col(TemplateCleanup.done_at).is_(None), col(TemplateCleanup.gave_up_at).is_(None))
                .order_by(col(TemplateCleanup.id))).all())

    def retry_pending(self) -> list[str]:
        """One delete attempt per pending template (the reaper's step); the names deleted."""
        return [row.template_name for row in self.pending() if self.attempt(row.template_name)]

    def attempt(self, template_name: str) -> bool:
        """Try to delete once; True when the template is gone (now or before)."""
        with self._lock:
            row = self._row(template_name)
            if row is None or row.gave_up_at is not None:
                return False
            if row.done_at is not None:
                return True
            try:
                self.client.delete_template(template_name)
            except TemplateInUse as exc:
                self._refused(row, str(exc))
                return False
            except ServerlessError as exc:
                log.warning("deleting template %s failed: %s; will retry", template_name, exc)
                self._refused(row, str(exc))
                return False
            self._update(row, done_at=utcnow(), attempts=row.attempts + 1)
            log.info("deleted serverless template %s", template_name)
            return True

    def close(self, timeout: float = 2.0) -> None:
        """Stop the background retries (pending rows stay for the reaper)."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout)

    # --------------------------------------------------------------- internals
    def _retry_loop(self, template_name: str) -> None:
        deadline = time.monotonic() + self.window_s
        delay = self.first_delay_s
        while not self._stop.is_set():
            try:
                if self.attempt(template_name) or not self._is_pending(template_name):
                    return
            except Exception:  # the row stays pending for the reaper
                log.exception("template %s: retry failed unexpectedly", template_name)
            if time.monotonic() + delay > deadline:
                log.info("template %s still in use after %.0fs; the reaper retries it",
                         template_name, self.window_s)
                return
            if self._stop.wait(delay):
                return
            delay = min(delay * 2, self.max_delay_s)

    def _record(self, name: str, template_id: str | None, deployment_id: int | None) -> None:
        with self.db.session() as s:
            s.add(TemplateCleanup(template_name=name, template_id=template_id,
                                  deployment_id=deployment_id))
            try:
                s.commit()
            except IntegrityError:  # already recorded (a retried undeploy)
                s.rollback()

    def _row(self, name: str) -> TemplateCleanup | None:
        with self.db.session() as s:
            return s.exec(select(TemplateCleanup).where(TemplateCleanup.template_name == name)).first()

    def _is_pending(self, name: str) -> bool:
        row = self._row(name)
        return row is not None and row.done_at is None and row.gave_up_at is None

    def _refused(self, row: TemplateCleanup, error: str) -> None:
        attempts = row.attempts + 1
        gave_up = utcnow() if attempts >= self.max_attempts else None
        self._update(row, attempts=attempts, last_error=error[:500], gave_up_at=gave_up)
        if gave_up is not None:
            log.error("template %s still cannot be deleted after %d attempts (%s); "
                      "delete it in the RunPod console", row.template_name, attempts, error[:200])

    def _update(self, row: TemplateCleanup, **changes: object) -> None:
        with self.db.session() as s:
            fresh = s.get(TemplateCleanup, row.id)
            if fresh is None:
                return
            for k, v in changes.items():
                setattr(fresh, k, v)
            s.add(fresh)
            s.commit()
