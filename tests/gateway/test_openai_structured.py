"""`response_format` (json_object, json_schema) on /v1/chat/completions, driven by the official `openai` package:
constrained decoding makes every answer parse and validate, on `cpu-openvino` (OpenVINO GenAI's structured
output, next to unconstrained requests in the same continuous batch) and on the transformers path (xgrammar:
the tiny random-weight model, and adapter requests on the cpu-openvino worker).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

import jsonschema
import openai
import pytest
from openai import AsyncOpenAI
from pydantic import BaseModel, Field

from services.models.registry import ModelSpec, Registry
from tests.engine.contract import make_adapter_dir
from tests.gateway.conftest import sdk
from tests.helpers import Gateway, NatsServer, real_model_dir, running_gateway, running_worker, wait_until

PERSON: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "mood": {"enum": ["happy", "sad", "calm"]},
    },
    "required": ["name", "age", "mood"],
    "additionalProperties": False,
}
PERSON_FORMAT: dict[str, Any] = {
    "type": "json_schema",
    "json_schema": {"name": "person", "schema": PERSON, "strict": True},
}
ASK = [{"role": "user", "content": "Describe a person as JSON with name, age and mood."}]


class Person(BaseModel):
    name: str = Field(max_length=16)
    age: int = Field(ge=0, le=120)
    mood: Literal["happy", "sad", "calm"]


# --- the gateway's checks and the transformers engine (tiny model; fast) -----------------------------------


@pytest.fixture
async def tiny(gateway: Gateway) -> AsyncIterator[AsyncOpenAI]:
    client = sdk(gateway.lite_url)
    yield client
    await client.close()


async def test_a_json_schema_request_on_the_transformers_engine_returns_json_valid_against_the_schema(
    tiny: AsyncOpenAI,
) -> None:
    # Random weights: without the grammar this model never writes JSON.
    r = await tiny.chat.completions.create(
        model="tiny", messages=ASK, response_format=PERSON_FORMAT, temperature=1.0, max_tokens=64, n=4, seed=7
    )  # type: ignore[call-overload]
    for choice in r.choices:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content or ""), PERSON)


async def test_text_response_format_is_unconstrained_and_other_types_are_refused(tiny: AsyncOpenAI) -> None:
    r = await tiny.chat.completions.create(
        model="tiny", messages=ASK, response_format={"type": "text"}, temperature=0, max_tokens=4
    )
    assert r.choices[0].message.content
    with pytest.raises(openai.BadRequestError):
        await tiny.chat.completions.create(
            model="tiny",
            messages=ASK,
            response_format={"type": "xml"},
            max_tokens=4,  # type: ignore[typeddict-item]
        )


async def test_json_object_requires_the_word_json_in_the_messages_as_openai_does(tiny: AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await tiny.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Hi"}], response_format={"type": "json_object"}
        )
    assert caught.value.param == "messages"


async def test_an_unusable_schema_is_a_400_naming_the_problem(tiny: AsyncOpenAI) -> None:
    bad = {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "no-such-type"}}}
    with pytest.raises(openai.BadRequestError) as caught:
        await tiny.chat.completions.create(model="tiny", messages=ASK, response_format=bad, max_tokens=8)  # type: ignore[arg-type]
    assert "json_schema" in caught.value.message


# --- cpu-openvino on the real model ----------------------------------------------------------------------

OV_MODEL = "smol-structured"  # a model id of its own: only this module's worker takes its requests
ADAPTER = "structured-alpha"


@pytest.fixture(scope="module")
async def ov_gateway(nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gateway]:
    adapters = make_adapter_dir(tmp_path_factory.mktemp("structured-adapters"))
    spec = ModelSpec(
        name="SmolLM2 135M Instruct on OpenVINO",
        model_path=str(real_model_dir()),
        engine="cpu-openvino",
        max_model_len=2048,
        dtype="float32",
        adapters={ADAPTER: str(Path(adapters) / "alpha")},
    )
    registry = Registry(default=OV_MODEL, models={OV_MODEL: spec})
    worker_id = f"ov-structured-{uuid.uuid4().hex[:6]}"
    async with (
        running_worker(nats_server.url, registry, OV_MODEL, worker_id=worker_id, slots=24) as _,
        running_gateway(nats_server.url, registry, rate_limit_per_minute=0, rate_limit_shared=False) as gw,
    ):
        await wait_until(lambda: gw.core.workers.model_state(OV_MODEL) == "ready", timeout=120)
        yield gw


@pytest.fixture
async def ov(ov_gateway: Gateway) -> AsyncIterator[AsyncOpenAI]:
    client = sdk(ov_gateway.lite_url)
    yield client
    await client.close()


@pytest.mark.slow
async def test_twenty_concurrent_sampled_json_schema_requests_all_validate_beside_free_text_ones(
    ov: AsyncOpenAI,
) -> None:
    async def constrained(i: int) -> str:
        r = await ov.chat.completions.create(
            model=OV_MODEL, messages=ASK, response_format=PERSON_FORMAT, temperature=0.9, max_tokens=64, seed=i
        )  # type: ignore[call-overload]
        assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
        return r.choices[0].message.content or ""

    async def free(i: int) -> str:
        r = await ov.chat.completions.create(model=OV_MODEL, messages=ASK, temperature=0.9, max_tokens=32, seed=i)
        return r.choices[0].message.content or ""

    results = await asyncio.gather(*[constrained(i) for i in range(20)], *[free(i) for i in range(4)])
    for text in results[:20]:
        jsonschema.validate(json.loads(text), PERSON)
    assert all(results[20:])


@pytest.mark.slow
async def test_the_sdks_parse_helper_returns_a_pydantic_object(ov: AsyncOpenAI) -> None:
    r = await ov.beta.chat.completions.parse(
        model=OV_MODEL, messages=ASK, response_format=Person, temperature=0.7, max_tokens=64, seed=1
    )  # type: ignore[arg-type]
    assert isinstance(r.choices[0].message.parsed, Person)


@pytest.mark.slow
async def test_a_json_object_request_returns_a_json_object(ov: AsyncOpenAI) -> None:
    r = await ov.chat.completions.create(
        model=OV_MODEL,
        messages=[{"role": "user", "content": "Reply in JSON: an object with the key 'color' and a color."}],
        response_format={"type": "json_object"},
        temperature=0,
        max_tokens=64,
    )
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content or ""), dict)


@pytest.mark.slow
async def test_a_json_schema_request_through_an_adapter_validates(ov: AsyncOpenAI) -> None:
    # Adapter requests run on the transformers engine inside cpu-openvino (xgrammar constraints).
    results = await asyncio.gather(
        *[
            ov.chat.completions.create(
                model=ADAPTER, messages=ASK, response_format=PERSON_FORMAT, temperature=0.9, max_tokens=64, seed=i
            )  # type: ignore[call-overload]
            for i in range(3)
        ]
    )
    for r in results:
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content or ""), PERSON)


@pytest.mark.slow
async def test_an_unusable_schema_fails_alone_on_cpu_openvino(ov: AsyncOpenAI) -> None:
    bad = {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "no-such-type"}}}
    refused, served = await asyncio.gather(
        ov.chat.completions.create(model=OV_MODEL, messages=ASK, response_format=bad, max_tokens=8),  # type: ignore[arg-type]
        ov.chat.completions.create(model=OV_MODEL, messages=ASK, max_tokens=8),
        return_exceptions=True,
    )
    assert isinstance(refused, openai.BadRequestError)
    assert not isinstance(served, BaseException) and served.choices[0].message.content
