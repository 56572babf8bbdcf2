"""Slack ack latency: N concurrent signed HTTP events against the bot in HTTP mode.

Runs the real Bolt app (bot.app.create_app + make_http_server) against the loopback
FakeSlack Web API with a runner that sleeps like a slow graph step, so acks must not wait
for work. Prints p50/p99/max ack latency.

    .venv/bin/python bench/bench_ack.py [--events 50] [--rounds 4] [--work-s 0.5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bot.app import EVENTS_PATH, create_app, make_http_server  # noqa: E402
from bot.handlers import Services  # noqa: E402
from bot.worker import ThreadWorker  # noqa: E402
from storage.db import Database  # noqa: E402
from storage.settings import Settings  # noqa: E402
from tests.fakes.slack_fake import (  # noqa: E402
    BOT_TOKEN, SIGNING_SECRET, FakeSlack, mention_pair, post_signed,
)


class SlowRunner:
    def __init__(self, work_s: float) -> None:
        self.work_s = work_s
        self.started = 0
        self.lock = threading.Lock()

    def start(self, **_: Any) -> None:
        time.sleep(self.work_s)
        with self.lock:
            self.started += 1

    def reply(self, *_: Any) -> bool:
        time.sleep(self.work_s)
        return True

    def resume(self, *_: Any) -> bool:
        return True

    def import_file(self, *_: Any, **__: Any) -> bool:
        return True

    def pending(self, _: str) -> list:
        return []


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(p / 100 * len(xs)) - 1))]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--work-s", type=float, default=0.5)
    args = ap.parse_args()

    with FakeSlack() as fake, tempfile.TemporaryDirectory() as tmp:
        settings = Settings(_env_file=None, slack_bot_token=BOT_TOKEN,  # type: ignore[call-arg]
                            slack_signing_secret=SIGNING_SECRET,
                            tuner_slack_api_url=fake.base_url,
                            database_url=f"sqlite:///{tmp}/bench.db")
        runner = SlowRunner(args.work_s)
        worker = ThreadWorker(max_workers=8)
        app = create_app(settings, runner, Services(db=Database(settings.database_url),
                                                     worker=worker))
        server = make_http_server(app, 0, host="127.0.0.1")
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}{EVENTS_PATH}"

        lat: list[float] = []
        statuses: list[int] = []
        n = 0
        with ThreadPoolExecutor(max_workers=args.events) as pool:
            for r in range(args.rounds + 1):  # round 0 warms up
                payloads = []
                for i in range(args.events):
                    n += 1
                    payloads.append(mention_pair("U1", "CBENCH", f"{1000 + n}.000001", "go")[0])
                barrier = threading.Barrier(args.events)

                def fire(p: dict) -> tuple[int, float]:
                    barrier.wait()
                    res = post_signed(url, p)
                    return res.status, res.elapsed_s

                results = list(pool.map(fire, payloads))
                if r > 0:
                    statuses += [s for s, _ in results]
                    lat += [e for _, e in results]
        server.shutdown()
        time.sleep(0.5)  # let the last listeners hand off before the worker closes
        worker.shutdown(wait=False)

    ms = [x * 1000 for x in lat]
    ok = sum(1 for s in statuses if s == 200)
    print(f"ack latency over {len(ms)} events ({args.events} concurrent, {args.rounds} rounds, "
          f"listener work {args.work_s}s each):")
    print(f"  p50 {statistics.median(ms):.1f} ms   p99 {pct(ms, 99):.1f} ms   "
          f"max {max(ms):.1f} ms   200s {ok}/{len(statuses)}")
    return 0 if ok == len(statuses) else 1


if __name__ == "__main__":
    sys.exit(main())
