"""Exact and near-duplicate filtering that stays near-linear on real files.

Why this shape: in catalog-style data every row carries the same boilerplate, so unrelated
rows sit at word 3-gram Jaccard ~0.5. Plain MinHash LSH then makes almost every kept row a
candidate of every new row and an unbounded candidate scan turns quadratic (issue 14: a
20 MB catalog file produced no answer after 6 minutes). Here each row costs a bounded
amount of work whatever the data looks like:

1. exact duplicates by hash of the normalized text, first (O(1));
2. MinHash LSH (24 bands x 4 rows of a 96-value signature) proposes candidates, reading
   at most `BUCKET_SCAN` of the most recent members of each band bucket;
3. candidates are ranked by the signature's own Jaccard estimate; only those within
   `ESTIMATE_MARGIN` of the threshold, at most `MAX_VERIFY` of them, get the exact
   Jaccard check (all at once, vectorized), which alone decides "near".

Shingles are word 3-grams hashed to 64 bits (a set of integers, not strings), so memory
stays ~1 KB per row. Everything is deterministic: fixed hash functions, fixed seeds.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from agent.spec import ExamplePair

__all__ = [
    "DedupIndex",
    "DedupResult",
    "content_hash",
    "dedup",
    "jaccard",
    "normalize",
    "shingles",
]

NUM_PERM = 96
BANDS = 24
ROWS = 4  # BANDS * ROWS = NUM_PERM; a pair at Jaccard 0.7 shares a band with p ~ 0.9986
BUCKET_SCAN = 16  # most recent members read per bucket (boilerplate buckets grow huge)
MAX_VERIFY = 16  # exact Jaccard checks per row, best estimates first
ESTIMATE_MARGIN = 0.1  # skip candidates whose estimate is this far below the threshold
_SHINGLE = 3

_WORD = re.compile(r"\w+", re.UNICODE)
_U64 = np.uint64
_MIX = (_U64(0x9E3779B97F4A7C15), _U64(0xC2B2AE3D27D4EB4F), _U64(0x165667B19E3779F9))
_rng = np.random.Generator(np.random.PCG64(14))
_PERM_A = _rng.integers(1, 2**63, NUM_PERM, dtype=np.uint64) * _U64(2) + _U64(1)  # odd
_PERM_B = _rng.integers(0, 2**63, NUM_PERM, dtype=np.uint64)
_EMPTY_SIG = np.full(NUM_PERM, 0xFFFFFFFF, dtype=np.uint32)
_NONE = np.empty(0, dtype=np.uint64)


def normalize(text: str) -> str:
    """Lower case, whitespace runs as one space, stripped (str.split's whitespace is
    exactly the regex \\s set, so this equals the older re.sub form: stored hashes hold)."""
    return " ".join(text.lower().split())


def content_hash(pair: ExamplePair) -> str:
    """Exact-duplicate key: sha256 of the normalized prompt and response."""
    key = normalize(pair.prompt) + "\x1f" + normalize(pair.response)
    return hashlib.sha256(key.encode()).hexdigest()


def shingles(text: str, k: int = _SHINGLE) -> set[str]:
    """Word k-grams as strings (the whole word list for texts shorter than k words).

    The index hashes the same k-grams (`shingle_hashes`); this readable form is for
    callers that want to look at them.
    """
    words = _WORD.findall(text.lower())
    if len(words) < k:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i : i + k]) for i in range(len(words) - k + 1)}


def jaccard(a: set[str], b: set[str]) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


class _WordHasher:
    """64-bit word hashes (blake2b), each word hashed once: a file's vocabulary is far
    smaller than its word count. Words map to vocabulary ids, ids to hashes (numpy)."""

    def __init__(self, max_vocab: int = 2_000_000) -> None:
        self._ids: dict[str, int] = {}
        self._hashes = np.empty(4096, dtype=np.uint64)
        self._max = max_vocab

    def __call__(self, words: list[str]) -> np.ndarray:
        if len(self._ids) > self._max:
            self._ids.clear()
        get = self._ids.get
        ids = [get(w, -1) for w in words]
        if -1 in ids:
            self._learn(words, ids)
        return self._hashes[np.array(ids, dtype=np.int64)]

    def _learn(self, words: list[str], ids: list[int]) -> None:
        """Give the new words of `words` ids (in place in `ids`) and hashes."""
        base, new = len(self._ids), list[bytes]()
        for k, w in enumerate(words):
            if ids[k] < 0:
                i = self._ids.get(w)
                if i is None:
                    i = self._ids[w] = base + len(new)
                    new.append(hashlib.blake2b(w.encode(), digest_size=8).digest())
                ids[k] = i
        while base + len(new) > len(self._hashes):
            self._hashes = np.concatenate([self._hashes, np.empty_like(self._hashes)])
        self._hashes[base : base + len(new)] = np.frombuffer(b"".join(new), dtype=np.uint64)


def _finalize(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer: spreads the combined word hashes over all 64 bits."""
    x = x ^ (x >> _U64(30))
    x = x * _U64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> _U64(27))
    x = x * _U64(0x94D049BB133111EB)
    return x ^ (x >> _U64(31))


def shingle_hashes(text: str, words_hash: _WordHasher) -> np.ndarray:
    """Sorted unique 64-bit hashes of the word 3-grams of `text` (same sets as `shingles`)."""
    words = _WORD.findall(text.lower())
    if not words:
        return np.empty(0, dtype=np.uint64)
    w = words_hash(words)
    if len(words) < _SHINGLE:  # the whole (short) word list is the one shingle
        acc = np.zeros(1, dtype=np.uint64)
        for i, h in enumerate(w):
            acc = acc * _MIX[i % 3] + h
        return _finalize(acc)
    n = len(words) - _SHINGLE + 1
    combined = w[:n] * _MIX[0] + w[1 : n + 1] * _MIX[1] + w[2 : n + 2] * _MIX[2]
    return np.unique(_finalize(combined))


def signature(sh: np.ndarray) -> np.ndarray:
    """96 MinHash values (multiply-shift hash functions over the 64-bit shingle hashes)."""
    if sh.size == 0:
        return _EMPTY_SIG
    h = (sh[:, None] * _PERM_A[None, :] + _PERM_B[None, :]) >> _U64(32)
    return h.min(axis=0).astype(np.uint32)


def signatures(shs: list[np.ndarray], chunk: int = 128) -> np.ndarray:
    """`signature` of many shingle sets, `chunk` rows per numpy pass (one row per set)."""
    out = np.empty((len(shs), NUM_PERM), dtype=np.uint32)
    out[:] = _EMPTY_SIG
    for lo in range(0, len(shs), chunk):
        rows = [i for i in range(lo, min(lo + chunk, len(shs))) if shs[i].size]
        if not rows:
            continue
        flat = np.concatenate([shs[i] for i in rows])
        starts = np.cumsum([0] + [shs[i].size for i in rows[:-1]])
        h = (flat[:, None] * _PERM_A[None, :] + _PERM_B[None, :]) >> _U64(32)
        out[rows] = np.minimum.reduceat(h, starts, axis=0).astype(np.uint32)
    return out


class DedupIndex:
    """Incremental exact + near-duplicate filter: bounded work per row (see module doc)."""

    def __init__(self, threshold: float = 0.7) -> None:
        self.threshold = threshold
        self.hashes: set[str] = set()
        self.verified = 0  # exact Jaccard checks done, in total
        self.max_verified = 0  # ... and the most for one row
        self._words = _WordHasher()
        self._sh: list[np.ndarray] = []
        self._sizes = np.empty(1024, dtype=np.int64)
        self._sig = np.empty((1024, NUM_PERM), dtype=np.uint32)
        self._buckets: dict[bytes, list[int]] = {}  # band number + band values -> rows

    def __len__(self) -> int:
        return len(self._sh)

    def check(self, pair: ExamplePair) -> str | None:
        """None if new, else "exact" or "near"; new items are added."""
        h = content_hash(pair)
        if h in self.hashes:
            return "exact"
        sh = shingle_hashes(pair.prompt + "\n" + pair.response, self._words)
        return self._check_hashed(h, sh, signature(sh))

    def check_many(self, pairs: list[ExamplePair], batch: int = 1024) -> Iterator[str | None]:
        """`check` for each pair in order; shingles and signatures computed `batch` at a time."""
        for lo in range(0, len(pairs), batch):
            part = pairs[lo : lo + batch]
            hashes = [content_hash(p) for p in part]
            shs = [shingle_hashes(p.prompt + "\n" + p.response, self._words)
                   if h not in self.hashes else _NONE for p, h in zip(part, hashes)]
            sigs = signatures(shs)
            for h, sh, sig in zip(hashes, shs, sigs):
                yield "exact" if h in self.hashes else self._check_hashed(h, sh, sig)

    def _check_hashed(self, h: str, sh: np.ndarray, sig: np.ndarray) -> str | None:
        keys = _band_keys(sig)
        if self._is_near(sh, sig, keys):
            return "near"
        self.hashes.add(h)
        self._add(sh, sig, keys)
        return None

    def add(self, pair: ExamplePair) -> bool:
        return self.check(pair) is None

    # ---- internals ------------------------------------------------------------------

    def _candidates(self, keys: list[bytes]) -> np.ndarray:
        seen: set[int] = set()
        get = self._buckets.get
        for key in keys:
            members = get(key)
            if members:
                seen.update(members[-BUCKET_SCAN:])
        return np.fromiter(seen, dtype=np.int64, count=len(seen))

    def _is_near(self, sh: np.ndarray, sig: np.ndarray, keys: list[bytes]) -> bool:
        ids = self._candidates(keys)
        if ids.size == 0:
            return False
        estimate = np.count_nonzero(self._sig[ids] == sig, axis=1) / NUM_PERM
        plausible = estimate >= self.threshold - ESTIMATE_MARGIN
        ids, estimate = ids[plausible], estimate[plausible]
        sizes = self._sizes[ids]
        lo, hi = np.minimum(sizes, sh.size), np.maximum(sizes, sh.size)
        fits = (hi == 0) | (lo >= self.threshold * hi)  # Jaccard <= smaller / larger set
        ids, estimate = ids[fits], estimate[fits]
        if ids.size == 0:
            return False
        best = ids[np.argsort(-estimate, kind="stable")[:MAX_VERIFY]]
        self.verified += int(best.size)
        self.max_verified = max(self.max_verified, int(best.size))
        return bool((self._jaccards(sh, best) >= self.threshold).any())

    def _jaccards(self, sh: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Exact Jaccard of `sh` with each candidate's shingle set, in one vectorized pass."""
        others = [self._sh[i] for i in ids.tolist()]
        lens = np.asarray([o.size for o in others], dtype=np.int64)
        inter = np.zeros(len(others), dtype=np.int64)
        if sh.size and lens.sum():
            flat = np.concatenate(others)
            pos = np.minimum(np.searchsorted(sh, flat), sh.size - 1)
            hit = (sh[pos] == flat).astype(np.int64)
            starts = np.concatenate(([0], np.cumsum(lens)[:-1]))
            nonempty = lens > 0
            inter[nonempty] = np.add.reduceat(hit, starts[nonempty])
        union = lens + sh.size - inter
        return np.where(union == 0, 1.0, inter / np.maximum(union, 1))

    def _add(self, sh: np.ndarray, sig: np.ndarray, keys: list[bytes]) -> None:
        idx = len(self._sh)
        if idx == len(self._sig):
            self._sig = np.concatenate([self._sig, np.empty_like(self._sig)])
            self._sizes = np.concatenate([self._sizes, np.empty_like(self._sizes)])
        self._sig[idx] = sig
        self._sizes[idx] = sh.size
        self._sh.append(sh)
        new = self._buckets.setdefault
        for key in keys:
            new(key, []).append(idx)


_BAND_PREFIX = [bytes([band]) for band in range(BANDS)]


def _band_keys(sig: np.ndarray) -> list[bytes]:
    """One bucket key per band: the band's number, then its ROWS signature values."""
    raw = sig.tobytes()
    step = ROWS * 4
    return [p + raw[i * step : (i + 1) * step] for i, p in enumerate(_BAND_PREFIX)]


@dataclass
class DedupResult:
    kept: list[ExamplePair] = field(default_factory=list)
    exact_dupes: list[ExamplePair] = field(default_factory=list)
    near_dupes: list[ExamplePair] = field(default_factory=list)

    @property
    def dropped(self) -> int:
        return len(self.exact_dupes) + len(self.near_dupes)


def dedup(
    pairs: Iterable[ExamplePair],
    threshold: float = 0.7,
    *,
    index: DedupIndex | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> DedupResult:
    """Keep the first of each group of exact (normalized) or near (Jaccard>=threshold on
    word 3-gram shingles of prompt+response) duplicates.

    `on_progress(done, total)` is called every few thousand rows and at the end.
    """
    items = list(pairs)
    index = index if index is not None else DedupIndex(threshold)
    res = DedupResult()
    buckets = {None: res.kept, "exact": res.exact_dupes, "near": res.near_dupes}
    for i, (p, kind) in enumerate(zip(items, index.check_many(items)), start=1):
        buckets[kind].append(p)
        if on_progress is not None and (i % 5000 == 0 or i == len(items)):
            on_progress(i, len(items))
    return res
