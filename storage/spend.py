"""Spend ledger: every Claude token, pod second and endpoint call that costs money."""

from __future__ import annotations

from sqlalchemy import func
from sqlmodel import select

from storage.db import Database
from storage.models import SpendEntry

# USD per million tokens (input, output); unknown models use the default.
CLAUDE_PRICES: dict[str, tuple[float, float]] = {
    "claude-opus-4-5": (5.0, 25.0),
    "claude-opus-4-6": (5.0, 25.0),
    "claude-opus-4-7": (5.0, 25.0),
    "claude-sonnet-4-5": (3.0, 15.0),
    "claude-sonnet-4-6": (3.0, 15.0),
    "claude-haiku-4-5": (1.0, 5.0),
}
DEFAULT_CLAUDE_PRICE = (3.0, 15.0)


def claude_cost(model: str, input_tokens: int, output_tokens: int) -> float:
    pin, pout = CLAUDE_PRICES.get(model, DEFAULT_CLAUDE_PRICE)
    return (input_tokens * pin + output_tokens * pout) / 1_000_000


def record(
    db: Database,
    *,
    kind: str,
    usd: float,
    quantity: float = 0.0,
    project_id: int | None = None,
    run_id: int | None = None,
    detail: str = "",
) -> SpendEntry:
    entry = SpendEntry(
        kind=kind, usd=usd, quantity=quantity, project_id=project_id, run_id=run_id, detail=detail
    )
    with db.session() as s:
        s.add(entry)
        s.commit()
        s.refresh(entry)
    return entry


def total(db: Database, *, project_id: int | None = None, kind: str | None = None) -> float:
    with db.session() as s:
        q = select(func.coalesce(func.sum(SpendEntry.usd), 0.0))
        if project_id is not None:
            q = q.where(SpendEntry.project_id == project_id)
        if kind is not None:
            q = q.where(SpendEntry.kind == kind)
        return float(s.exec(q).one())


def by_kind(db: Database, *, project_id: int | None = None) -> dict[str, float]:
    with db.session() as s:
        q = select(SpendEntry.kind, func.sum(SpendEntry.usd)).group_by(SpendEntry.kind)
        if project_id is not None:
            q = q.where(SpendEntry.project_id == project_id)
        return {k: float(v or 0.0) for k, v in s.exec(q).all()}
