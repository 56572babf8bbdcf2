"""Claude pairwise judge: candidate outputs vs reference (or champion) outputs.

Every pair is judged twice, with positions swapped (candidate as A, then as B), so
position bias cancels out. Outcomes per item, from the candidate's point of view:

  both orders agree        -> that outcome (win / loss / tie)
  orders disagree          -> tie (the judge is not consistent on this item)
  judge output malformed   -> tie, counted in ``n_malformed`` (after the client's retries)
  judge call failed        -> tie, counted in ``n_errors``

Statistics (documented definitions, used everywhere):

  win_rate      = wins / n          (stored in EvalResult.win_rate, 95% Wilson CI)
  tie_rate      = ties / n
  non_loss_rate = (wins + ties) / n
  score         = (wins + 0.5 * ties) / n   (preference score; promotion compares it)

``verdict`` promotes when ``score > threshold`` (strictly) and n > 0.
"""

from __future__ import annotations

import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel
from sqlmodel import select

from jobs.llm import LLM, LLMOutputError
from storage.db import Database
from storage.models import EvalResult, Example, Run
from storage.settings import Settings

log = logging.getLogger(__name__)

JUDGE_MARKER = "[tuner:judge]"
JUDGE_SYSTEM = f"""{JUDGE_MARKER}
You are an impartial judge comparing two responses to the same prompt.
Decide which response better fulfils the prompt: correctness first, then completeness,
then following the requested format, then concision. Ignore the order in which the
responses are shown and ignore their length unless length matters for the task.
Answer "A", "B", or "tie" (only when they are equally good), with a one-sentence reason."""

N_SIDE_BY_SIDE = 3
Outcome = Literal["win", "tie", "loss"]


class Verdict(BaseModel):
    """The judge's structured answer for one ordered pair."""

    winner: Literal["A", "B", "tie"]
    reason: str


class JudgeError(RuntimeError):
    """Nothing could be judged (e.g. unknown run, or every judge call failed)."""


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for k successes out of n (default 95%)."""
    if n <= 0:
        return (0.0, 1.0)
    if not 0 <= k <= n:
        raise ValueError(f"k={k} must be within 0..n={n}")
    p = k / n
    z2 = z * z
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass(frozen=True)
class _Item:
    example_id: int
    prompt: str
    candidate: str
    reference: str


@dataclass(frozen=True)
class _Judged:
    item: _Item
    outcome: Outcome
    reasons: list[str]
    malformed: bool = False
    error: bool = False
    inconsistent: bool = False


def _combine(first: Outcome, second: Outcome) -> Outcome:
    return first if first == second else "tie"


def _user_message(prompt: str, a: str, b: str) -> str:
    return (
        f"<prompt>\n{prompt}\n</prompt>\n\n"
        f"<response_A>\n{a}\n</response_A>\n\n"
        f"<response_B>\n{b}\n</response_B>\n\n"
        "Which response is better? Answer with winner A, B or tie and a short reason."
    )


class JudgeService:
    def __init__(self, db: Database, llm: LLM, settings: Settings) -> None:
        self.db = db
        self.llm = llm
        self.settings = settings

    # ------------------------------------------------------------------ public
    def judge_run(
        self,
        run_id: int,
        generations: dict[str, str],
        *,
        against: str = "reference",
        champion_generations: dict[str, str] | None = None,
    ) -> EvalResult:
        if against not in ("reference", "champion"):
            raise ValueError(f"against must be 'reference' or 'champion', not {against!r}")
        if against == "champion" and champion_generations is None:
            raise ValueError("judging against the champion needs champion_generations")
        with self.db.session() as s:
            run = s.get(Run, run_id)
            if run is None:
                raise JudgeError(f"run {run_id} not found")
            project_id = run.project_id
        items = self._items(project_id, generations, against, champion_generations or {})
        workers = max(1, min(self.settings.tuner_generation_concurrency, len(items) or 1))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="judge") as pool:
            judged = list(pool.map(lambda it: self._judge_item(it, project_id), items))
        if judged and all(j.error for j in judged):
            raise JudgeError(f"every judge call failed for run {run_id}")
        result = self._result(run_id, against, judged)
        with self.db.session() as s:
            s.add(result)
            s.commit()
            s.refresh(result)
        return result

    # ----------------------------------------------------------------- helpers
    def _items(
        self,
        project_id: int,
        generations: dict[str, str],
        against: str,
        champion: dict[str, str],
    ) -> list[_Item]:
        ids = sorted(int(k) for k in generations)
        with self.db.session() as s:
            rows = s.exec(
                select(Example).where(Example.id.in_(ids), Example.project_id == project_id)  # type: ignore[union-attr]
            ).all()
        by_id = {r.id: r for r in rows}
        items: list[_Item] = []
        for eid in ids:
            ex = by_id.get(eid)
            if ex is None:
                log.warning("judge: example %s not in project %s, skipped", eid, project_id)
                continue
            if against == "champion":
                ref = champion.get(str(eid))
                if ref is None:
                    log.warning("judge: champion has no output for example %s, skipped", eid)
                    continue
            else:
                ref = ex.reference if ex.reference is not None else ex.response
            items.append(_Item(eid, ex.prompt, generations[str(eid)], ref))
        return items

    def _ask(self, prompt: str, a: str, b: str, project_id: int) -> Verdict:
        return self.llm.structured(
            system=JUDGE_SYSTEM,
            messages=[{"role": "user", "content": _user_message(prompt, a, b)}],
            schema=Verdict,
            purpose="judge",
            project_id=project_id,
            max_tokens=512,
            model=self.settings.tuner_judge_model,
        )

    def _judge_item(self, item: _Item, project_id: int) -> _Judged:
        """Ask both orders (each independently); any unusable order makes the item a tie."""
        verdicts: list[Verdict] = []
        problems: list[str] = []
        malformed = error = False
        for a, b in ((item.candidate, item.reference), (item.reference, item.candidate)):
            try:
                verdicts.append(self._ask(item.prompt, a, b, project_id))
            except LLMOutputError as exc:
                log.warning("judge: malformed verdict for example %s: %s", item.example_id, exc)
                malformed = True
                problems.append(f"malformed judge output: {exc}")
            except Exception as exc:  # noqa: BLE001 - one bad call must not sink the judgement
                log.warning("judge: call failed for example %s: %s", item.example_id, exc)
                error = True
                problems.append(f"judge call failed: {type(exc).__name__}")
        if malformed or error:
            reasons = [v.reason for v in verdicts] + problems
            return _Judged(item, "tie", reasons, malformed=malformed, error=error and not malformed)
        v1, v2 = verdicts
        first: Outcome = {"A": "win", "B": "loss", "tie": "tie"}[v1.winner]  # type: ignore[assignment]
        second: Outcome = {"A": "loss", "B": "win", "tie": "tie"}[v2.winner]  # type: ignore[assignment]
        return _Judged(
            item, _combine(first, second), [v1.reason, v2.reason], inconsistent=first != second
        )

    def _result(self, run_id: int, against: str, judged: list[_Judged]) -> EvalResult:
        n = len(judged)
        wins = sum(j.outcome == "win" for j in judged)
        ties = sum(j.outcome == "tie" for j in judged)
        losses = n - wins - ties
        lo, hi = wilson(wins, n)
        summary: dict[str, Any] = {
            "type": "summary",
            "n_malformed": sum(j.malformed for j in judged),
            "n_errors": sum(j.error for j in judged),
            "n_inconsistent": sum(j.inconsistent for j in judged),
            "tie_rate": ties / n if n else 0.0,
            "non_loss_rate": (wins + ties) / n if n else 0.0,
            "score": (wins + 0.5 * ties) / n if n else 0.0,
        }
        details: list[dict[str, Any]] = [summary] + [
            {
                "type": "example",
                "example_id": j.item.example_id,
                "prompt": j.item.prompt,
                "candidate": j.item.candidate,
                "reference": j.item.reference,
                "outcome": j.outcome,
                "reasons": j.reasons,
            }
            for j in _pick_side_by_side(judged)
        ]
        return EvalResult(
            run_id=run_id,
            against=against,
            n=n,
            wins=wins,
            ties=ties,
            losses=losses,
            win_rate=wins / n if n else 0.0,
            ci_low=lo,
            ci_high=hi,
            details=details,
        )


def _pick_side_by_side(judged: list[_Judged]) -> list[_Judged]:
    """Up to 3 examples, preferring one win, one loss and one tie (clean verdicts first)."""
    clean = [j for j in judged if not (j.malformed or j.error)] or judged
    picked: list[_Judged] = []
    for outcome in ("win", "loss", "tie"):
        for j in clean:
            if j.outcome == outcome:
                picked.append(j)
                break
    for j in clean:
        if len(picked) >= N_SIDE_BY_SIDE:
            break
        if j not in picked:
            picked.append(j)
    return picked[:N_SIDE_BY_SIDE]


def summary(result: EvalResult) -> dict[str, Any]:
    """The summary dict stored as details[0] (n_malformed, tie_rate, score, ...)."""
    for d in result.details or []:
        if d.get("type") == "summary":
            return d
    return {}


def side_by_side(result: EvalResult) -> list[dict[str, Any]]:
    """The stored side-by-side examples (example_id, prompt, candidate, reference, outcome, reasons)."""
    return [d for d in result.details or [] if d.get("type") == "example"]


def score(result: EvalResult) -> float:
    return (result.wins + 0.5 * result.ties) / result.n if result.n else 0.0


def verdict(result: EvalResult, threshold: float) -> tuple[bool, str]:
    """Promote iff n > 0 and the preference score (wins + ties/2)/n is above threshold."""
    against = "the champion" if result.against == "champion" else "the reference outputs"
    if result.n == 0:
        return False, f"Nothing to judge against {against}: no comparable outputs."
    s = score(result)
    promote = s > threshold
    extra = summary(result)
    text = (
        f"Against {against}: {result.wins} wins, {result.ties} ties, {result.losses} losses "
        f"(n={result.n}). Win rate {result.win_rate:.0%} "
        f"(95% CI {result.ci_low:.0%}-{result.ci_high:.0%}), "
        f"non-loss rate {extra.get('non_loss_rate', 0.0):.0%}, score {s:.2f} vs threshold {threshold:.2f}"
    )
    bad = int(extra.get("n_malformed", 0)) + int(extra.get("n_errors", 0))
    if bad:
        text += f"; {bad} item(s) could not be judged and count as ties"
    text += ". " + ("Promote: the new model is better." if promote else "Keep: not better enough.")
    return promote, text
