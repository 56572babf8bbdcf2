"""JudgeService through the real ClaudeClient + anthropic SDK against FakeAnthropic."""

from __future__ import annotations

import json
import re

import pytest

from jobs.claude import ClaudeClient
from jobs.judge import JUDGE_MARKER, JudgeService, side_by_side, summary, verdict, wilson
from storage import spend
from storage.db import Database
from storage.models import EvalResult, Example, Project, Run
from storage.settings import Settings
from tests.fakes.anthropic_fake import API_KEY, FakeAnthropic, system_text

# prompt -> (candidate output, reference output)
CASES = {
    "p-win-1": ("GOOD answer one", "weak answer"),
    "p-win-2": ("GOOD answer two", "weak answer"),
    "p-loss": ("weak answer", "GOOD reference"),
    "p-bias": ("first text", "second text"),  # judge always says "A": inconsistent -> tie
    "p-tie": ("same", "same"),
    "p-malformed": ("anything", "anything else"),  # judge never returns valid JSON
}


def _parts(req: dict) -> tuple[str, str, str]:
    first = req["messages"][0]["content"]
    text = first if isinstance(first, str) else "".join(b["text"] for b in first)
    get = lambda tag: re.search(rf"<{tag}>\n(.*?)\n</{tag}>", text, re.S).group(1)  # noqa: E731
    return get("prompt"), get("response_A"), get("response_B")


def responder(req: dict) -> str:
    assert system_text(req).startswith(JUDGE_MARKER)
    prompt, a, b = _parts(req)
    if prompt == "p-malformed":
        return "I think A is better, honestly."
    if prompt == "p-bias":
        winner = "A"
    elif "GOOD" in a:
        winner = "A"
    elif "GOOD" in b:
        winner = "B"
    else:
        winner = "tie"
    return json.dumps({"winner": winner, "reason": f"judged {prompt}"})


def _seed(db: Database) -> tuple[int, dict[str, str], dict[str, str]]:
    """-> run id, generations by example id, prompt by example id"""
    with db.session() as s:
        p = Project(thread_id="T:C:1", team_id="T", channel_id="C", thread_ts="1", created_by="U")
        s.add(p)
        s.commit()
        s.refresh(p)
        gens, prompts = {}, {}
        for i, (prompt, (cand, ref)) in enumerate(CASES.items()):
            # p-tie has no `reference`: the example's own response is the reference
            ex = Example(project_id=p.id, prompt=prompt, response=ref if prompt == "p-tie" else "unused",
                         reference=None if prompt == "p-tie" else ref, split="test", content_hash=f"h{i}")
            s.add(ex)
            s.commit()
            s.refresh(ex)
            gens[str(ex.id)] = cand
            prompts[str(ex.id)] = prompt
        r = Run(project_id=p.id, status="succeeded")
        s.add(r)
        s.commit()
        s.refresh(r)
        return r.id, gens, prompts


def _service(fake: FakeAnthropic, db: Database) -> JudgeService:
    settings = Settings(_env_file=None, anthropic_api_key=API_KEY, anthropic_base_url=fake.base_url,
                        tuner_generation_concurrency=3)
    return JudgeService(db, ClaudeClient(settings, db, max_retries=0), settings)


def test_judge_both_orders_inconsistent_and_malformed(db):
    run_id, gens, prompts = _seed(db)
    with FakeAnthropic.running(responder, latency_s=0.03) as fake:
        result = _service(fake, db).judge_run(run_id, gens)
        reqs = fake.message_requests
        peak = fake.max_in_flight

    assert (result.n, result.wins, result.ties, result.losses) == (6, 2, 3, 1)
    assert result.win_rate == pytest.approx(2 / 6)
    assert (result.ci_low, result.ci_high) == pytest.approx(wilson(2, 6))
    assert result.id is not None and result.against == "reference"

    # every well-formed pair was asked in both orders, candidate first then reference first
    seen = {}
    for r in reqs:
        prompt, a, b = _parts(r)
        seen.setdefault(prompt, set()).add((a, b))
    for prompt, (cand, ref) in CASES.items():
        assert {(cand, ref), (ref, cand)} <= seen[prompt], prompt
    # malformed output was retried by the client, then counted as a tie without crashing
    assert sum(_parts(r)[0] == "p-malformed" for r in reqs) == 6  # 3 attempts x 2 orders
    info = summary(result)
    assert info["n_malformed"] == 1 and info["n_errors"] == 0 and info["n_inconsistent"] == 1
    assert info["score"] == pytest.approx((2 + 1.5) / 6)
    assert 1 < peak <= 3  # bounded concurrency

    sbs = side_by_side(result)
    assert len(sbs) == 3 and {d["outcome"] for d in sbs} == {"win", "loss", "tie"}
    win = next(d for d in sbs if d["outcome"] == "win")
    assert win["candidate"].startswith("GOOD") and win["reference"] == "weak answer"
    assert win["prompt"] == prompts[str(win["example_id"])] and len(win["reasons"]) == 2

    promote, text = verdict(result, 0.5)
    assert promote and "2 wins, 3 ties, 1 losses" in text and "1 item(s) could not be judged" in text
    assert not verdict(result, 0.6)[0]
    assert spend.total(db, kind="claude_tokens") > 0
    with db.session() as s:
        assert s.get(EvalResult, result.id).wins == 2


def test_judge_against_champion_uses_champion_outputs(db):
    run_id, gens, _ = _seed(db)
    ids = list(gens)
    new = {ids[0]: "GOOD new", ids[1]: "plain new"}
    champion = {ids[0]: "plain old", ids[1]: "GOOD old"}
    with FakeAnthropic.running(responder) as fake:
        result = _service(fake, db).judge_run(run_id, new, against="champion",
                                              champion_generations=champion)
        pairs = {(_parts(r)[1], _parts(r)[2]) for r in fake.message_requests}
    assert (result.n, result.wins, result.losses, result.against) == (2, 1, 1, "champion")
    assert ("GOOD new", "plain old") in pairs and ("plain old", "GOOD new") in pairs
    promote, text = verdict(result, 0.5)
    assert not promote and "champion" in text


@pytest.mark.parametrize(
    ("k", "n", "low", "high"),
    [(8, 10, 0.4902, 0.9433), (0, 10, 0.0, 0.2775), (10, 10, 0.7225, 1.0), (50, 100, 0.4038, 0.5962),
     (1, 1, 0.2065, 1.0)],
)
def test_wilson_known_values(k, n, low, high):
    lo, hi = wilson(k, n)
    assert lo == pytest.approx(low, abs=1e-4) and hi == pytest.approx(high, abs=1e-4)


def test_wilson_edges():
    assert wilson(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson(3, 2)


def test_judge_report_posted_in_thread_has_all_parts(db):
    """The thread report: win rate + 95% CI, tie rate, eval loss, verdict vs the configurable
    threshold, and 3 side-by-side examples."""
    from agent.nodes_ship import judge_text

    run_id, gens, prompts = _seed(db)
    with FakeAnthropic.running(responder) as fake:
        result = _service(fake, db).judge_run(run_id, gens)
    lo, hi = wilson(2, 6)
    text = judge_text(result, 0.5, 0.6123)
    assert f"win rate 33% (95% CI {lo:.0%}–{hi:.0%})" in text
    assert "tie rate 50%" in text and "best eval loss 0.6123" in text
    assert "Verdict: good enough to deploy." in text and "vs threshold 0.50" in text
    assert text.count("*Example ") == 3
    for d in side_by_side(result):
        assert f"> prompt: {d['prompt']}" in text and f"> fine-tuned: {d['candidate']}" in text
        assert f"> reference: {d['reference']}" in text
    strict = judge_text(result, 0.6, None)
    assert "Verdict: not good enough yet." in strict and "vs threshold 0.60" in strict
    assert "best eval loss –" in strict
