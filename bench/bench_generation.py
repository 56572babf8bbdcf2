"""Generation throughput against FakeAnthropic with latency and a rate limit.

    python bench/bench_generation.py [--n 1200] [--concurrency 8] [--latency 0.2] [--rate 20]

The ceiling is min(concurrency / latency, rate limit) requests per second; the ratio
achieved / ceiling shows how much the client's concurrency and the SDK's 429 handling
(retry-after) lose.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.data import generate_dataset  # noqa: E402
from agent.spec import TaskSpec  # noqa: E402
from jobs.claude import ClaudeClient  # noqa: E402
from storage.settings import Settings  # noqa: E402
from tests.fakes.anthropic_fake import API_KEY, FakeAnthropic  # noqa: E402

VOCAB = [f"w{i}" for i in range(5000)]


def responder(req: dict) -> str:
    text = req["messages"][0]["content"]
    count = int(re.search(r"Write exactly (\d+) examples", text).group(1))
    seed = "|".join(re.findall(r"^- (domain: .*)$", text, re.M))

    def words(key: str, n: int) -> str:
        rng = random.Random(hashlib.sha256(key.encode()).hexdigest())
        return " ".join(rng.choice(VOCAB) for _ in range(n))

    return json.dumps(
        {"examples": [{"prompt": words(f"{seed}{j}p", 30), "response": words(f"{seed}{j}r", 20)}
                      for j in range(count)]}
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--latency", type=float, default=0.2)
    ap.add_argument("--rate", type=float, default=20.0)
    a = ap.parse_args()
    spec = TaskSpec(name="bench", description="d", inputs="i", output_requirements="o",
                    style="s", system_prompt="p")
    with FakeAnthropic.running(responder, latency_s=a.latency, rate_limit_per_s=a.rate) as fake:
        settings = Settings(_env_file=None, anthropic_api_key=API_KEY, anthropic_base_url=fake.base_url)
        llm = ClaudeClient(settings, None, max_retries=8)
        t0 = time.perf_counter()
        got = generate_dataset(llm, spec, [], a.n, concurrency=a.concurrency, batch_size=a.batch)
        elapsed = time.perf_counter() - t0
        ok = len(fake.message_requests)
        limited = fake.rate_limited
        peak = fake.max_in_flight
    achieved = ok / elapsed
    ceiling = min(a.concurrency / a.latency, a.rate)
    print(f"examples: {len(got)} in {elapsed:.2f}s ({len(got) / elapsed:.0f}/s)")
    print(f"requests: {ok} ok, {limited} rate-limited (429), peak in flight {peak}")
    print(f"achieved: {achieved:.1f} req/s   ceiling: {ceiling:.1f} req/s   "
          f"ratio: {achieved / ceiling:.2f}")


if __name__ == "__main__":
    main()
