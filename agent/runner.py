"""AgentRunner: the blocking entry points the Slack bot's workers call.

One graph thread per Slack thread ("team:channel:thread_ts"). Every call that
advances a thread holds that thread's lock, so two clicks on the same button
resume the graph once; the second sees a stale interrupt id and gets False.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from collections.abc import Iterator
from typing import Any

from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.types import Command, Interrupt
from sqlalchemy.exc import IntegrityError
from sqlmodel import select

from agent.context import AgentContext
from agent.graph import build_graph, make_checkpointer
from agent.nodes_common import RunDetached, human_error, sentence
from agent.nodes_data import DEFAULT_MAX_TOKENS
from storage.models import Project

log = logging.getLogger(__name__)

IMPORT_LOCK_WAIT_S = 2.0  # a training thread holds its lock for hours: don't wait for it
TEXT_ACTIONS = {"question": "answer", "spec": "change", "samples": "regenerate", "retry": "retry"}
_MENTION = re.compile(r"<@[A-Z0-9]+>\s*")
# state of a previous round, cleared when a finished thread starts over
_RESET = ("spec", "spec_row_id", "dataset_id", "launch_card", "launch_user", "run_id",
          "best_eval_loss", "eval_id", "eval_summary", "deployment_id", "deploy_info",
          "pending_import", "return_to", "failed_node", "error")


class RunnerClosed(RuntimeError):
    """The runner is shutting down; no new graph steps start."""


def make_thread_id(team: str, channel: str, thread_ts: str) -> str:
    return f"{team}:{channel}:{thread_ts}"


class AgentRunner:
    def __init__(
        self,
        ctx: AgentContext,
        checkpointer: BaseCheckpointSaver | None = None,
        *,
        lock_timeout_s: float = 60.0,
    ) -> None:
        self.ctx = ctx
        self._conn: Any = None
        if checkpointer is None:
            checkpointer, self._conn = make_checkpointer(ctx.db.url)
        self.graph = build_graph(checkpointer)
        self.lock_timeout_s = lock_timeout_s
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._background: list[threading.Thread] = []
        self._active = 0  # graph steps in flight; close() waits for them
        self._active_cv = threading.Condition()
        self._closed = False

    # ---- public API -------------------------------------------------------------

    def start(self, *, team: str, channel: str, thread_ts: str, user: str, text: str) -> None:
        """A mention: start a project for this thread, or treat it as a reply if one exists."""
        tid = make_thread_id(team, channel, thread_ts)
        text = _MENTION.sub("", text).strip()
        with self._locked(tid) as ok:
            if not ok:
                return
            project_id = self._project_id(tid)
            state = self._state(tid) if project_id is not None else None
            # a finished thread (skipped or undeployed: "mention me again to start over")
            # starts a fresh definition; a running one treats the mention as a reply
            if state is not None and state.values and state.next:
                if not self._reply_locked(tid, user, text):
                    self.ctx.notifier.say(
                        tid, "I'm busy with this project; I'll post here when there's a next step."
                    )
                return
            if project_id is None:
                project_id = self._create_project(tid, team, channel, thread_ts, user)
            first: dict[str, Any] = {k: None for k in _RESET}
            first.update({
                "thread_id": tid,
                "project_id": project_id,
                "messages": [{"role": "user", "content": text or "(no description yet)"}],
                "guidelines": [],
                "samples": [],
                "edited": [],
                "gold_examples": [],
                "generations": {},
                "sample_round": 0,
            })
            self._invoke(tid, first)

    def reply(self, thread_id: str, user: str, text: str) -> bool:
        """A plain thread message: answers a question / requests a change / gives feedback.

        `correction: <input> => <output>` in a project thread is stored at once (no thread
        lock: a training run may hold it for hours) as a training example for the next retrain.
        """
        if self._add_correction(thread_id, _MENTION.sub("", text).strip()):
            return True
        with self._locked(thread_id) as ok:
            return ok and self._reply_locked(thread_id, user, _MENTION.sub("", text).strip())

    def resume(self, thread_id: str, interrupt_id: str, value: dict[str, Any]) -> bool:
        """A button or modal answer. False when the interrupt is no longer pending."""
        with self._locked(thread_id) as ok:
            if not ok or interrupt_id not in {i.id for i in self._interrupts(thread_id)}:
                return False
            self._invoke(thread_id, Command(resume={interrupt_id: value}))
            return True

    def import_file(
        self, thread_id: str, user: str, filename: str, content: bytes, *, comment: str = "",
        upload_id: str = "",
    ) -> bool:
        """A file shared in the thread: imported at whatever point the thread waits.

        The file is decoded, parsed, validated and deduplicated first, holding no lock
        (agent/importing.py): one that can't be used is refused in plain words and the
        thread's pending card stays as it was. When nothing waits (the project finished,
        or a run is training) the examples are added for the next retrain. `comment` is
        the text sent with the file: a note about it, never an answer to a question.
        False when the thread has no project.
        """
        from agent.importing import ImportProgress, ImportRefused, prepare_import

        if self._project_id(thread_id) is None:
            return False
        progress = ImportProgress.for_upload(self.ctx.notifier, thread_id, filename, content,
                                             upload_id=upload_id,
                                             interval_s=self.ctx.progress_interval_s)
        try:
            prepared = prepare_import(filename, content, max_tokens=self._max_tokens(thread_id),
                                      progress=progress)
        except ImportRefused as exc:
            self.ctx.notifier.error(thread_id, f"Couldn't import {filename}: {sentence(str(exc))}")
            return True
        lock = self._lock(thread_id)
        if lock.acquire(timeout=IMPORT_LOCK_WAIT_S):
            try:
                pending = self._interrupts(thread_id)
                if pending:
                    value = {"action": "import", "user": user, "comment": comment,
                             **prepared.to_state(), "progress": _progress_state(progress)}
                    self._invoke(thread_id, Command(resume={pending[0].id: value}))
                    return True
            finally:
                lock.release()
        return self._add_examples(thread_id, prepared, progress)

    def pending(self, thread_id: str) -> list[tuple[str, dict[str, Any]]]:
        return [(i.id, i.value) for i in self._interrupts(thread_id)]

    def recover(self, *, wait: bool = False) -> list[str]:
        """Resume every thread that died mid-node (it has next nodes but nothing pending).

        Resumes run on background threads (a training watch may take hours) unless
        `wait` is set; `join()` waits for them.
        """
        with self.ctx.db.session() as s:
            thread_ids = list(s.exec(select(Project.thread_id)).all())
        stuck = []
        for tid in thread_ids:
            state = self._state(tid)
            if state.next and not state.interrupts:
                stuck.append(tid)
            for intr in state.interrupts:  # died after the step, before its card was posted
                if not self.ctx.db.is_claimed(f"ask:{intr.id}"):
                    self._ask(tid, intr)
        for tid in stuck:
            if wait:
                self._recover_one(tid)
            else:
                t = threading.Thread(target=self._recover_one, args=(tid,), daemon=True,
                                     name=f"recover-{tid}")
                t.start()
                self._background.append(t)
        return stuck

    def join(self, timeout: float | None = None) -> None:
        for t in list(self._background):
            t.join(timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Close the checkpoint connection once no graph step is using it.

        Closing a sqlite3 connection under a running step crashes the process, so if steps
        are still running after `timeout` the connection is left open (the process is
        exiting anyway) and a warning is logged.
        """
        with self._active_cv:
            self._closed = True
        self.join(timeout)
        with self._active_cv:
            idle = self._active_cv.wait_for(lambda: self._active == 0, timeout)
            if not idle:
                log.warning("%d graph step(s) still running; checkpoint DB left open",
                            self._active)
                return
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # ---- internals --------------------------------------------------------------

    def _add_examples(self, tid: str, prepared: Any, progress: Any) -> bool:
        """Store a prepared upload as new training examples of the project (no graph step)."""
        from agent.data import store_dataset

        project_id = self._project_id(tid)
        if project_id is None:
            return False
        ds = store_dataset(self.ctx.db, project_id, {"train": prepared.examples}, "import",
                           project_id, prepared.dupes, prepared.invalid)
        progress.done(f"stored: {ds.n_train:,} new training examples")
        self.ctx.notifier.say(
            tid,
            f"Added {ds.n_train} new examples from {prepared.filename} "
            f"({prepared.rows - ds.n_train} duplicates, invalid or already known). They are "
            f"used by the next retrain (`/tuner nightly on {project_id}` retrains nightly).",
        )
        return True

    def _max_tokens(self, tid: str) -> int:
        """The response budget uploads are validated against: the spec's, else the default."""
        spec = (self._state(tid).values or {}).get("spec") or {}
        return int(spec.get("max_output_tokens") or DEFAULT_MAX_TOKENS)

    def _add_correction(self, tid: str, text: str) -> bool:
        from agent.data import parse_correction, store_dataset, validate

        pair = parse_correction(text)
        project_id = self._project_id(tid) if pair is not None else None
        if pair is None or project_id is None:
            return False
        valid, invalid = validate([pair], DEFAULT_MAX_TOKENS)
        if invalid:
            self.ctx.notifier.error(tid, f"Correction not stored: {invalid[0][1]}.")
            return True
        ds = store_dataset(self.ctx.db, project_id, {"train": valid}, "correction", project_id)
        if ds.n_train:
            self.ctx.notifier.say(
                tid,
                "Correction stored as a training example for the next retrain "
                f"(`/tuner nightly on {project_id}` retrains nightly).",
            )
        else:
            self.ctx.notifier.say(tid, "That example is already in the project's data.")
        return True

    def _recover_one(self, tid: str) -> None:
        with self._locked(tid) as ok:
            if ok:
                log.info("recovering %s", tid)
                self._invoke(tid, None)

    def _reply_locked(self, tid: str, user: str, text: str) -> bool:
        if not text:
            return False
        for intr in self._interrupts(tid):
            kind = intr.value.get("kind") if isinstance(intr.value, dict) else None
            if kind in TEXT_ACTIONS:
                value = {"action": TEXT_ACTIONS[kind], "text": text, "user": user}
                self._invoke(tid, Command(resume={intr.id: value}))
                return True
        return False

    def _config(self, tid: str) -> dict[str, Any]:
        return {"configurable": {"thread_id": tid}}

    def _interrupts(self, tid: str) -> list[Interrupt]:
        return list(self._state(tid).interrupts)

    def _has_state(self, tid: str) -> bool:
        return bool(self._state(tid).values)

    @contextlib.contextmanager
    def _using_checkpoints(self) -> Iterator[None]:
        """Counts users of the checkpoint connection so close() never pulls it from under one."""
        with self._active_cv:
            if self._closed:
                raise RunnerClosed("the agent runner is shutting down")
            self._active += 1
        try:
            yield
        finally:
            with self._active_cv:
                self._active -= 1
                self._active_cv.notify_all()

    def _state(self, tid: str) -> Any:
        with self._using_checkpoints():
            return self.graph.get_state(self._config(tid))

    def _invoke(self, tid: str, graph_input: Any) -> None:
        try:
            with self._using_checkpoints():
                self._invoke_counted(tid, graph_input)
        except RunnerClosed:
            log.warning("runner closed; not advancing %s", tid)

    def _invoke_counted(self, tid: str, graph_input: Any) -> None:
        before = {i.id for i in self._interrupts(tid)}
        try:
            self.graph.invoke(
                graph_input, self._config(tid), context=self.ctx, durability="sync"
            )
        except RunDetached:
            log.info("%s detached from its training run; recover() re-attaches", tid)
            return
        except Exception as exc:  # noqa: BLE001 - report, keep the thread resumable
            log.exception("graph step failed for %s", tid)
            self.ctx.notifier.error(tid, f"Something went wrong: {human_error(exc)}")
        for intr in self._interrupts(tid):
            if intr.id not in before:
                self._ask(tid, intr)

    def _ask(self, tid: str, intr: Interrupt) -> None:
        """Post the card for an interrupt, then remember it was posted (see recover())."""
        self.ctx.notifier.ask(tid, intr.id, intr.value)
        self.ctx.db.claim(f"ask:{intr.id}")

    def _lock(self, tid: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(tid, threading.Lock())

    def _locked(self, tid: str) -> _Held:
        return _Held(self._lock(tid), self.lock_timeout_s)

    def _project_id(self, tid: str) -> int | None:
        with self.ctx.db.session() as s:
            project = s.exec(select(Project).where(Project.thread_id == tid)).first()
            return project.id if project else None

    def _create_project(self, tid: str, team: str, channel: str, thread_ts: str, user: str) -> int:
        with self.ctx.db.session() as s:
            project = Project(
                thread_id=tid, team_id=team, channel_id=channel, thread_ts=thread_ts,
                created_by=user, budget_usd=self.ctx.settings.tuner_project_budget_usd,
            )
            s.add(project)
            try:
                s.commit()
            except IntegrityError:  # another process created it first
                s.rollback()
                existing = self._project_id(tid)
                assert existing is not None
                return existing
            s.refresh(project)
            assert project.id is not None
            return project.id


def _progress_state(progress: Any) -> dict[str, Any]:
    """What the graph's import step needs to go on editing the same progress message."""
    return {"key": progress.key, "title": progress.title, "enabled": progress.enabled,
            "lines": list(progress.lines)}


class _Held:
    """`with` helper: acquires a lock with a timeout and says whether it got it."""

    def __init__(self, lock: threading.Lock, timeout: float) -> None:
        self.lock, self.timeout, self.ok = lock, timeout, False

    def __enter__(self) -> bool:
        self.ok = self.lock.acquire(timeout=self.timeout)
        if not self.ok:
            log.warning("thread busy; gave up after %.0fs", self.timeout)
        return self.ok

    def __exit__(self, *exc: object) -> None:
        if self.ok:
            self.lock.release()
