"""Dataset files: both formats, both row shapes, and errors that name the row and the field."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from services.models.registry import Registry
from services.trainer import datasets
from services.trainer.datasets import IGNORE_INDEX, DatasetError


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


def test_only_assistant_tokens_carry_labels_and_the_template_matches_inference(registry: Registry) -> None:
    tokenizer = AutoTokenizer.from_pretrained(registry.models["tiny"].model_path)
    example = datasets.Example(1, [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A!"}])
    encoded = datasets.encode(example, tokenizer, 256)
    assert encoded is not None
    learned = str(tokenizer.decode([t for t in encoded.labels if t != IGNORE_INDEX]))
    assert learned.startswith("A!<|im_end|>")
    # The prompt part is exactly what the engine feeds the model for a chat request.
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Q?"}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert encoded.input_ids[: len(prompt)] == list(prompt)
    assert all(t == IGNORE_INDEX for t in encoded.labels[: len(prompt)])


def test_every_assistant_turn_of_a_conversation_is_learned(registry: Registry) -> None:
    tokenizer = AutoTokenizer.from_pretrained(registry.models["tiny"].model_path)
    turns = [("user", "one"), ("assistant", "uno"), ("user", "two"), ("assistant", "dos")]
    example = datasets.Example(1, [{"role": r, "content": c} for r, c in turns])
    encoded = datasets.encode(example, tokenizer, 256)
    assert encoded is not None
    learned = tokenizer.decode([t for t in encoded.labels if t != IGNORE_INDEX])
    assert "uno" in learned and "dos" in learned and "one" not in learned and "two" not in learned


def test_a_row_truncated_before_its_answer_is_dropped(registry: Registry) -> None:
    tokenizer = AutoTokenizer.from_pretrained(registry.models["tiny"].model_path)
    example = datasets.Example(1, [{"role": "user", "content": "word " * 50}, {"role": "assistant", "content": "x"}])
    assert datasets.encode(example, tokenizer, 32) is None
