"""Training datasets: JSON (an array of rows) or JSONL (one row per line), Alpaca or chat rows.

- Alpaca: `{"instruction": str, "input"?: str, "output": str, "system"?: str}`
- Chat:   `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`

Both become a conversation; the trainer sends it through the base model's chat template and takes the loss
on the assistant tokens only (services/trainer/encoding.py). Validation names the row (1-based; the line number
for JSONL) and the field of the first problem; the gateway runs it on uploads and `datasetPath` files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from schemas.errors import CyError, ErrorCode, ErrorDetail

EXTENSIONS = (".json", ".jsonl")
ROLES = ("system", "user", "assistant")


class DatasetError(CyError):
    """A dataset problem; `row` is 1-based (0: the file as a whole), `field` the offending key."""

    def __init__(self, description: str, *, row: int = 0, field: str = "") -> None:
        where = f"row {row}" + (f", field `{field}`" if field else "") if row else ""
        message = f"Invalid datasetPath: {where}: {description}" if where else f"Invalid datasetPath: {description}"
        super().__init__(
            ErrorCode.INVALID_REQUEST,
            message,
            details=[
                ErrorDetail(
                    type="invalid_dataset",
                    field=f"datasetPath[row {row}].{field}" if row and field else "datasetPath",
                    description=f"{where}: {description}" if where else description,
                )
            ],
        )
        self.row = row
        self.field = field


Conversation = list[dict[str, str]]


@dataclass(frozen=True)
class Example:
    """One row as a conversation; `row` is where it came from (for error messages)."""

    row: int
    messages: Conversation


def load(path: Path) -> list[Example]:
    """Read and validate a whole dataset file. Raises DatasetError on the first problem."""
    if path.suffix.lower() not in EXTENSIONS:
        raise DatasetError(f"'{path.name}' must end in .json or .jsonl")
    if not path.is_file():
        raise DatasetError(f"'{path.name}' does not exist (or is not a file)")
    return parse(path.read_bytes(), path.suffix.lower().lstrip("."))


def parse(data: bytes, fmt: str) -> list[Example]:
    """Validate a dataset held in memory; `fmt` is "jsonl" or "json". Raises DatasetError on the first problem."""
    rows = _jsonl_rows(data) if fmt == "jsonl" else _json_rows(data)
    examples = [Example(row, _conversation(row, value)) for row, value in rows]
    if not examples:
        raise DatasetError("the dataset has no rows")
    return examples


def _json_rows(data: bytes) -> list[tuple[int, Any]]:
    try:
        value = msgspec.json.decode(data)
    except msgspec.DecodeError as exc:
        raise DatasetError(f"not valid JSON ({exc})") from exc
    except (UnicodeDecodeError, RecursionError) as exc:
        raise DatasetError(f"not valid JSON ({_unreadable(exc)})") from None
    if not isinstance(value, list):
        raise DatasetError(f"a .json dataset must be an array of rows, not {_kind(value)}")
    return list(enumerate(value, start=1))


def _jsonl_rows(data: bytes) -> list[tuple[int, Any]]:
    rows: list[tuple[int, Any]] = []
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((number, msgspec.json.decode(line)))
        except msgspec.DecodeError as exc:
            raise DatasetError(f"not valid JSON ({exc})", row=number) from exc
        except (UnicodeDecodeError, RecursionError) as exc:
            raise DatasetError(f"not valid JSON ({_unreadable(exc)})", row=number) from None
    return rows


def _unreadable(exc: UnicodeDecodeError | RecursionError) -> str:
    """The two failures msgspec does not raise as DecodeError (the row itself is never quoted)."""
    if isinstance(exc, UnicodeDecodeError):
        return f"not UTF-8: {exc.reason}"
    return "arrays or objects are nested too deeply"


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


def _text(row: int, obj: dict[str, Any], key: str, *, required: bool, field: str | None = None) -> str:
    field = field or key
    if key not in obj:
        if required:
            raise DatasetError("is missing", row=row, field=field)
        return ""
    value = obj[key]
    if not isinstance(value, str):
        raise DatasetError(f"must be a string, not {_kind(value)}", row=row, field=field)
    if required and not value.strip():
        raise DatasetError("must not be empty", row=row, field=field)
    return value


def _conversation(row: int, value: Any) -> Conversation:
    if not isinstance(value, dict):
        raise DatasetError(f"must be an object, not {_kind(value)}", row=row)
    if "messages" in value:
        return _chat(row, value["messages"])
    if "instruction" in value or "output" in value:
        instruction = _text(row, value, "instruction", required=True)
        extra = _text(row, value, "input", required=False)
        output = _text(row, value, "output", required=True)
        system = _text(row, value, "system", required=False)
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages = [{"role": "system", "content": system}] if system else []
        return [*messages, {"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    raise DatasetError("expected Alpaca fields (`instruction`, `output`, optional `input`) or chat `messages`", row=row)


def _chat(row: int, messages: Any) -> Conversation:
    if not isinstance(messages, list) or not messages:
        raise DatasetError("must be a non-empty array of {role, content}", row=row, field="messages")
    out: Conversation = []
    for i, message in enumerate(messages):
        field = f"messages[{i}]"
        if not isinstance(message, dict):
            raise DatasetError(f"must be an object, not {_kind(message)}", row=row, field=field)
        role = _text(row, message, "role", required=True, field=f"{field}.role")
        if role not in ROLES:
            raise DatasetError(f"'{role}' is not one of {', '.join(ROLES)}", row=row, field=f"{field}.role")
        content = _text(row, message, "content", required=role == "assistant", field=f"{field}.content")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise DatasetError("has no assistant message to learn from", row=row, field="messages")
    return out
