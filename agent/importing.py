"""An uploaded file -> examples ready to store: decode, parse, validate, dedup, with progress.

Why it runs before the graph is touched: a file that can't be used is refused here, so
the card or question the thread waits on stays pending as it was (no re-posted question,
issue 14), and the heavy work (a 20 MB file) holds no thread lock. Big files show one
progress message, edited in place through Notifier.progress, stage by stage; the graph's
import step adds the last stage ("stored") to the same message.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from agent.ports import Notifier
from agent.spec import ExamplePair

__all__ = ["BIG_IMPORT_BYTES", "ImportProgress", "ImportRefused", "PreparedImport",
           "prepare_import", "progress_key"]

BIG_IMPORT_BYTES = 1_000_000  # files from this size on get a progress message
_MAX_REASONS = 3


class ImportRefused(ValueError):
    """The file can't be imported; str() is the reason in plain words (one sentence or more)."""


@dataclass
class PreparedImport:
    """What an upload yields: valid, unique examples in file order, and what was dropped."""

    filename: str
    examples: list[ExamplePair]
    rows: int  # parsed rows
    invalid: int
    exact: int
    near: int

    @property
    def dupes(self) -> int:
        return self.exact + self.near

    def to_state(self) -> dict[str, Any]:
        """Compact, checkpoint-friendly form (lists, not objects)."""
        return {"filename": self.filename,
                "examples": [[p.prompt, p.response, p.reference] for p in self.examples],
                "stats": {"rows": self.rows, "invalid": self.invalid, "exact": self.exact,
                          "near": self.near}}

    @classmethod
    def from_state(cls, value: dict[str, Any]) -> PreparedImport:
        stats = value.get("stats") or {}
        examples = [ExamplePair(prompt=p, response=r, reference=ref)
                    for p, r, ref in value.get("examples") or []]
        return cls(filename=str(value.get("filename") or "upload"), examples=examples,
                   rows=int(stats.get("rows", len(examples))),
                   invalid=int(stats.get("invalid", 0)), exact=int(stats.get("exact", 0)),
                   near=int(stats.get("near", 0)))


def progress_key(upload_id: str, content: bytes) -> str:
    """The progress message's key: one message per upload (Slack file id, else content)."""
    return "import:" + (upload_id or hashlib.sha256(content).hexdigest()[:16])


@dataclass
class ImportProgress:
    """One message per upload: finished stages as lines, plus the stage in flight.

    Silent for small files (`enabled` False): their summary follows within a second.
    """

    notifier: Notifier
    thread_id: str
    key: str
    title: str
    enabled: bool = True
    interval_s: float = 2.0
    lines: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._last = 0.0
        self._lock = threading.Lock()

    @classmethod
    def for_upload(cls, notifier: Notifier, thread_id: str, filename: str, content: bytes,
                   *, upload_id: str = "", interval_s: float = 2.0) -> ImportProgress:
        size = f"{len(content) / 1_000_000:.1f} MB"
        return cls(notifier, thread_id, progress_key(upload_id, content),
                   f"Importing {filename} ({size})", len(content) >= BIG_IMPORT_BYTES,
                   interval_s)

    def done(self, line: str) -> None:
        """A finished stage: always shown."""
        self.lines.append(f"✓ {line}")
        self._show(None, force=True)

    def working(self, line: str) -> None:
        """The stage in flight (throttled to one edit per `interval_s`)."""
        self._show(f"… {line}", force=False)

    def failed(self, line: str) -> None:
        self.lines.append(f"✗ {line}")
        self._show(None, force=True)

    def _show(self, current: str | None, *, force: bool) -> None:
        if not self.enabled:
            return
        with self._lock:
            now = time.monotonic()
            if not force and now - self._last < self.interval_s:
                return
            self._last = now
            text = "\n".join([self.title, *self.lines, *([current] if current else [])])
            self.notifier.progress(self.thread_id, self.key, text)


def prepare_import(filename: str, content: bytes, *, max_tokens: int,
                   progress: ImportProgress) -> PreparedImport:
    """Decode (UTF-8 only), parse, validate and dedup an upload; ImportRefused says why not."""
    from agent.data import parse_import

    progress.working("reading")
    try:
        pairs = parse_import(filename, content)
    except ValueError as exc:
        progress.failed("not imported (see below)")
        raise ImportRefused(str(exc)) from None
    progress.done(f"parsed {len(pairs):,} rows")
    valid, reasons = _validated(pairs, max_tokens, progress)
    if not valid:
        progress.failed("not imported (see below)")
        raise ImportRefused(_nothing_usable(filename, len(pairs), reasons))
    return _deduplicated(filename, pairs, valid, len(reasons), progress)


def _validated(pairs: list[ExamplePair], max_tokens: int,
               progress: ImportProgress) -> tuple[list[ExamplePair], list[str]]:
    from agent.data import validate

    valid, invalid = validate(pairs, max_tokens)
    progress.done(f"validated: {len(valid):,} usable, {len(invalid):,} invalid")
    return valid, [reason for _, reason in invalid]


def _deduplicated(filename: str, pairs: list[ExamplePair], valid: list[ExamplePair],
                  invalid: int, progress: ImportProgress) -> PreparedImport:
    from agent.dedup import dedup

    res = dedup(valid, on_progress=lambda done, total: progress.working(
        f"deduplicating {done:,}/{total:,}"))
    exact, near = len(res.exact_dupes), len(res.near_dupes)
    progress.done(f"deduplicated: {len(res.kept):,} unique ({exact:,} exact and {near:,} "
                  "near duplicates dropped)")
    return PreparedImport(filename, res.kept, len(pairs), invalid, exact, near)


def _nothing_usable(filename: str, rows: int, reasons: list[str]) -> str:
    shown = "; ".join(list(dict.fromkeys(reasons))[:_MAX_REASONS])  # distinct reasons
    return f"{filename}: none of its {rows:,} rows is usable ({shown})."
