"""Tool calling on /v1/chat/completions through the official `openai` package, on the bundled SmolLM2 (whose
chat template has no tool support: the Hermes convention is written into its prompt): forced calls
(tool_choice "required" or a named function) follow the declared schema, streamed calls assemble into the
same call, earlier calls and tool results go back into the prompt, and the SDK's `parse` helper turns a
pydantic-declared tool's arguments into the pydantic object. Malformed requests are checked on the tiny model."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import openai
import pytest
from openai import AsyncOpenAI
from pydantic import BaseModel, Field

from services.engine.worker import Worker
from tests.helpers import Gateway

MODEL = "smollm2-135m-instruct"

WEATHER_ARGS: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME_ARGS: dict[str, Any] = {
    "type": "object",
    "properties": {"zone": {"type": "string", "maxLength": 12}},
    "required": ["zone"],
    "additionalProperties": False,
}
TOOLS: list[Any] = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": WEATHER_ARGS}},
    {"type": "function", "function": {"name": "get_time", "description": "Time now", "parameters": TIME_ARGS}},
]
SCHEMAS = {"get_weather": WEATHER_ARGS, "get_time": TIME_ARGS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
SAMPLED: dict[str, Any] = {"temperature": 1.0, "max_tokens": 64, "seed": 3}


@pytest.fixture
def client(aclient: AsyncOpenAI) -> AsyncOpenAI:
    return aclient


@pytest.fixture
async def real(client: AsyncOpenAI, real_worker: Worker, gateway: Gateway) -> AsyncOpenAI:
    from tests.helpers import wait_until

    await wait_until(lambda: gateway.core.workers.model_state(MODEL) == "ready", timeout=120)
    return client


@pytest.mark.slow
async def test_a_named_tool_choice_returns_that_call_with_arguments_valid_against_its_schema(
    real: AsyncOpenAI,
) -> None:
    r = await real.chat.completions.create(
        model=MODEL,
        messages=ASK,  # type: ignore[arg-type]
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        n=3,
        **SAMPLED,
    )
    for choice in r.choices:
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None
        (call,) = choice.message.tool_calls or []
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name == "get_weather"  # type: ignore[union-attr]
        jsonschema.validate(json.loads(call.function.arguments), WEATHER_ARGS)  # type: ignore[union-attr]


@pytest.mark.slow
async def test_tool_choice_required_returns_calls_of_declared_functions_only(real: AsyncOpenAI) -> None:
    r = await real.chat.completions.create(
        model=MODEL,
        messages=ASK,  # type: ignore[arg-type]
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        n=4,
        **SAMPLED,
    )
    for choice in r.choices:
        assert choice.finish_reason == "tool_calls", choice.message.content
        (call,) = choice.message.tool_calls or []  # parallel_tool_calls=false: exactly one
        name = call.function.name  # type: ignore[union-attr]
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[name])  # type: ignore[union-attr]


@pytest.mark.slow
async def test_a_streamed_named_call_assembles_into_valid_arguments_and_ends_with_tool_calls(
    real: AsyncOpenAI,
) -> None:
    stream = await real.chat.completions.create(
        model=MODEL,
        messages=ASK,  # type: ignore[arg-type]
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        stream=True,
        **SAMPLED,
    )
    ids, names, arguments, reasons = set(), [], "", []
    async for chunk in stream:
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                assert delta.index == 0
                if delta.id:
                    ids.add(delta.id)
                if delta.function and delta.function.name:
                    names.append(delta.function.name)
                arguments += (delta.function.arguments or "") if delta.function else ""
            if choice.finish_reason:
                reasons.append(choice.finish_reason)
    assert len(ids) == 1 and names == ["get_time"] and reasons == ["tool_calls"]
    jsonschema.validate(json.loads(arguments), TIME_ARGS)


@pytest.mark.slow
async def test_a_conversation_with_an_earlier_call_and_its_result_is_answered(real: AsyncOpenAI) -> None:
    conversation: list[Any] = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
    ]
    r = await real.chat.completions.create(model=MODEL, messages=conversation, tools=TOOLS, temperature=0, max_tokens=8)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert r.usage is not None and r.usage.prompt_tokens > 100  # the tool signatures are in the prompt


class Weather(BaseModel):
    city: str = Field(max_length=20)
    unit: str = Field(pattern="^(c|f)$")


@pytest.mark.slow
async def test_the_sdks_parse_helper_returns_a_pydantic_tool_argument_object(real: AsyncOpenAI) -> None:
    tool = openai.pydantic_function_tool(Weather, name="get_weather")
    r = await real.beta.chat.completions.parse(
        model=MODEL,
        messages=ASK,  # type: ignore[arg-type]
        tools=[tool],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        **SAMPLED,
    )
    (call,) = r.choices[0].message.tool_calls or []
    assert isinstance(call.function.parsed_arguments, Weather)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tool_choice": "required"}, "tool_choice"),  # no tools
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": [TOOLS[0], TOOLS[0]]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
        (
            {
                "tools": TOOLS,
                "tool_choice": "required",
                "response_format": {"type": "json_object"},
                "messages": [{"role": "user", "content": "json"}],
            },
            "response_format",
        ),
        ({"messages": [{"role": "tool", "content": "21"}]}, "messages[0].tool_call_id"),
    ],
)
async def test_malformed_tool_requests_are_400_naming_the_parameter(
    client: AsyncOpenAI, extra: dict[str, Any], param: str
) -> None:
    body = {"model": "tiny", "messages": ASK, "max_tokens": 4, **extra}
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(**body)
    assert caught.value.param == param, caught.value.message


async def test_tool_choice_none_answers_in_text(client: AsyncOpenAI) -> None:
    r = await client.chat.completions.create(
        model="tiny", messages=ASK, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=6
    )  # type: ignore[arg-type]
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
