"""Data pipeline: generation against FakeAnthropic via ClaudeClient, dedup, split, import."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
import re
import time

import pytest

from agent import data
from agent.data import (
    content_hash,
    dedup,
    generate_dataset,
    generate_samples,
    load_split,
    parse_import,
    split,
    store_dataset,
    to_jsonl,
    topic_seeds,
    validate,
)
from agent.spec import ExamplePair, TaskSpec
from jobs.claude import ClaudeClient
from jobs.llm import LLMOutputError
from storage import spend
from storage.db import Database
from storage.settings import Settings
from tests.fakes.anthropic_fake import API_KEY, FakeAnthropic, last_user_text, system_text

SPEC = TaskSpec(
    name="ticket-triage", description="Classify support tickets", inputs="ticket text",
    output_requirements="label and one-line reason", style="terse", system_prompt="Triage it.",
    max_output_tokens=256,
)
VOCAB = [f"w{i}" for i in range(2000)]


def words(key: str, n: int) -> str:
    rng = random.Random(hashlib.sha256(key.encode()).hexdigest())
    return " ".join(rng.choice(VOCAB) for _ in range(n))


def seeded_examples(req: dict) -> str:
    """Unique examples derived from the topic seed lines of the request."""
    text = req["messages"][0]["content"]
    count = int(re.search(r"Write exactly (\d+) examples", text).group(1))
    seeds = "|".join(re.findall(r"^- (domain: .*)$", text, re.M))
    return json.dumps({"examples": [
        {"prompt": words(f"{seeds}#{j}p", 20), "response": words(f"{seeds}#{j}r", 12)}
        for j in range(count)
    ]})


@pytest.fixture()
def db(project_db):
    return project_db


def claude(fake: FakeAnthropic, db: Database | None) -> ClaudeClient:
    s = Settings(_env_file=None, anthropic_api_key=API_KEY, anthropic_base_url=fake.base_url)
    return ClaudeClient(s, db, max_retries=0)


def test_topic_seeds_distinct_and_deterministic():
    a = topic_seeds(SPEC, 12000, seed=1)
    assert len(set(a)) == 12000
    assert a == topic_seeds(SPEC, 12000, seed=1)
    assert a[:50] != topic_seeds(SPEC, 50, seed=2)


def test_generate_samples(db):
    def responder(req):
        assert system_text(req).startswith("[tuner:samples]")
        assert "- be polite" in last_user_text(req)
        return seeded_examples(req)

    with FakeAnthropic.running(responder) as fake:
        got = generate_samples(claude(fake, db), SPEC, ["be polite"], n=6, project_id=1)
    assert len(got) == 6 and len({p.prompt for p in got}) == 6
    assert spend.total(db, project_id=1) > 0


def test_generate_dataset_1000_bounded_concurrency(db):
    progress: list[tuple[int, int]] = []

    def responder(req):
        assert system_text(req).startswith("[tuner:generate]")
        return seeded_examples(req)

    with FakeAnthropic.running(responder, latency_s=0.01) as fake:
        got = generate_dataset(
            claude(fake, db), SPEC, ["short"], 1000, concurrency=4, project_id=1,
            on_progress=lambda d, t: progress.append((d, t)),
        )
        n_calls = len(fake.message_requests)
        max_in_flight = fake.max_in_flight
    assert len(got) == 1000
    assert len({content_hash(p) for p in got}) == 1000
    assert 1 < max_in_flight <= 4
    assert n_calls <= 1000 * 1.1 / 8 + 4 + 1  # no runaway over-generation
    assert progress[-1] == (1000, 1000)
    assert [d for d, _ in progress] == sorted(d for d, _ in progress)
    # every call's usage landed in the ledger
    with db.session() as s:
        from storage.models import SpendEntry
        assert s.query(SpendEntry).count() == n_calls


def test_generate_dataset_covers_duplicates_and_failed_calls(db):
    """Every batch repeats one example of the first batch; every 5th call is malformed."""
    first = json.loads(seeded_examples({"messages": [{"role": "user", "content": "- domain: x\nWrite exactly 8 examples."}]}))

    def responder(req):
        text = req["messages"][0]["content"]
        if int(re.search(r"\(batch (\d+)\)", text).group(1)) % 5 == 0:
            return "not json"
        out = json.loads(seeded_examples(req))
        out["examples"][0] = first["examples"][0]
        return json.dumps(out)

    stats = data.GenerationStats()
    with FakeAnthropic.running(responder) as fake:
        got = generate_dataset(claude(fake, None), SPEC, [], 200, concurrency=3, stats=stats)
    assert len(got) == 200 and len({content_hash(p) for p in got}) == 200
    assert stats.failed_calls >= 1 and stats.exact_dupes >= 1 and stats.calls >= 200 / 7


def test_generate_dataset_raises_when_most_calls_fail():
    with FakeAnthropic.running(lambda req: '{"examples": "nope"}') as fake:
        with pytest.raises(LLMOutputError, match="Generation failed"):
            generate_dataset(claude(fake, None), SPEC, [], 100, concurrency=2)
        assert len(fake.message_requests) <= 3 * 5  # stopped early, not at the cap


def _p(prompt: str, response: str = "ok") -> ExamplePair:
    return ExamplePair(prompt=prompt, response=response)


def test_dedup_exact_and_near():
    base = words("base", 30)
    ws = base.split()
    ws[15] = "changed"
    near = " ".join(ws)
    distinct = [words(f"d{i}", 30) for i in range(50)]
    pairs = [_p(base), _p("  " + base.upper() + "\n"), _p(near), *map(_p, distinct)]
    res = dedup(pairs)
    assert res.kept == [pairs[0], *pairs[3:]]
    assert res.exact_dupes == [pairs[1]]
    assert res.near_dupes == [pairs[2]]
    assert res.dropped == 2


def test_dedup_keeps_similar_but_distinct_short_texts():
    pairs = [_p("Classify: I love it", "positive"), _p("Classify: I hate it", "negative")]
    assert dedup(pairs).kept == pairs


def test_dedup_scales_roughly_linearly():
    items = [_p(words(f"s{i}", 25), words(f"r{i}", 10)) for i in range(4000)]
    dupes = [_p(p.prompt.replace(p.prompt.split()[5], "zz", 1), p.response) for p in items[:300]]
    t0 = time.perf_counter()
    res = dedup(items + dupes)
    elapsed = time.perf_counter() - t0
    assert len(res.kept) == 4000 and len(res.near_dupes) == 300
    assert elapsed < 20


def test_validate_reasons():
    pairs = [_p("q", "a"), _p("  ", "a"), _p("q", ""), _p("q", "x" * 2000)]
    valid, invalid = validate(pairs, max_tokens=100)
    assert valid == [pairs[0]]
    assert [r for _, r in invalid] == ["empty prompt", "empty response", "response ~500 tokens > 100"]


def test_split_deterministic_fractions_and_order_independent():
    pairs = [_p(f"prompt {i}") for i in range(1000)]
    a = split(pairs, seed=7, val_frac=0.15, test_frac=0.1)
    assert (len(a["train"]), len(a["val"]), len(a["test"])) == (750, 150, 100)
    b = split(list(reversed(pairs)), seed=7, val_frac=0.15, test_frac=0.1)
    assert a == b
    c = split(pairs, seed=8, val_frac=0.15, test_frac=0.1)
    assert c["test"] != a["test"]
    all_ = a["train"] + a["val"] + a["test"]
    assert sorted(p.prompt for p in all_) == sorted(p.prompt for p in pairs)
    with pytest.raises(ValueError, match="val_frac"):
        split(pairs, seed=1, val_frac=0.05)
    with pytest.raises(ValueError, match="val_frac"):
        split(pairs, seed=1, val_frac=0.3)
    small = split(pairs[:5], seed=1)
    assert len(small["val"]) == 1 and len(small["test"]) == 1


def test_to_jsonl_round_trip():
    pairs = [_p("héllo\n\"quoted\"", "wörld"), ExamplePair(prompt="a", response="b", reference="big")]
    blob = to_jsonl(pairs, "You are terse.")
    lines = blob.decode().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert [m["role"] for m in first["messages"]] == ["system", "user", "assistant"]
    assert first["messages"][0]["content"] == "You are terse."
    assert parse_import("x.jsonl", blob) == pairs


def test_parse_import_jsonl_forms_and_errors():
    ok = (
        b'{"prompt": "p1", "response": "r1", "reference": "ref"}\n\n'
        b'{"input": "p2", "output": "r2"}\n'
        b'{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": [{"type": "text", "text": "p3"}]}, {"role": "assistant", "content": "r3"}]}\n'
    )
    got = parse_import("data.jsonl", ok)
    assert [(p.prompt, p.response, p.reference) for p in got] == [
        ("p1", "r1", "ref"), ("p2", "r2", None), ("p3", "r3", None)]
    bad = b'{"prompt": "p", "response": "r"}\n{oops\n{"prompt": "p"}\n{"prompt": "", "response": "r"}\n'
    with pytest.raises(ValueError) as ei:
        parse_import("data.jsonl", bad)
    msg = str(ei.value)
    assert "3 bad row(s)" in msg and "line 2: invalid JSON" in msg
    assert "line 3:" in msg and "line 4: empty prompt" in msg
    with pytest.raises(ValueError, match="no examples"):
        parse_import("e.jsonl", b"\n\n")


def test_parse_import_csv_and_errors():
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerows([["Prompt", "Response", "reference"], ["multi\nline p", "r, with comma", ""], ["p2", "r2", "ref2"]])
    got = parse_import("d.csv", buf.getvalue().encode("utf-8-sig"))
    assert [(p.prompt, p.response, p.reference) for p in got] == [
        ("multi\nline p", "r, with comma", None), ("p2", "r2", "ref2")]
    got2 = parse_import("d.csv", b"input,output\nhi,there\n")
    assert got2 == [_p("hi", "there")]
    with pytest.raises(ValueError, match="line 1: header must name prompt,response"):
        parse_import("d.csv", b"a,b\n1,2\n")
    with pytest.raises(ValueError) as ei:
        parse_import("d.csv", b"prompt,response\nok,fine\nonly-one\n,empty\n")
    assert "line 3: expected 2 columns, got 1" in str(ei.value)
    assert "line 4: empty prompt" in str(ei.value)


def test_store_and_load(db):
    pairs = [_p(f"prompt {i}", f"resp {i}") for i in range(20)]
    parts = split(pairs, seed=3)
    ds = store_dataset(db, 1, parts, source="synthetic", seed=3, dropped_dupes=2, dropped_invalid=1)
    assert (ds.n_train, ds.n_val, ds.n_test) == (16, 2, 2)
    assert ds.n_dropped_duplicates == 2 and ds.n_dropped_invalid == 1
    val = load_split(db, ds.id, "val")
    assert [e.prompt for e in val] == [p.prompt for p in parts["val"]]
    assert all(e.content_hash == content_hash(p) for e, p in zip(val, parts["val"]))
    # a second dataset with overlap only stores the new examples
    more = {"train": pairs[:5] + [_p("new one", "x")], "val": [], "test": []}
    ds2 = store_dataset(db, 1, more, source="import", seed=0)
    assert ds2.n_train == 1
    assert [e.prompt for e in load_split(db, ds2.id, "train")] == ["new one"]
    with pytest.raises(ValueError, match="unknown split"):
        store_dataset(db, 1, {"dev": []}, source="x", seed=0)
    # adopting: an overlapping file (or a re-run import) yields the whole dataset; known
    # examples keep their split, so the old test example stays out of training
    old_test = parts["test"][0]
    again = {"train": pairs[:5] + [old_test, _p("another", "y")], "val": [], "test": []}
    ds3 = store_dataset(db, 1, again, source="import", seed=0, adopt_existing=True)
    assert (ds3.n_train, ds3.n_val, ds3.n_test) == (
        1 + sum(p in parts["train"] for p in pairs[:5]),
        sum(p in parts["val"] for p in pairs[:5]),
        1 + sum(p in parts["test"] for p in pairs[:5]),
    )
    assert old_test.prompt in [e.prompt for e in load_split(db, ds3.id, "test")]
    assert len(load_split(db, ds3.id, "train")) == ds3.n_train


def test_near_dup_index_threshold_is_configurable():
    a = words("t", 30)
    ws = a.split()
    ws[10] = "x"
    b = " ".join(ws)
    assert len(dedup([_p(a), _p(b)], threshold=0.99).kept) == 2
    assert data.jaccard(data.shingles(a), data.shingles(b)) > 0.7


def test_dedup_catalog_rows_do_bounded_work_and_find_the_planted_dups():
    """Rows sharing boilerplate (pairwise Jaccard ~0.5) used to make every kept row an
    LSH candidate (quadratic). Exact checks per row are now capped; recall is unchanged."""
    from agent.dedup import MAX_VERIFY, DedupIndex
    from tests.datagen import catalog_pairs

    pairs, planted = catalog_pairs(3000, seed=3)
    index = DedupIndex()
    res = dedup(pairs, index=index)
    assert (len(res.exact_dupes), len(res.near_dupes)) == (planted.exact, planted.near)
    assert index.max_verified <= MAX_VERIFY
    assert index.verified <= 2 * len(pairs)  # the old scan did ~0.6 * n^2 / 2 checks


def test_dedup_reports_progress():
    pairs = [_p(words(f"s{i}", 25)) for i in range(12000)]
    seen: list[tuple[int, int]] = []
    dedup(pairs, on_progress=lambda done, total: seen.append((done, total)))
    assert seen == [(5000, 12000), (10000, 12000), (12000, 12000)]
