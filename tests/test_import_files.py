"""Real-world upload files (generated here, never stored): encodings and spreadsheet CSV.

Nothing is ever decoded with replacement characters: a file that is not UTF-8 is refused
with where the bad byte is and what encoding it looks like.
"""

from __future__ import annotations

import json

import pytest

from agent.data import parse_import

CITIES = [("São Paulo", "Brésil"), ("Zürich", "Suisse"), ("Kraków", "Pologne"),
          ("Málaga", "España"), ("Besançon", "France"), ("Tromsø", "Norge")]


def _csv_text(delim: str = ",", eol: str = "\n") -> str:
    rows = ["prompt" + delim + "response"]
    rows += [f"Where is {city}?{delim}In {country}." for city, country in CITIES]
    return eol.join(rows) + eol


def test_cp1252_csv_is_refused_with_line_byte_and_hint() -> None:
    content = _csv_text().encode("cp1252")
    with pytest.raises(ValueError) as e:
        parse_import("cities.csv", content)
    msg = str(e.value)
    first_bad = next(i for i, b in enumerate(content) if b >= 0x80)
    line = content.count(b"\n", 0, first_bad) + 1
    assert f"line {line}" in msg and f"byte {first_bad} of the file" in msg
    assert "0xE3" in msg  # ã in Windows-1252
    assert "Windows-1252" in msg and "Excel" in msg
    assert "São Paulo" in msg  # the preview, read in the encoding it looks like
    assert "Save it as UTF-8" in msg and "\ufffd" not in msg
    assert msg.endswith(".") and ".." not in msg


def test_mac_roman_and_utf16_are_named() -> None:
    from agent.textfile import TextFileError, decode_text, guess_legacy_encoding

    mac = _csv_text().encode("mac_roman")
    assert guess_legacy_encoding(mac)[1] == "mac_roman"
    with pytest.raises(TextFileError, match="Mac Roman"):
        decode_text("cities.csv", mac)
    utf16 = _csv_text(delim="\t").encode("utf-16")  # BOM + LE: Excel "Unicode Text"
    with pytest.raises(TextFileError, match="UTF-16"):
        decode_text("cities.txt", utf16)
    bomless = _csv_text().encode("utf-16-le")
    with pytest.raises(TextFileError, match="UTF-16"):
        parse_import("cities.csv", bomless)


def test_nul_bytes_are_refused_even_when_valid_utf8() -> None:
    with pytest.raises(ValueError, match="NUL byte on line 2"):
        parse_import("x.jsonl", b'{"prompt": "a", "response": "b"}\n{"pro\x00mpt"}\n')


def test_excel_semicolon_csv_with_bom_crlf_and_multiline_cells_imports_intact() -> None:
    rows = [["prompt", "response", "reference"],
            ['Résumé: "Grand café", Paris; 3 étoiles', "Hôtel 3★; très bien\nparking", ""],
            ["Ligne 2 ; avec ; points-virgules", "Réponse\navec\nsauts", "réf"]]

    def cell(c: str) -> str:
        return '"' + c.replace('"', '""') + '"' if any(x in c for x in ';"\n') else c

    body = "\r\n".join(";".join(cell(c) for c in r) for r in rows) + "\r\n"
    for text in (body, "sep=;\r\n" + body):
        got = parse_import("export.csv", ("\ufeff" + text).encode("utf-8"))
        assert [(p.prompt, p.response, p.reference) for p in got] == [
            ('Résumé: "Grand café", Paris; 3 étoiles', "Hôtel 3★; très bien\nparking", None),
            ("Ligne 2 ; avec ; points-virgules", "Réponse\navec\nsauts", "réf")]


def test_excel_padding_cells_and_unclosed_quote() -> None:
    got = parse_import("p.csv", b"prompt,response,,\r\nq,a,,\r\n")
    assert [(p.prompt, p.response) for p in got] == [("q", "a")]
    with pytest.raises(ValueError, match="line 3: .*quoted cell"):
        parse_import("p.csv", b'prompt,response\nq,a\n"never closed,a\nq2,a2\n')


def test_jsonl_line_separators_inside_strings_and_json_arrays() -> None:
    tricky = "first\u2028second\x85third"
    line = json.dumps({"prompt": tricky, "response": "ok"}, ensure_ascii=False)
    got = parse_import("u.jsonl", (line + "\r\n" + line.replace("ok", "ok2") + "\n").encode())
    assert [p.prompt for p in got] == [tricky, tricky]
    arr = json.dumps([{"input": "a", "output": "b"}, {"prompt": "c", "response": "d"}])
    assert [(p.prompt, p.response) for p in parse_import("a.json", arr.encode())] == [
        ("a", "b"), ("c", "d")]
    with pytest.raises(ValueError, match="item 2: empty response"):
        parse_import("a.json", b'[{"prompt": "a", "response": "b"}, {"prompt": "c", "response": ""}]')


def test_a_cut_off_utf8_file_is_not_called_a_legacy_encoding() -> None:
    content = '{"prompt": "café", "response": "ok"}\n{"prompt": "é'.encode()[:-1]
    with pytest.raises(ValueError, match="ends in the middle of a character .*cut off"):
        parse_import("cut.jsonl", content)
