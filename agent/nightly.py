"""Nightly retrain: new data since the last run? retrain, judge vs the champion, promote, report.

Idempotent per (project, date): the unique NightlyRun row is the claim; a second call the
same day returns the existing row and does nothing else.

Data: the frozen test split is every `test` example of the project; new examples
(created after the project's last run) never join it (a new `test` example becomes
`train`). Because the trainer trains on `Example.dataset_id == run.dataset_id`, the
project's examples are re-pointed at the new nightly Dataset (split labels unchanged).

Champion outputs: `Run.config["generations"]`, stored by the trainer for every run. If the
champion has none, both models are compared through their preference score against the
reference outputs instead.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, Protocol

from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select

from agent.nodes_common import sentence
from agent.ports import Notifier
from jobs.judge import JudgeService, score, verdict
from jobs.llm import LLM
from jobs.values import RunOutcome, RunSnapshot
from storage import spend
from storage.db import Database
from storage.models import Dataset, EvalResult, Example, NightlyRun, Project, Run, SpendEntry, utcnow
from storage.redact import redact
from storage.settings import Settings

log = logging.getLogger(__name__)
NIGHTLY_USER = "nightly"


class Trainer(Protocol):
    def active_run(self, project_id: int) -> Run | None: ...

    def launch(self, project_id: int, dataset_id: int, *, user_id: str) -> int: ...

    def run(self, run_id: int, on_progress: Callable[[RunSnapshot], None]) -> RunOutcome: ...


class NightlyService:
    def __init__(
        self,
        db: Database,
        settings: Settings,
        llm: LLM,
        trainer: Trainer,
        judge: JudgeService,
        notifier: Notifier,
    ) -> None:
        self.db = db
        self.settings = settings
        self.llm = llm
        self.trainer = trainer
        self.judge = judge
        self.notifier = notifier

    # ------------------------------------------------------------------ public
    def run(self, project_id: int, run_date: str) -> NightlyRun:
        with self.db.session() as s:
            project = s.get(Project, project_id)
            if project is None:
                raise KeyError(f"project {project_id} not found")
            row = NightlyRun(project_id=project_id, run_date=run_date, status="running")
            s.add(row)
            try:
                s.commit()
            except IntegrityError:
                s.rollback()
                existing = s.exec(
                    select(NightlyRun).where(
                        NightlyRun.project_id == project_id, NightlyRun.run_date == run_date
                    )
                ).one()
                log.info("nightly %s/%s already ran (%s)", project_id, run_date, existing.status)
                return existing
            s.refresh(row)
        return self._execute(project, row, lambda: self._work(project, row))

    def recover(self) -> list[int]:
        """After a restart: finish nightlies that a dead process left "running".

        One whose training run was launched re-attaches to it (the trainer adopts the pod)
        and is judged and reported as usual; one that died before launching is reported
        as interrupted, and its new data waits for the next night.
        """
        with self.db.session() as s:
            rows = list(s.exec(select(NightlyRun).where(NightlyRun.status == "running")).all())
        for row in rows:
            with self.db.session() as s:
                project = s.get(Project, row.project_id)
            if project is None:
                continue
            self._execute(project, row, functools.partial(self._resume_work, project, row))
        return [int(r.id) for r in rows]  # type: ignore[arg-type]

    def _resume_work(self, project: Project, row: NightlyRun) -> tuple[str, str, int | None]:
        if row.run_id is None:
            return ("failed", "interrupted by a bot restart before training started; "
                    "the new data is kept for the next night.", None)
        return self._train_judge(project, row.run_id, row.new_examples)

    def _execute(
        self, project: Project, row: NightlyRun, work: Callable[[], tuple[str, str, int | None]]
    ) -> NightlyRun:
        project_id, run_date = int(project.id), row.run_date  # type: ignore[arg-type]
        started = utcnow()
        try:
            status, body, run_id = work()
        except Exception as exc:  # noqa: BLE001 - always report, never crash the scheduler
            log.exception("nightly %s/%s failed", project_id, run_date)
            detail = redact(f"{type(exc).__name__}: {exc}", self.settings)[:300]
            status, body, run_id = "failed", f"failed: {detail}", None
        cost = self._spent_since(project_id, started)
        report = (
            f"Nightly retrain for {project.name or f'project {project_id}'} ({run_date}): {body}"
            f"\nSpend for this nightly: ${cost:.2f}"
            f" (project total ${spend.total(self.db, project_id=project_id):.2f})."
        )
        row = self._finish(row, status, report)
        try:
            self.notifier.say(f"{project.team_id}:{project.channel_id}:", report)
        except Exception:  # noqa: BLE001
            log.exception("nightly report for project %s could not be posted", project_id)
        if run_id is not None:
            log.info("nightly %s/%s: run %s -> %s", project_id, run_date, run_id, status)
        return row

    # ---------------------------------------------------------------- the work
    def _work(self, project: Project, row: NightlyRun) -> tuple[str, str, int | None]:
        pid = int(project.id)  # type: ignore[arg-type]
        new = self._new_examples(pid)
        need = self.settings.tuner_nightly_min_new_examples
        if not new:
            return "skipped", "skipped: no new data.", None
        if len(new) < need:
            return "skipped", f"skipped: only {len(new)} new examples (need {need}).", None
        if self.trainer.active_run(pid) is not None:
            return "skipped", "skipped: a training run is already in progress for this project.", None
        if project.champion_run_id is None:
            return "failed", "failed: the project has no champion model to compare with yet.", None
        dataset_id = self._nightly_dataset(pid, new)
        run_id = self.trainer.launch(pid, dataset_id, user_id=NIGHTLY_USER)
        with self.db.session() as s:  # a restarted process finds the run through this row
            r = s.get(NightlyRun, row.id)
            assert r is not None
            r.run_id, r.new_examples = run_id, len(new)
            s.add(r)
            s.commit()
        return self._train_judge(project, run_id, len(new))

    def _train_judge(self, project: Project, run_id: int, n_new: int) -> tuple[str, str, int | None]:
        pid = int(project.id)  # type: ignore[arg-type]
        outcome = self.trainer.run(run_id, lambda _snap: None)
        if outcome.status not in ("succeeded", "stopped"):
            why = sentence(f"failed: training run {run_id} {outcome.status}: "
                           f"{outcome.error or 'no detail'}")
            return "failed", why, run_id
        test_ids = self._frozen_test_ids(pid)
        gens = {k: v for k, v in outcome.generations.items() if int(k) in test_ids}
        if not gens:
            return "failed", f"failed: run {run_id} produced no outputs for the frozen test set.", run_id
        promote, text = self._compare(project, run_id, gens)
        if promote:
            with self.db.session() as s:
                p = s.get(Project, pid)
                assert p is not None
                p.champion_run_id = run_id
                s.add(p)
                s.commit()
        loss = f"{outcome.best_eval_loss:.4f}" if outcome.best_eval_loss is not None else "n/a"
        head = f"retrained on {n_new} new examples (run {run_id}, best eval loss {loss}). "
        tail = f" New champion: run {run_id}." if promote else f" Champion stays run {project.champion_run_id}."
        return ("promoted" if promote else "kept"), head + text + tail, run_id

    def _compare(self, project: Project, run_id: int, gens: dict[str, str]) -> tuple[bool, str]:
        champ_id = project.champion_run_id
        with self.db.session() as s:
            champ = s.get(Run, champ_id)
        champ_gens = ((champ.config or {}).get("generations") if champ else None) or {}
        champ_gens = {k: v for k, v in champ_gens.items() if k in gens}
        threshold = self.settings.tuner_promotion_threshold
        if champ_gens:
            result = self.judge.judge_run(run_id, gens, against="champion", champion_generations=champ_gens)
            promote, text = verdict(result, threshold)
        else:
            # No stored champion outputs: compare both against the reference outputs.
            result = self.judge.judge_run(run_id, gens, against="reference")
            with self.db.session() as s:
                prev = s.exec(
                    select(EvalResult)
                    .where(EvalResult.run_id == champ_id, EvalResult.against == "reference")
                    .order_by(col(EvalResult.id).desc())
                ).first()
            _, text = verdict(result, threshold)
            new_s = score(result)
            old_s = score(prev) if prev else 0.0
            promote = result.n > 0 and new_s > old_s
            text += (
                f" (champion outputs were not stored, so compared via the reference: "
                f"new score {new_s:.2f} vs champion {old_s:.2f})"
            )
        with self.db.session() as s:
            row = s.get(EvalResult, result.id)
            assert row is not None
            row.promoted = promote
            s.add(row)
            s.commit()
        return promote, text

    # ------------------------------------------------------------------- data
    def _new_examples(self, project_id: int) -> list[Example]:
        with self.db.session() as s:
            # since the last run that produced a model: a failed run doesn't use up new data
            last = s.exec(
                select(Run.created_at)
                .where(Run.project_id == project_id, col(Run.status).in_(("succeeded", "stopped")))
                .order_by(col(Run.created_at).desc())
            ).first()
            q = select(Example).where(Example.project_id == project_id)
            if last is not None:
                q = q.where(Example.created_at > last)
            return list(s.exec(q.order_by(col(Example.id))).all())

    def _frozen_test_ids(self, project_id: int) -> set[int]:
        with self.db.session() as s:
            return set(
                s.exec(select(Example.id).where(Example.project_id == project_id, Example.split == "test")).all()
            )

    def _nightly_dataset(self, project_id: int, new: list[Example]) -> int:
        new_ids = {e.id for e in new}
        with self.db.session() as s:
            rows = list(s.exec(select(Example).where(Example.project_id == project_id)).all())
            ds = Dataset(project_id=project_id, source="nightly")
            s.add(ds)
            s.flush()
            counts = {"train": 0, "val": 0, "test": 0}
            for e in rows:
                if e.id in new_ids and e.split not in ("train", "val"):
                    e.split = "train"  # the test split stays frozen
                e.dataset_id = ds.id
                counts[e.split] = counts.get(e.split, 0) + 1
                s.add(e)
            ds.n_train, ds.n_val, ds.n_test = counts["train"], counts["val"], counts["test"]
            s.add(ds)
            s.commit()
            return int(ds.id)  # type: ignore[arg-type]

    def _spent_since(self, project_id: int, since: Any) -> float:
        with self.db.session() as s:
            rows = s.exec(
                select(SpendEntry.usd).where(SpendEntry.project_id == project_id, SpendEntry.created_at >= since)
            ).all()
        return float(sum(rows))

    def _finish(self, row: NightlyRun, status: str, report: str) -> NightlyRun:
        with self.db.session() as s:
            r = s.get(NightlyRun, row.id)
            assert r is not None
            r.status, r.report = status, report
            s.add(r)
            s.commit()
            s.refresh(r)
            return r
