"""The `<tool_call>` parser behind tool_choice "auto", fed whole and in arbitrary pieces, and the schemas that
force calls: what a client sees as content and as calls does not depend on how the text was chunked."""

from __future__ import annotations

import json

import pytest

from gateway.openai import tool_calls
from gateway.openai.tool_calls import HermesStream, ToolPlan

NAMES = frozenset({"get_weather", "get_time"})
AUTO = ToolPlan(mode="auto", names=NAMES)
TEXT = (
    'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
    '<tool_call>{"name": "get_time", "arguments": {"zone": "CET"}}</tool_call>'
)


def _streamed(text: str, size: int) -> tuple[str, list[tuple[str, str]]]:
    stream = HermesStream(NAMES)
    content = "".join(stream.feed(text[i : i + size]) for i in range(0, len(text), size)) + stream.flush()
    return content, [(c.function.name, c.function.arguments) for c in stream.calls]


def test_auto_mode_finds_every_call_and_keeps_the_words_before_them_as_content() -> None:
    parsed = tool_calls.parse(AUTO, TEXT)
    assert parsed.content.strip() == "Let me check."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in parsed.calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_time", {"zone": "CET"}),
    ]
    assert len({c.id for c in parsed.calls}) == 2


@pytest.mark.parametrize("size", [1, 2, 3, 7, 11, 1000])
def test_the_parser_gives_the_same_content_and_calls_whatever_the_chunking(size: int) -> None:
    whole = tool_calls.parse(AUTO, TEXT)
    content, calls = _streamed(TEXT, size)
    assert content == whole.content
    assert calls == [(c.function.name, c.function.arguments) for c in whole.calls]


@pytest.mark.parametrize(
    "text",
    [
        "<tool_call>not json</tool_call>",
        '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>',  # not a declared function
        '<tool_call>{"name": "get_time", "arguments": {"zone": "CET"}',  # cut off: no closing tag
        "a < b and <tool_ is not a tag",
    ],
)
def test_text_that_is_not_a_well_formed_call_of_a_declared_function_stays_content(text: str) -> None:
    assert tool_calls.parse(AUTO, text).calls == []
    assert tool_calls.parse(AUTO, text).content == text
    assert _streamed(text, 3) == (text, [])


def test_a_required_choice_is_forced_to_a_non_empty_array_of_declared_calls() -> None:
    params = {"get_weather": {"type": "object", "properties": {"city": {"type": "string"}}}, "get_time": {}}
    schema = json.loads(tool_calls.forcing_schema(ToolPlan(mode="required", names=NAMES, parallel=False), params))
    assert schema["type"] == "array" and schema["minItems"] == 1 and schema["maxItems"] == 1
    names = [option["properties"]["name"]["enum"] for option in schema["items"]["anyOf"]]
    assert names == [["get_time"], ["get_weather"]]
    named = tool_calls.forcing_schema(ToolPlan(mode="named", names=NAMES, forced="get_weather"), params)
    assert json.loads(named) == params["get_weather"]
    assert tool_calls.forcing_schema(AUTO, params) == ""


def test_a_required_answer_cut_off_by_max_tokens_keeps_the_calls_it_completed() -> None:
    required = ToolPlan(mode="required", names=NAMES)
    text = (
        '[\n  {"name": "get_weather", "arguments": {"city": "Pa]ris \\" {x"}},\n'
        '  {"name": "get_time", "arguments": {"zone": "CET"}},\n  {"name": "get_weather", "arguments": {"ci'
    )
    calls = tool_calls.parse(required, text).calls
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": 'Pa]ris " {x'}),
        ("get_time", {"zone": "CET"}),
    ]
    cut_in_first = '[{"name": "get_weather", "arguments": {"ci'
    assert tool_calls.parse(required, cut_in_first).calls == []
    assert tool_calls.parse(required, cut_in_first).content == cut_in_first
