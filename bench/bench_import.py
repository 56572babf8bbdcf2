"""A ~20 MB JSONL import, from the upload's bytes to the summary in the thread.

The real AgentRunner and graph (SQLite checkpoints, Claude through the loopback
FakeAnthropic) with a project waiting at its first question; the file is catalog-style
(shared boilerplate, the hard case for dedup). Prints when each progress stage showed up
and when the summary did. Issue 14: it used to take ~3 minutes (a catalog file: never).

    .venv/bin/python bench/bench_import.py [--rows 45000]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.context import AgentContext  # noqa: E402
from agent.ports import RecordingNotifier  # noqa: E402
from agent.runner import AgentRunner  # noqa: E402
from jobs.claude import ClaudeClient  # noqa: E402
from storage.db import Database  # noqa: E402
from storage.settings import Settings  # noqa: E402
from tests.datagen import catalog_pairs, to_jsonl  # noqa: E402
from tests.fakes.anthropic_fake import API_KEY, FakeAnthropic  # noqa: E402


class TimedNotifier(RecordingNotifier):
    def __init__(self) -> None:
        super().__init__()
        self.t0 = time.perf_counter()
        self.times: list[tuple[float, str, str]] = []

    def progress(self, thread_id: str, key: str, text: str, actions: Any = None) -> None:
        self.times.append((time.perf_counter() - self.t0, "progress", text.splitlines()[-1]))

    def say(self, thread_id: str, text: str) -> None:
        self.times.append((time.perf_counter() - self.t0, "say", text[:90]))


def question(_: dict[str, Any]) -> str:
    return json.dumps({"ready": False, "question": "What goes in?", "spec": None})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=45_000)
    args = ap.parse_args()
    logging.disable(logging.ERROR)  # the estimate step fails here: no RunPod configured
    pairs, planted = catalog_pairs(args.rows, seed=1)
    body = to_jsonl(pairs)
    print(f"{args.rows} rows, {len(body) / 1e6:.1f} MB, planted {planted.exact} exact and "
          f"{planted.near} near duplicates")
    with tempfile.TemporaryDirectory() as tmp, FakeAnthropic.running(question) as fake:
        settings = Settings(_env_file=None, anthropic_api_key=API_KEY,  # type: ignore[call-arg]
                            anthropic_base_url=fake.base_url,
                            database_url=f"sqlite:///{tmp}/tuner.db")
        db = Database(settings.database_url)
        notifier = TimedNotifier()
        ctx = AgentContext(db=db, settings=settings, llm=ClaudeClient(settings, db),
                           notifier=notifier, progress_interval_s=2.0)
        runner = AgentRunner(ctx)
        runner.start(team="T", channel="C", thread_ts="1.0", user="U", text="catalog pages")
        notifier.t0, notifier.times = time.perf_counter(), []
        cpu = time.process_time()
        runner.import_file("T:C:1.0", "U", "catalog.jsonl", body, upload_id="F1")
        wall, cpu = time.perf_counter() - notifier.t0, time.process_time() - cpu
        for t, kind, text in notifier.times:
            if kind == "say" or not text.startswith("…"):
                print(f"  {t:6.1f} s  {kind:8s} {text}")
        print(f"upload to summary: {wall:.1f} s wall ({cpu:.1f} s CPU), "
              f"{args.rows / wall:.0f} rows/s")
        runner.close()


if __name__ == "__main__":
    main()
