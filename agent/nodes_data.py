"""Samples, review, bulk generation and file import: everything up to a stored dataset."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from langgraph.runtime import Runtime
from langgraph.types import Command, interrupt

from agent.context import AgentContext
from agent.nodes_common import action_of, guarded, route_import, sentence, set_project
from agent.state import AgentState
from storage.models import TaskSpecRow

__all__ = ["sample", "review", "generate", "import_data"]

SAMPLE_COUNT = 8
DEFAULT_MAX_TOKENS = 1024


def _spec(state: AgentState) -> Any:
    from agent.spec import TaskSpec

    return TaskSpec(**(state.get("spec") or {}))


def _count(value: Any) -> int:
    return value if isinstance(value, int) else len(value)


@guarded("sample", "confirm")
def sample(state: AgentState, runtime: Runtime[AgentContext]) -> Command:
    from agent.data import generate_samples

    ctx = runtime.context
    project_id = state["project_id"]
    if state.get("spec_row_id"):
        with ctx.db.session() as s:
            row = s.get(TaskSpecRow, state["spec_row_id"])
            if row is not None and not row.approved:
                row.approved = True
                s.add(row)
                s.commit()
    set_project(ctx, project_id, status="sampling")
    pairs = generate_samples(
        ctx.llm, _spec(state), generation_guidelines(state), n=SAMPLE_COUNT,
        project_id=project_id, seed=state.get("sample_round", 0),
    )
    samples = [{"prompt": p.prompt, "response": p.response} for p in pairs]
    return Command(
        goto="review",
        update={"samples": samples, "edited": [],
                "sample_round": state.get("sample_round", 0) + 1},
    )


def review(state: AgentState, runtime: Runtime[AgentContext]) -> Command:
    value = interrupt(
        {
            "kind": "samples",
            "examples": state.get("samples", []),
            "round": state.get("sample_round", 1),
            "edited": list(state.get("edited", [])),
        }
    )
    if (cmd := route_import(value, "review")) is not None:
        return cmd
    action = action_of(value)
    if action == "approve":
        return Command(goto="generate")
    if action == "regenerate":
        text = str(value.get("text", "")).strip()
        guidelines = [*state.get("guidelines", []), *([text] if text else [])]
        return Command(goto="sample", update={"guidelines": guidelines})
    if action == "edit":
        return _apply_edit(state, runtime.context, value)
    return Command(goto="review")


def _apply_edit(state: AgentState, ctx: AgentContext, value: dict[str, Any]) -> Command:
    """The edited example replaces its sample, becomes gold, and the card is asked again."""
    from agent.data import validate
    from agent.spec import ExamplePair

    samples = [dict(x) for x in state.get("samples", [])]
    try:
        index = int(value.get("index", -1))
    except (TypeError, ValueError):
        index = -1
    edit = ExamplePair(prompt=str(value.get("prompt", "")).strip(),
                       response=str(value.get("response", "")).strip())
    max_tokens = int((state.get("spec") or {}).get("max_output_tokens") or DEFAULT_MAX_TOKENS)
    _, invalid = validate([edit], max_tokens)
    problem = (f"there is no example {index + 1}" if not 0 <= index < len(samples)
               else invalid[0][1] if invalid else None)
    if problem:
        ctx.notifier.error(state["thread_id"], f"Couldn't apply the edit: {problem}.")
        return Command(goto="review")
    new = {"prompt": edit.prompt, "response": edit.response}
    old = samples[index]
    gold = [g for g in state.get("gold_examples", []) if g != old and g != new]
    samples[index] = new
    edited = sorted({*state.get("edited", []), index})
    return Command(goto="review", update={
        "samples": samples, "edited": edited, "gold_examples": [*gold, new]})


GOLD_PROMPT_CHARS = 4000


def gold_guideline(example: dict[str, str]) -> str:
    """One user-edited example as a guideline line: a few-shot example to match."""
    def clip(t: str) -> str:
        return t if len(t) <= GOLD_PROMPT_CHARS else t[: GOLD_PROMPT_CHARS - 1] + "…"

    return ("Gold example written by the user; match its format, style and quality "
            f"(do not copy it):\n  Prompt: {clip(example['prompt'])}\n"
            f"  Response: {clip(example['response'])}")


def generation_guidelines(state: AgentState) -> list[str]:
    """The user's feedback plus their edited (gold) examples, for every generation request."""
    return [*state.get("guidelines", []),
            *(gold_guideline(g) for g in state.get("gold_examples", []))]


class _Throttle:
    """Edits one progress message at most every `interval_s` (always the final count)."""

    def __init__(self, ctx: AgentContext, thread_id: str, interval_s: float) -> None:
        self.ctx, self.thread_id, self.interval_s = ctx, thread_id, interval_s
        self.lock = threading.Lock()
        self.last = 0.0

    def __call__(self, done: int, total: int) -> None:
        with self.lock:
            now = time.monotonic()
            if done < total and now - self.last < self.interval_s:
                return
            self.last = now
            self.ctx.notifier.progress(
                self.thread_id, "generation", f"Generating… {min(done, total)}/{total}"
            )


def _finish_dataset(
    state: AgentState, ctx: AgentContext, pairs: list[Any], source: str, label: str,
    stats: Any = None, gold: list[Any] | None = None,
) -> dict[str, Any]:
    """dedup -> validate -> split -> store -> upload train JSONL -> summary.

    `stats` (agent.data.GenerationStats) adds what generation already dropped on the way.
    `gold` (user-edited examples, also in `pairs` and first there so dedup keeps them over
    generated near-copies) always go to the train split.
    """
    from agent.data import dedup, validate

    max_tokens = int((state.get("spec") or {}).get("max_output_tokens") or DEFAULT_MAX_TOKENS)
    deduped = dedup(pairs)
    valid, invalid = validate(list(deduped.kept), max_tokens)
    counts = _Counts(rows=len(pairs),
                     exact=_count(deduped.exact_dupes) + (stats.exact_dupes if stats else 0),
                     near=_count(deduped.near_dupes) + (stats.near_dupes if stats else 0),
                     invalid=len(invalid) + (stats.invalid if stats else 0))
    if not valid:
        raise ValueError(f"no usable examples left ({len(pairs)} in, {counts.exact + counts.near} "
                         f"duplicates, {len(invalid)} invalid)")
    return _store_dataset(state, ctx, valid, counts, source=source, label=label, gold=gold)


@dataclass
class _Counts:
    rows: int  # examples in
    exact: int
    near: int
    invalid: int


def _store_dataset(
    state: AgentState, ctx: AgentContext, valid: list[Any], counts: _Counts, *, source: str,
    label: str, gold: list[Any] | None = None, progress: Any = None, note: str = "",
) -> dict[str, Any]:
    """split -> store (bulk) -> upload train JSONL -> summary, for clean examples."""
    from agent.data import content_hash, split, store_dataset

    project_id = state["project_id"]
    seed = project_id
    gold_hashes = {content_hash(g) for g in gold or []}
    splits = split([p for p in valid if content_hash(p) not in gold_hashes], seed)
    splits["train"] = [p for p in valid if content_hash(p) in gold_hashes] + splits["train"]
    # examples the project already has (an overlapping file, a step re-run after a crash)
    # join this dataset with their old split, so the stored counts are the truth
    dataset = store_dataset(ctx.db, project_id, splits, source, seed, counts.exact + counts.near,
                            counts.invalid, adopt_existing=True)
    if progress is not None:
        progress.done(f"stored: {dataset.n_train:,} train / {dataset.n_val:,} val / "
                      f"{dataset.n_test:,} test")
    _upload_train(state, ctx, int(dataset.id))  # type: ignore[arg-type]
    ctx.notifier.say(
        state["thread_id"],
        f"{label}: {counts.rows} examples in, {counts.exact + counts.near} duplicates dropped "
        f"(exact {counts.exact}, near {counts.near}), "
        f"{counts.invalid} invalid dropped. Split: {dataset.n_train} train / "
        f"{dataset.n_val} val / {dataset.n_test} test.{note}",
    )
    set_project(ctx, project_id, status="ready")
    return {"dataset_id": dataset.id, "pending_import": None, "error": None}


def _upload_train(state: AgentState, ctx: AgentContext, dataset_id: int) -> None:
    from agent.data import load_split, to_jsonl
    from agent.spec import ExamplePair

    spec = state.get("spec") or {}
    train = [ExamplePair(prompt=e.prompt, response=e.response, reference=e.reference)
             for e in load_split(ctx.db, dataset_id, "train")]
    name = str(spec.get("name") or "dataset")
    body = to_jsonl(train, str(spec.get("system_prompt") or ""))
    ctx.notifier.upload(
        state["thread_id"], f"{name}-train.jsonl", body, title=f"{name} training set",
        comment=f"{len(train)} training examples",
    )


@guarded("generate", "review")
def generate(state: AgentState, runtime: Runtime[AgentContext]) -> Command:
    from agent.data import GenerationStats, generate_dataset
    from agent.spec import ExamplePair

    ctx = runtime.context
    spec = _spec(state)
    n = spec.example_count or ctx.settings.tuner_default_examples
    set_project(ctx, state["project_id"], status="generating")
    progress = _Throttle(ctx, state["thread_id"], ctx.progress_interval_s)
    progress(0, n)
    stats = GenerationStats()
    gold = [ExamplePair(**g) for g in state.get("gold_examples", [])]
    wanted = max(0, n - len(gold))  # the gold examples count toward n
    pairs = generate_dataset(
        ctx.llm, spec, generation_guidelines(state), wanted,
        concurrency=ctx.settings.tuner_generation_concurrency,
        project_id=state["project_id"], on_progress=progress, stats=stats,
    )
    if len(pairs) < wanted:
        ctx.notifier.say(state["thread_id"], f"Generation stopped at {len(pairs)} of {wanted} "
                         "unique examples (call cap reached); continuing with what we have.")
    update = _finish_dataset(state, ctx, [*gold, *pairs], "synthetic", "Dataset ready", stats,
                             gold=gold)
    return Command(goto="estimate", update=update)


@guarded("import_data", lambda state: state.get("return_to") or "retry_wait")
def import_data(state: AgentState, runtime: Runtime[AgentContext]) -> Command:
    """Store an upload the runner already prepared (agent/importing.py) as the dataset."""
    from agent.importing import ImportRefused

    ctx = runtime.context
    upload = state.get("pending_import") or {}
    filename = str(upload.get("filename") or "upload")
    progress = _upload_progress(ctx, state["thread_id"], upload)
    try:
        prepared = _prepared(state, upload, progress)
    except ImportRefused as exc:  # only the raw text of an older checkpoint gets here
        ctx.notifier.error(state["thread_id"], f"Couldn't import {filename}: {sentence(str(exc))}")
        return Command(goto=state.get("return_to") or "retry_wait",
                       update={"pending_import": None})
    counts = _Counts(prepared.rows, prepared.exact, prepared.near, prepared.invalid)
    comment = str(upload.get("comment") or "").strip()
    note = f" Your note with the file: “{comment[:300]}”" if comment else ""
    update = _store_dataset(state, ctx, prepared.examples, counts, source="import",
                            label=f"Imported {filename}", progress=progress, note=note)
    return Command(goto="estimate", update=update)


def _upload_progress(ctx: AgentContext, thread_id: str, upload: dict[str, Any]) -> Any:
    from agent.importing import ImportProgress

    p = upload.get("progress") or {}
    return ImportProgress(ctx.notifier, thread_id, str(p.get("key") or "import"),
                          str(p.get("title") or ""), bool(p.get("enabled")),
                          ctx.progress_interval_s, list(p.get("lines") or []))


def _prepared(state: AgentState, upload: dict[str, Any], progress: Any) -> Any:
    from agent.importing import PreparedImport, prepare_import

    if "examples" in upload:
        return PreparedImport.from_state(upload)
    max_tokens = int((state.get("spec") or {}).get("max_output_tokens") or DEFAULT_MAX_TOKENS)
    return prepare_import(str(upload.get("filename") or "upload"),
                          str(upload.get("content") or "").encode("utf-8"),
                          max_tokens=max_tokens, progress=progress)
