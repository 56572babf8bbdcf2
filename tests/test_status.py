from __future__ import annotations

import pytest

from storage import spend
from storage.db import Database
from storage.models import Deployment, Project, Run
from storage.status import StatusSummary, summary


def test_empty(tmp_path):
    out = summary(Database(f"sqlite:///{tmp_path / 'e.db'}"))
    assert out == StatusSummary()


def test_summary(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 's.db'}")
    with db.session() as s:
        a = Project(thread_id="T:C:1", team_id="T", channel_id="C", thread_ts="1", created_by="U",
                    name="support", status="deployed", nightly_enabled=True)
        b = Project(thread_id="T:C:2", team_id="T", channel_id="C", thread_ts="2", created_by="U")
        s.add(a), s.add(b)
        s.commit()
        s.refresh(a), s.refresh(b)
        s.add(Run(project_id=a.id, status="succeeded", best_eval_loss=0.9))
        s.add(Run(project_id=a.id, status="succeeded", best_eval_loss=0.7))
        s.add(Run(project_id=a.id, status="failed"))
        s.add(Deployment(project_id=a.id, endpoint_id="ep1", model_ref="acme/m", status="healthy",
                         cost_per_1k_usd=0.3))
        s.add(Deployment(project_id=a.id, endpoint_id="ep0", model_ref="acme/old", status="removed"))
        s.commit()
        a_id, b_id = a.id, b.id
    spend.record(db, kind="claude_tokens", usd=1.25, project_id=a_id)
    spend.record(db, kind="pod_seconds", usd=0.5, project_id=a_id)
    spend.record(db, kind="claude_tokens", usd=0.25, project_id=b_id)

    out = summary(db)
    pa, pb = out.projects
    assert (pa.name, pa.status, pa.nightly_enabled) == ("support", "deployed", True)
    assert pa.latest_run_status == "failed" and pa.best_eval_loss == pytest.approx(0.7)
    assert pa.spend_usd == pytest.approx(1.75) and pb.spend_usd == pytest.approx(0.25)
    assert pb.latest_run_id is None and pb.best_eval_loss is None and pb.name == f"project {b_id}"
    assert [d.endpoint_id for d in out.deployments] == ["ep1"]
    assert out.spend_by_kind == pytest.approx({"claude_tokens": 1.5, "pod_seconds": 0.5})
    assert out.spend_total_usd == pytest.approx(2.0)
