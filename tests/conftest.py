"""Fixtures shared across test modules."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from storage.db import Database
from storage.models import Project
from tests.fakes.runpod_fake import FakeRunPod


@pytest.fixture()
def db(tmp_path: Path) -> Database:
    """An empty SQLite database in the test's tmp dir."""
    return Database(f"sqlite:///{tmp_path / 't.db'}")


@pytest.fixture()
def project_db(db: Database) -> Database:
    """`db` holding one project (id 1, thread T:C:1)."""
    with db.session() as s:
        s.add(Project(thread_id="T:C:1", team_id="T", channel_id="C", thread_ts="1", created_by="U"))
        s.commit()
    return db


def _running_fake(monkeypatch: pytest.MonkeyPatch, **kwargs: object) -> Iterator[FakeRunPod]:
    with FakeRunPod.running(**kwargs) as fake:  # type: ignore[arg-type]
        for key, value in fake.env().items():
            monkeypatch.setenv(key, value)
        yield fake


@pytest.fixture()
def fake_runpod(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeRunPod]:
    """FakeRunPod whose pods really run jobs.train; the SDK env points at it."""
    yield from _running_fake(monkeypatch, workroot=tmp_path / "pods")


@pytest.fixture()
def fake_runpod_gql(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeRunPod]:
    """FakeRunPod answering GraphQL only (pods are records, no processes)."""
    yield from _running_fake(monkeypatch, run_pods=False)
