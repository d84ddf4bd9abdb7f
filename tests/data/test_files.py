"""Your own data files (edgetune/data/files.py, rows.py): formats, column mapping, chat rows, errors."""

from __future__ import annotations

import json

import pytest
from datasets import Dataset, DatasetDict

from edgetune.data.files import load_examples

QA = [
    {"question": "Alarm E-1 on press P-2?", "answer": "Procedure PR-100: reseat the sensor.", "plant": "a", "n": 3},
    {"question": "Alarm E-2 on press P-2?", "answer": "Procedure PR-101: bleed the line.", "plant": "b", "n": 4},
]
MAPPING = {"instruction": "question", "response": "answer"}


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_parquet_with_column_mapping_reads_every_row(tmp_path):
    """data.columns maps the file's own column names; other string columns are kept, numbers dropped."""
    path = tmp_path / "qa.parquet"
    Dataset.from_list(QA).to_parquet(str(path))
    rows = load_examples(path, columns=MAPPING)
    assert rows == [
        {"instruction": QA[0]["question"], "response": QA[0]["answer"], "plant": "a"},
        {"instruction": QA[1]["question"], "response": QA[1]["answer"], "plant": "b"},
    ]


def test_csv_json_and_save_to_disk_folders_read_the_same_examples(tmp_path):
    """CSV (numbers stay text), a JSON array, a saved Dataset and the train split of a saved DatasetDict
    give the same examples as parquet."""
    ds = Dataset.from_list([{**r, "answer": r["answer"]} for r in QA])
    ds.to_csv(str(tmp_path / "qa.csv"), index=False)
    (tmp_path / "qa.json").write_text(json.dumps(QA))
    ds.save_to_disk(str(tmp_path / "saved"))
    DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "saved-dict"))
    numbers = tmp_path / "numbers.csv"
    numbers.write_text("question,answer\nwhat is six times seven,42\n")

    expected = load_examples(_write_jsonl(tmp_path / "qa.jsonl", QA), columns=MAPPING)
    for name in ("qa.csv", "qa.json", "saved", "saved-dict"):
        got = load_examples(tmp_path / name, columns=MAPPING)
        assert [(r["instruction"], r["response"]) for r in got] == [
            (r["instruction"], r["response"]) for r in expected
        ], name
    assert load_examples(numbers, columns=MAPPING)[0]["response"] == "42"


def test_chat_messages_rows_in_sharegpt_spelling_and_as_csv_json(tmp_path):
    """messages rows keep the conversation (ShareGPT from/value normalised to role/content) and expose the
    last user and assistant turns; a CSV cell holding the JSON list works too."""
    chat = [
        {"conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]},
    ]
    rows = load_examples(_write_jsonl(tmp_path / "c.jsonl", chat), columns={"messages": "conversations"})
    assert rows[0]["messages"] == [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]
    assert (rows[0]["instruction"], rows[0]["response"]) == ("Hi?", "Hello.")
    csv = tmp_path / "c.csv"
    Dataset.from_list(
        [{"messages": json.dumps([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])}]
    ).to_csv(str(csv), index=False)
    assert load_examples(csv)[0]["response"] == "b"


@pytest.mark.parametrize(
    ("rows", "columns", "expected"),
    [
        (
            [
                {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
                {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]},
            ],
            None,
            r"bad.jsonl:2: column 'messages' has no assistant turn \(roles: system, user\)",
        ),
        (
            [{"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}],
            None,
            r"bad.jsonl:1: column 'messages', message 1: role 'bot' is not system, user or assistant",
        ),
        (
            [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]}],
            None,
            r"bad.jsonl:1: column 'messages', message 1: empty assistant turn",
        ),
        (
            [{"question": "q", "answer": "a"}, {"question": "q"}],
            MAPPING,
            r"bad.jsonl:2: has no 'answer' column \(data.columns maps response to it\)",
        ),
        ([{"question": "q", "answer": 3}], MAPPING, r"bad.jsonl:1: column 'answer' must be a string, got int"),
        ([{"prompt": "q", "completion": "a"}], None, r"bad.jsonl:1: needs .*'prompt', 'completion'.*data.columns"),
    ],
)
def test_bad_jsonl_rows_name_file_line_and_column(tmp_path, rows, columns, expected):
    """Each bad row fails at load time, naming file:line, the column and what is wrong."""
    with pytest.raises(ValueError, match=expected):
        load_examples(_write_jsonl(tmp_path / "bad.jsonl", rows), columns=columns)


def test_bad_table_rows_and_columns_name_file_row_and_column(tmp_path):
    """A mapped column the table lacks is named with the table's own columns; a bad cell names the
    1-based row and its column; a table with none of the forms says how to map it."""
    path = tmp_path / "qa.parquet"
    Dataset.from_list(QA).to_parquet(str(path))
    with pytest.raises(
        ValueError,
        match=r"maps response to 'reply', but .*qa.parquet has no column 'reply' \(its columns: question, answer",
    ):
        load_examples(path, columns={"instruction": "question", "response": "reply"})
    with pytest.raises(
        ValueError, match=r"qa.parquet has none of the columns .*its columns: question, answer, plant, n"
    ):
        load_examples(path)
    empty_answer = tmp_path / "empty.parquet"
    Dataset.from_list([QA[0], {**QA[1], "answer": ""}]).to_parquet(str(empty_answer))
    with pytest.raises(ValueError, match=r"empty.parquet row 2: column 'answer': empty response"):
        load_examples(empty_answer, columns=MAPPING)
    with pytest.raises(ValueError, match="does not exist"):
        load_examples(tmp_path / "nope.parquet")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"unknown data format '.txt'"):
        load_examples(tmp_path / "notes.txt")
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="not one written by datasets' save_to_disk"):
        load_examples(tmp_path / "folder")
