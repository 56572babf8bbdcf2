"""Engine and session helpers. SQLite file by default; Postgres by URL."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, SQLModel, create_engine

from storage import models  # noqa: F401  (registers tables)


class Database:
    def __init__(self, url: str) -> None:
        self.url = url
        kwargs: dict = {}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        self.engine: Engine = create_engine(url, **kwargs)
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        SQLModel.metadata.create_all(self.engine)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as s:
            yield s

    def claim(self, key: str) -> bool:
        """Insert a unique claim; True only for the first caller with this key."""
        from storage.models import SlackEventClaim

        with self.session() as s:
            s.add(SlackEventClaim(key=key))
            try:
                s.commit()
            except IntegrityError:
                s.rollback()
                return False
        return True

    def is_claimed(self, key: str) -> bool:
        from storage.models import SlackEventClaim

        with self.session() as s:
            return s.get(SlackEventClaim, key) is not None

    @property
    def sqlite_path(self) -> str | None:
        if not self.url.startswith("sqlite"):
            return None
        return self.url.split(":///", 1)[1] if ":///" in self.url else ":memory:"


def _sqlite_pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()
