"""Tool calls out of generated text, and the JSON Schema that forces them (`tool_choice`).

`tool_choice` "auto": the model decides; calls are found in its text in the Hermes format the chat template
asks for (`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`; templates without tool support get a
system prompt that asks for it, services/engine/tool_prompt.py). Text that is not a well-formed call of a
declared function stays content, as in vLLM's hermes parser.

`tool_choice` "required" or a named function: decoding is constrained by a JSON Schema (the function's
`parameters`, or an array of {name, arguments} objects), so the call is valid whatever the model.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec

from schemas.inference import ToolCall, ToolCallFunction

OPEN, CLOSE = "<tool_call>", "</tool_call>"

Mode = Literal["none", "auto", "required", "named"]


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True)
class ToolPlan:
    """How a chat request uses its tools: `mode`, the declared names, and the forced function if named."""

    mode: Mode = "none"
    names: frozenset[str] = frozenset()
    forced: str = ""
    parallel: bool = True

    @property
    def active(self) -> bool:
        return self.mode != "none"


def forcing_schema(plan: ToolPlan, parameters: dict[str, dict[str, Any]]) -> str:
    """The JSON Schema text decoding must follow for a forced choice ("" for none/auto).

    named: the function's arguments object. required: a non-empty array of {"name", "arguments"} calls
    (at most one when `parallel_tool_calls` is false).
    """
    if plan.mode == "named":
        return msgspec.json.encode(parameters[plan.forced] or {"type": "object"}).decode()
    if plan.mode != "required":
        return ""
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "enum": [name]},
                "arguments": parameters[name] or {"type": "object"},
            },
            "required": ["name", "arguments"],
        }
        for name in sorted(parameters)
    ]
    schema: dict[str, Any] = {
        "type": "array",
        "items": calls[0] if len(calls) == 1 else {"anyOf": calls},
        "minItems": 1,
    }
    if not plan.parallel:
        schema["maxItems"] = 1
    return msgspec.json.encode(schema).decode()


def complete_items(text: str) -> list[Any]:
    """The complete items of a JSON array, also when max_tokens cut the array off after some of them."""
    try:
        items = msgspec.json.decode(text)
        return items if isinstance(items, list) else []
    except msgspec.DecodeError:
        pass
    out, depth, start, in_string, escaped = [], 0, -1, False, False
    for i, ch in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth == 2:
                start = i
        elif ch in "]}":
            if depth == 2 and start >= 0:
                try:
                    out.append(msgspec.json.decode(text[start : i + 1]))
                except msgspec.DecodeError:
                    return out
            depth -= 1
    return out


def _call(name: str, arguments: Any) -> ToolCall:
    text = arguments if isinstance(arguments, str) else msgspec.json.encode(arguments).decode()
    return ToolCall(id=new_call_id(), function=ToolCallFunction(name=name, arguments=text))


def _hermes_call(body: str, names: frozenset[str]) -> ToolCall | None:
    try:
        obj = msgspec.json.decode(body.strip())
    except msgspec.DecodeError:
        return None
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    arguments = obj.get("arguments", obj.get("parameters", {}))
    if not isinstance(arguments, dict | str):
        return None
    return _call(obj["name"], arguments)


@dataclass
class Parsed:
    content: str
    calls: list[ToolCall] = field(default_factory=list)


def parse(plan: ToolPlan, text: str) -> Parsed:
    """A finished generation's text -> content and tool calls (whole-response path)."""
    if plan.mode == "named":
        return Parsed("", [_call(plan.forced, text)])
    if plan.mode == "required":
        items = complete_items(text)
        if not items:  # cut off by max_tokens inside the first call: no call to return, the text stays visible
            return Parsed(text)
        return Parsed("", [_call(item["name"], item["arguments"]) for item in items])
    if plan.mode == "auto":
        stream = HermesStream(plan.names)
        content = stream.feed(text) + stream.flush()
        return Parsed(content, stream.calls)
    return Parsed(text)


class HermesStream:
    """Incremental `<tool_call>` parser for "auto": `feed` returns the content text safe to send now;
    complete calls collect in `calls` (the caller sends each once). A block that is not a valid call of a
    declared function is returned as content, tags included."""

    def __init__(self, names: frozenset[str]) -> None:
        self.names = names
        self.calls: list[ToolCall] = []
        self._buffer = ""
        self._inside = False

    def feed(self, text: str) -> str:
        self._buffer += text
        out: list[str] = []
        while True:
            if self._inside:
                end = self._buffer.find(CLOSE)
                if end < 0:
                    return "".join(out)
                body, self._buffer = self._buffer[:end], self._buffer[end + len(CLOSE) :]
                self._inside = False
                call = _hermes_call(body, self.names)
                if call is None:
                    out.append(OPEN + body + CLOSE)
                else:
                    self.calls.append(call)
                continue
            start = self._buffer.find(OPEN)
            if start >= 0:
                out.append(self._buffer[:start])
                self._buffer = self._buffer[start + len(OPEN) :]
                self._inside = True
                continue
            # Hold back a tail that could be the start of "<tool_call>".
            keep = next(
                (k for k in range(min(len(OPEN) - 1, len(self._buffer)), 0, -1) if OPEN.startswith(self._buffer[-k:])),
                0,
            )
            cut = len(self._buffer) - keep
            out.append(self._buffer[:cut])
            self._buffer = self._buffer[cut:]
            return "".join(out)

    def flush(self) -> str:
        """The end of the text: an unterminated block is content (the model stopped mid-call)."""
        rest = (OPEN if self._inside else "") + self._buffer
        self._buffer, self._inside = "", False
        return rest
