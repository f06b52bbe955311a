"""Dataset files: both formats, both row shapes, and errors that name the row and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.training import datasets
from services.training.datasets import DatasetError


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_jsonl_alpaca_and_chat_rows_become_conversations(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "d.jsonl",
        '{"instruction": "Add", "input": "1 1", "output": "2"}\n\n'
        '{"messages": [{"role": "system", "content": "terse"}, {"role": "user", "content": "hi"},'
        ' {"role": "assistant", "content": "yo"}]}\n',
    )
    rows = datasets.load(path)
    assert [r.row for r in rows] == [1, 3]  # JSONL rows are numbered by line, blank lines skipped
    assert rows[0].messages == [{"role": "user", "content": "Add\n\n1 1"}, {"role": "assistant", "content": "2"}]
    assert rows[1].messages[0] == {"role": "system", "content": "terse"}


def test_a_json_array_is_a_dataset(tmp_path: Path) -> None:
    path = write(tmp_path, "d.json", '[{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}]')
    assert len(datasets.load(path)) == 2


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("d.txt", "x", "must end in .json or .jsonl"),
        ("d.json", '{"instruction": "a"}', "must be an array of rows"),
        ("d.json", "[]", "the dataset has no rows"),
        ("d.jsonl", "\n\n", "the dataset has no rows"),
        ("d.json", "[1", "not valid JSON"),
        ("d.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "a" "output"}', "row 2: not valid JSON"),
        ("d.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "a"}', "row 2, field `output`: is missing"),
        ("d.json", '[{"instruction": "a", "output": 3}]', "row 1, field `output`: must be a string, not a number"),
        ("d.json", '[{"instruction": " ", "output": "x"}]', "row 1, field `instruction`: must not be empty"),
        ("d.json", '[{"instruction": "a", "output": "b", "input": 1}]', "row 1, field `input`: must be a string"),
        ("d.json", '[{"prompt": "a", "completion": "b"}]', "row 1: expected Alpaca fields"),
        ("d.json", '["text"]', "row 1: must be an object, not a string"),
        ("d.json", '[{"messages": []}]', "row 1, field `messages`: must be a non-empty array"),
        (
            "d.json",
            '[{"messages": [{"role": "robot", "content": "x"}]}]',
            "row 1, field `messages[0].role`: 'robot' is not one of",
        ),
        (
            "d.json",
            '[{"messages": [{"role": "user", "content": "x"}]}]',
            "row 1, field `messages`: has no assistant message",
        ),
        (
            "d.json",
            '[{"messages": [{"role": "user", "content": "x"}, {"role": "assistant"}]}]',
            "row 1, field `messages[1].content`: is missing",
        ),
    ],
)
def test_a_bad_dataset_is_refused_with_a_message_naming_row_and_field(
    tmp_path: Path, name: str, text: str, expected: str
) -> None:
    with pytest.raises(DatasetError) as info:
        datasets.load(write(tmp_path, name, text))
    assert expected in info.value.body.message
    assert info.value.status == 400 and info.value.body.details[0].type == "invalid_dataset"


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        datasets.load(tmp_path / "nope.jsonl")
