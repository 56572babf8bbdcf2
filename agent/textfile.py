"""Uploaded text files: strict UTF-8 decoding and the CSV dialects spreadsheets write.

Why strict: decoding with errors="replace" turned a Windows-1252 CSV into training data
full of U+FFFD without a word (issue 14). A file is UTF-8 (a BOM is fine) or it is refused
with where the first bad byte is and which legacy encoding the file looks like, so the
user can re-save it; nothing is ever guessed into stored data.

Why the dialect sniffing: Excel writes a BOM, CRLF line ends, quoted multi-line cells, and
in many European locales `;` instead of `,` (sometimes announced by a first `sep=;` line).
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass

__all__ = ["CsvDialect", "TextFileError", "decode_text", "guess_legacy_encoding", "sniff_csv"]

_UTF16_HINT = "UTF-16 (what Excel saves as “Unicode Text”)"
_CP1252_HINT = "Windows-1252 (what Excel on Windows saves as “CSV (Comma delimited)”)"
_MAC_HINT = "Mac Roman (what older Excel for Mac saves as “CSV”)"
_LATIN1_HINT = "ISO-8859-1 (Latin-1)"
_HOW_TO_FIX = ("Save it as UTF-8 (in Excel: Save As › “CSV UTF-8 (Comma delimited)”; in "
               "most editors: Save with Encoding › UTF-8) and upload it again")


class TextFileError(ValueError):
    """The upload can't be read as text; the message says why and how to fix it."""


@dataclass(frozen=True)
class _Spot:
    offset: int  # byte offset in the file
    line: int  # 1-based
    column: int  # byte offset within the line, 1-based


def _spot(content: bytes, offset: int) -> _Spot:
    line_start = content.rfind(b"\n", 0, offset) + 1
    return _Spot(offset, content.count(b"\n", 0, offset) + 1, offset - line_start + 1)


def decode_text(filename: str, content: bytes) -> str:
    """The text of a UTF-8 upload (BOM dropped); TextFileError for anything else."""
    if content.startswith((b"\xff\xfe", b"\xfe\xff")) or _looks_utf16(content):
        raise TextFileError(f"{filename} is not UTF-8: it looks like {_UTF16_HINT}. "
                            f"{_HOW_TO_FIX}.")
    try:
        text = content.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise TextFileError(_not_utf8(filename, content, e)) from None
    nul = text.find("\x00")
    if nul >= 0:
        where = _spot(content, content.find(b"\x00"))
        raise TextFileError(f"{filename} has a NUL byte on line {where.line} (byte "
                            f"{where.offset} of the file), so it is not a text file. "
                            f"{_HOW_TO_FIX}.")
    return text


def _looks_utf16(content: bytes) -> bool:
    """BOM-less UTF-16 of mostly-ASCII text: every other byte is NUL."""
    head = content[:4096]
    if len(head) < 8:
        return False
    odd, even = head[1::2].count(0), head[0::2].count(0)
    return max(odd, even) >= len(head) // 2 * 0.6 and min(odd, even) < len(head) // 2 * 0.1


def _not_utf8(filename: str, content: bytes, e: UnicodeDecodeError) -> str:
    where = _spot(content, e.start)
    if e.reason == "unexpected end of data":  # valid UTF-8 up to a cut-off last character
        return (f"{filename} ends in the middle of a character (line {where.line}, byte "
                f"{where.offset} of the file): it looks cut off. Upload it again.")
    bad = content[e.start : e.start + 1].hex().upper()
    guess = guess_legacy_encoding(content)
    msg = (f"{filename} is not UTF-8: byte 0x{bad} on line {where.line} (column "
           f"{where.column}, byte {where.offset} of the file) is not valid UTF-8")
    if guess is not None:
        name, codec = guess
        msg += f"{_preview(content, where, codec)}. It looks like {name}"
    return f"{msg}. {_HOW_TO_FIX}."


def _preview(content: bytes, where: _Spot, codec: str) -> str:
    """The words around the bad byte, read in the guessed encoding: shows the user which."""
    start = max(content.rfind(b"\n", 0, where.offset) + 1, where.offset - 24)
    end = content.find(b"\n", where.offset)
    end = min(end if end >= 0 else len(content), where.offset + 24)
    snippet = content[start:end].decode(codec, errors="replace").strip()
    snippet = re.sub(r"[\x00-\x1f`“”]", " ", snippet)
    return f" (near “{snippet}”)" if snippet else ""


def guess_legacy_encoding(content: bytes) -> tuple[str, str] | None:
    """(what to call it, codec) for the legacy encoding a non-UTF-8 file looks like."""
    if content.startswith((b"\xff\xfe", b"\xfe\xff")) or _looks_utf16(content):
        return _UTF16_HINT, "utf-16"
    high = [b for b in content if b >= 0x80]
    if not high:
        return None
    scores = {codec: _plausibility(content, codec) for codec in ("cp1252", "mac_roman")}
    if scores["cp1252"] is None and scores["mac_roman"] is None:
        return _LATIN1_HINT, "latin-1"
    best = max((c for c in scores if scores[c] is not None), key=lambda c: scores[c] or 0)
    return (_MAC_HINT, "mac_roman") if best == "mac_roman" else (_CP1252_HINT, "cp1252")


def _plausibility(content: bytes, codec: str) -> int | None:
    """How natural the non-ASCII letters read in `codec` (letters whose case matches the
    letters around them score, others cost); None when `codec` can't decode the bytes."""
    try:
        text = content[:200_000].decode(codec)
    except UnicodeDecodeError:
        return None
    score = 0
    for m in re.finditer(r"(?<=[A-Za-z])[^\x00-\x7f](?=[A-Za-z])|(?<= )[^\x00-\x7f](?=[a-z])",
                         text):
        c, after = m.group(), text[m.end()]
        score += 1 if c.isalpha() and (c.islower() == after.islower()) else -1
    return score


# ---------------------------------------------------------------------------- CSV dialects

_DELIMITERS = (",", ";", "\t", "|")
_SEP_LINE = re.compile(r"^sep=(.)\r?\n", re.IGNORECASE)


@dataclass(frozen=True)
class CsvDialect:
    delimiter: str
    skip_lines: int  # 1 when the file starts with Excel's `sep=;` line


def sniff_csv(text: str, wanted: tuple[set[str], set[str]], *, tsv: bool = False) -> CsvDialect:
    """The delimiter whose header names a prompt and a response column (`wanted` holds the
    accepted names of each); else the one splitting the header into the most columns."""
    m = _SEP_LINE.match(text)
    if m:
        return CsvDialect(m.group(1), 1)
    if tsv:
        return CsvDialect("\t", 0)
    first = text.split("\n", 1)[0]
    best, best_cols = ",", 0
    for d in _DELIMITERS:
        try:
            header = next(csv.reader(io.StringIO(first), delimiter=d), [])
        except csv.Error:
            continue
        names = {h.strip().lower() for h in header}
        if names & wanted[0] and names & wanted[1]:
            return CsvDialect(d, 0)
        if len(header) > best_cols:
            best, best_cols = d, len(header)
    return CsvDialect(best, 0)
