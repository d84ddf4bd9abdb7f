"""Tests for JSONL loading and atomic writing (edgetune/data/jsonl.py)."""

from __future__ import annotations

import json

import pytest

from edgetune.data.jsonl import load_jsonl, write_jsonl


def _write_lines(path, lines: list[str]) -> None:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_round_trip_keeps_string_fields_and_reads_text_rows(tmp_path):
    """write_jsonl then load_jsonl returns the rows; text rows become (\"\", text); non-strings drop."""
    # Prepare
    path = tmp_path / "site.jsonl"
    rows = [
        {"instruction": "Alarm E-1?", "response": "Procedure PR-100: x and y.", "site": "site-0"},
        {"text": "Pressen sind gefährlich — 注意", "id": 17, "source": "manual"},
    ]
    # Execute
    write_jsonl(path, rows)
    loaded = load_jsonl(path)
    # Assert
    assert loaded == [
        rows[0],
        {"instruction": "", "response": "Pressen sind gefährlich — 注意", "source": "manual"},
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["site.jsonl"]  # no temp file left behind


def test_blank_lines_and_bom_are_tolerated(tmp_path):
    """Blank lines are skipped and a UTF-8 BOM on line 1 is not an error."""
    # Prepare
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "a"}\n\n   \n{"text": "b"}\n')
    # Execute
    rows = load_jsonl(path)
    # Assert
    assert [r["response"] for r in rows] == ["a", "b"]


@pytest.mark.parametrize(
    ("bad_line", "reason"),
    [
        ('{"instruction": "q", "response": ', "invalid JSON"),
        ('["q", "a"]', "expected a JSON object"),
        ('{"instruction": "q"}', "no 'response'"),
        ('{"response": "a"}', "no 'instruction'"),
        ('{"instruction": "q", "response": 3}', "'response' must be a string"),
        ('{"text": "a", "site": 4}', "'site' must be a string"),
        ('{"text": "a", "instruction": "q", "response": "a"}', "both"),
        ('{"instruction": "q", "response": "  "}', "empty response"),
        ('{"text": ""}', "empty text"),
        ('{"prompt": "q", "completion": "a"}', "needs 'instruction' and 'response', or 'text'"),
    ],
)
def test_bad_line_is_reported_with_file_and_line_number(tmp_path, bad_line, reason):
    """A malformed row fails at load time, naming path:line and what is wrong."""
    # Prepare
    path = tmp_path / "bad.jsonl"
    _write_lines(path, ['{"text": "ok"}', "", bad_line, '{"text": "ok"}'])
    # Execute / Assert
    with pytest.raises(ValueError, match=f"bad.jsonl:3: .*{reason}"):
        load_jsonl(path)


def test_non_utf8_line_is_reported(tmp_path):
    """Bytes that are not UTF-8 fail with the line number."""
    # Prepare
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    # Execute / Assert
    with pytest.raises(ValueError, match="latin1.jsonl:2: not UTF-8"):
        load_jsonl(path)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file_is_an_error(tmp_path, content):
    """A file without a single example is rejected, naming the file."""
    # Prepare
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    # Execute / Assert
    with pytest.raises(ValueError, match="empty.jsonl: no examples"):
        load_jsonl(path)


def test_file_larger_than_max_bytes_is_rejected_before_parsing(tmp_path):
    """The size cap applies before any line is read."""
    # Prepare
    path = tmp_path / "big.jsonl"
    _write_lines(path, ['{"text": "0123456789"}'] * 10)
    # Execute / Assert
    with pytest.raises(ValueError, match="more than max_bytes=100"):
        load_jsonl(path, max_bytes=100)
    assert len(load_jsonl(path, max_bytes=10_000)) == 10


def test_failed_write_leaves_previous_file_intact(tmp_path):
    """A write that fails midway keeps the old file and leaves no temp file."""
    # Prepare
    path = tmp_path / "data.jsonl"
    write_jsonl(path, [{"text": "old"}])
    before = path.read_bytes()
    # Execute
    with pytest.raises(TypeError):
        write_jsonl(path, [{"text": "new"}, {"text": object()}])
    # Assert
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["data.jsonl"]
    assert json.loads(before) == {"text": "old"}


# --- issue 13: input the parser accepts but nothing downstream can use -------------------------------------------


def test_deep_nesting_is_a_clear_error_not_a_recursion_error(tmp_path):
    """A line nested 100,000 deep fails with the file and line, as a ValueError (not RecursionError)."""
    path = tmp_path / "site.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "x", "meta": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    with pytest.raises(ValueError, match=f"{path}:2: JSON nested too deeply"):
        load_jsonl(path)


@pytest.mark.parametrize(
    "line",
    [
        r'{"instruction": "Alarm \ud800?", "response": "PR-1"}',
        r'{"text": "ok \udfff"}',
        r'{"text": "ok", "site": "\udc80"}',
        r'{"text": "ok", "\ud800": "key"}',
    ],
)
def test_a_lone_surrogate_is_refused_at_load_with_the_line(tmp_path, line):
    """A lone surrogate escape parses as JSON but cannot be encoded (the tokenizer fails later, on the site):
    refused at load naming the file, the line and the field. A proper surrogate pair is text and loads."""
    path = tmp_path / "site.jsonl"
    _write_lines(path, ['{"text": "fine \\ud83d\\ude00"}', line])
    with pytest.raises(ValueError, match=f"{path}:2: field .* lone surrogate U\\+D[89A-F]"):
        load_jsonl(path)
    _write_lines(path, ['{"text": "fine \\ud83d\\ude00"}'])
    assert load_jsonl(path)[0]["response"] == "fine \U0001f600"
