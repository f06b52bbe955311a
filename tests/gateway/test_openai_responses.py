"""/v1/responses (OpenAI's Responses API, conversations stored in NATS KV) driven by the official `openai` package,
against a real HTTP server, a real nats-server and the tiny random-weight model."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from nats.js.errors import KeyNotFoundError
from openai import AsyncOpenAI
from transformers import AutoTokenizer

from infra.nats import free_port, nats_server_binary
from schemas import subjects
from schemas.responses import response_decoder
from services.engine.worker import Worker
from services.models.registry import Registry
from tests.gateway.conftest import sdk
from tests.helpers import Gateway, NatsServer, running_gateway, running_paced_worker, running_worker, wait_until

MODEL = "tiny"
SHORT: dict[str, Any] = {"model": MODEL, "temperature": 0, "max_output_tokens": 6}
STREAM_ORDER = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
]
CLOSING_ORDER = [
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
]


@pytest.fixture(scope="module")
def tokenizer(registry: Registry) -> Any:
    return AutoTokenizer.from_pretrained(registry.models[MODEL].model_path)


def prompt_tokens(tokenizer: Any, messages: list[dict[str, str]]) -> int:
    """What the worker counts for these turns: the chat template's tokens (as /v1/chat/completions)."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    return len(ids["input_ids"])


async def test_a_response_has_the_openai_shape_text_and_true_usage(aclient: AsyncOpenAI) -> None:
    r = await aclient.responses.create(input="Hello there", metadata={"tenant": "t1"}, **SHORT)
    assert r.id.startswith("resp_") and r.object == "response" and r.model == MODEL
    assert r.status in ("completed", "incomplete") and r.error is None
    assert len(r.output) == 1
    message = r.output[0]
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert message.status == r.status and [c.type for c in message.content] == ["output_text"]
    assert r.output_text and message.content[0].annotations == []  # type: ignore[union-attr]
    assert r.usage is not None and 0 < r.usage.output_tokens <= 6 and r.usage.input_tokens > 0
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.usage.input_tokens_details.cached_tokens == 0 and r.usage.output_tokens_details.reasoning_tokens == 0
    assert r.previous_response_id is None and r.metadata == {"tenant": "t1"} and r.temperature == 0
    assert r.max_output_tokens == 6 and r.tools == [] and r.text is not None and r.text.format.type == "text"  # type: ignore[union-attr]
    if r.status == "incomplete":
        assert r.incomplete_details is not None and r.incomplete_details.reason == "max_output_tokens"
        assert r.usage.output_tokens == 6
    assert r.model_dump().get("store") is True
    again = await aclient.responses.retrieve(r.id)
    assert again.model_dump() == r.model_dump()


async def test_a_second_turn_sends_only_its_input_and_the_model_reads_the_whole_conversation(
    aclient: AsyncOpenAI, tokenizer: Any
) -> None:
    first = await aclient.responses.create(input="Hi", instructions="You are terse.", **SHORT)
    said = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}]
    assert first.usage is not None and first.usage.input_tokens == prompt_tokens(tokenizer, said)

    second = await aclient.responses.create(
        previous_response_id=first.id,
        input=[
            {
                "role": "user",
                "content": [{"type": "input_text", "text": "And"}, {"type": "input_text", "text": "then?"}],
            }
        ],
        **SHORT,
    )
    # As OpenAI: the previous turn's instructions are not carried over; its input and answer are.
    conversation = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "And\nthen?"},
    ]
    assert second.previous_response_id == first.id and second.instructions is None
    assert second.usage is not None and second.usage.input_tokens == prompt_tokens(tokenizer, conversation)

    third = await aclient.responses.create(previous_response_id=second.id, input="More.", **SHORT)
    conversation += [{"role": "assistant", "content": second.output_text}, {"role": "user", "content": "More."}]
    assert third.usage is not None and third.usage.input_tokens == prompt_tokens(tokenizer, conversation)

    items = await aclient.responses.input_items.list(third.id)
    assert [(i.role, i.type) for i in items.data] == [  # type: ignore[union-attr]
        ("user", "message"),
        ("assistant", "message"),
        ("user", "message"),
        ("assistant", "message"),
        ("user", "message"),
    ]
    texts = [" ".join(c.text for c in i.content) for i in items.data]  # type: ignore[union-attr]
    assert texts == ["More.", second.output_text, "And then?", first.output_text, "Hi"]  # newest first
    assert items.data[1].id == second.output[0].id and items.data[0].content[0].type == "input_text"  # type: ignore[union-attr,index]
    page = await aclient.responses.input_items.list(third.id, order="asc", limit=2)
    assert [i.id for i in page.data] == [i.id for i in items.data[::-1][:2]] and page.has_more
    rest = await aclient.responses.input_items.list(third.id, order="asc", after=page.data[-1].id)
    assert len(rest.data) == 3 and not rest.has_more
    everything = [i.id async for i in aclient.responses.input_items.list(third.id, limit=2)]  # the SDK pages
    assert everything == [i.id for i in items.data]


async def test_a_streamed_response_sends_openais_events_and_the_deltas_join_to_the_final_text(
    aclient: AsyncOpenAI,
) -> None:
    stream = await aclient.responses.create(input="Tell me a story", stream=True, **SHORT)
    events = [e async for e in stream]
    types = [e.type for e in events]
    assert types[:4] == STREAM_ORDER and types[-4:-1] == CLOSING_ORDER
    assert types[-1] in ("response.completed", "response.incomplete")
    assert set(types[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    created, final = events[0].response, events[-1].response  # type: ignore[union-attr]
    assert created.status == "in_progress" and created.output == [] and created.usage is None
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")  # type: ignore[union-attr]
    assert deltas and deltas == events[-4].text == final.output_text  # type: ignore[union-attr]
    item_id = events[2].item.id  # type: ignore[union-attr]
    assert final.id == created.id and final.output[0].id == item_id and final.status == types[-1].split(".")[1]
    assert final.usage is not None and final.usage.output_tokens > 0
    # Stored before its last event: retrievable, and continued from, at once.
    assert (await aclient.responses.retrieve(final.id)).output_text == deltas
    follow = await aclient.responses.create(previous_response_id=final.id, input="Go on", **SHORT)
    assert follow.usage is not None and follow.usage.input_tokens > final.usage.input_tokens


async def test_the_sdks_stream_helper_accumulates_the_text(aclient: AsyncOpenAI) -> None:
    async with aclient.responses.stream(input="Hello", **SHORT) as stream:
        events = [e async for e in stream]
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert deltas and deltas[-1].snapshot == "".join(d.delta for d in deltas)
    done = next(e for e in events if e.type == "response.output_text.done")
    assert done.text == deltas[-1].snapshot


async def test_a_raw_stream_has_named_events_and_no_done_marker(gateway: Gateway) -> None:
    body = {"input": "Hi", "stream": True, **SHORT}
    async with httpx.AsyncClient(timeout=60) as http:
        r = await http.post(f"{gateway.lite_url}/responses", json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["x-request-id"].startswith("resp_")
    frames = [f for f in r.text.split("\n\n") if f.strip()]
    assert "[DONE]" not in r.text
    for frame in frames:
        event, data = frame.split("\n")
        assert event.removeprefix("event: ") == json.loads(data.removeprefix("data: "))["type"]


async def test_previous_response_id_works_across_a_gateway_restart(
    nats_server: NatsServer, registry: Registry, tiny_worker: Worker, tokenizer: Any
) -> None:
    async with running_gateway(nats_server.url, registry) as first_gateway:
        await wait_until(lambda: first_gateway.core.workers.model_state(MODEL) == "ready")
        async with sdk(first_gateway.lite_url) as client:
            first = await client.responses.create(input="Remember me", **SHORT)
    async with running_gateway(nats_server.url, registry) as second_gateway:
        await wait_until(lambda: second_gateway.core.workers.model_state(MODEL) == "ready")
        async with sdk(second_gateway.lite_url) as client:
            assert (await client.responses.retrieve(first.id)).output_text == first.output_text
            second = await client.responses.create(previous_response_id=first.id, input="Who am I?", **SHORT)
    conversation = [
        {"role": "user", "content": "Remember me"},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "Who am I?"},
    ]
    assert second.usage is not None and second.usage.input_tokens == prompt_tokens(tokenizer, conversation)


async def test_a_response_with_store_false_is_not_stored_nor_continued(aclient: AsyncOpenAI) -> None:
    r = await aclient.responses.create(input="Forget me", store=False, **SHORT)
    assert r.output_text and r.model_dump().get("store") is False
    with pytest.raises(openai.NotFoundError):
        await aclient.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError) as caught:
        await aclient.responses.create(previous_response_id=r.id, input="Again", **SHORT)
    assert caught.value.body == {  # type: ignore[comparison-overlap]
        "message": f"Previous response with id '{r.id}' not found.",
        "type": "invalid_request_error",
        "param": "previous_response_id",
        "code": "previous_response_not_found",
    }
    # A stored turn may continue from a stored one and not be stored itself.
    kept = await aclient.responses.create(input="Keep me", **SHORT)
    branch = await aclient.responses.create(previous_response_id=kept.id, input="But not this", store=False, **SHORT)
    assert branch.previous_response_id == kept.id
    with pytest.raises(openai.NotFoundError):
        await aclient.responses.retrieve(branch.id)


async def test_unknown_ids_are_404s_in_openais_error_shape(gateway: Gateway) -> None:
    unknown = "resp_" + "0" * 32
    async with httpx.AsyncClient(base_url=gateway.lite_url or "", timeout=30) as http:
        r = await http.post("/responses", json={"input": "Hi", "previous_response_id": unknown, **SHORT})
        assert r.status_code == 404
        assert r.json()["error"] == {
            "message": f"Previous response with id '{unknown}' not found.",
            "type": "invalid_request_error",
            "param": "previous_response_id",
            "code": "previous_response_not_found",
        }
        r = await http.post("/responses", json={"input": "Hi", "previous_response_id": "not an id", **SHORT})
        assert r.status_code == 404 and r.json()["error"]["param"] == "previous_response_id"
        for method, path in [("GET", unknown), ("DELETE", unknown), ("GET", f"{unknown}/input_items")]:
            r = await http.request(method, f"/responses/{path}")
            assert r.status_code == 404, (method, path)
            error = r.json()["error"]
            assert error["type"] == "invalid_request_error" and error["code"] == "not_found"


async def test_delete_removes_a_response_so_it_can_no_longer_be_retrieved_or_continued(
    aclient: AsyncOpenAI, gateway: Gateway
) -> None:
    r = await aclient.responses.create(input="Delete me", **SHORT)
    later = await aclient.responses.create(previous_response_id=r.id, input="Still here?", **SHORT)
    async with httpx.AsyncClient(base_url=gateway.lite_url or "", timeout=30) as http:
        deleted = await http.delete(f"/responses/{r.id}")
    assert deleted.status_code == 200 and deleted.json() == {"id": r.id, "object": "response", "deleted": True}
    with pytest.raises(openai.NotFoundError):
        await aclient.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        await aclient.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        await aclient.responses.create(previous_response_id=r.id, input="Again", **SHORT)
    # A later turn holds the whole conversation: it goes on without the deleted one.
    assert (await aclient.responses.create(previous_response_id=later.id, input="Yes", **SHORT)).output_text
    kv = await gateway.core.js.key_value(subjects.RESPONSES_BUCKET)
    with pytest.raises(KeyNotFoundError):  # purged
        await kv.get(subjects.response_key(r.id))


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"input": []}, "input", None),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            "input[0].content[0]",
            "unsupported_content",
        ),
        (
            {"input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]},
            "input[0].type",
            "unsupported_parameter",
        ),
        ({"input": [{"role": "robot", "content": "hi"}]}, "input[0].role", "invalid_value"),
        ({"input": "hi", "tools": [{"type": "function", "name": "f"}]}, "tools", "unsupported_parameter"),
        ({"input": "hi", "reasoning": {"effort": "high"}}, "reasoning", "unsupported_parameter"),
        ({"input": "hi", "conversation": "conv_1"}, "conversation", "unsupported_parameter"),
        ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens", None),
        ({"input": "hi", "temperature": 3}, "temperature", None),
        ({"input": "hi", "stream_options": {"include_obfuscation": False}}, "stream_options", None),
        ({"input": "hi", "text": {"format": {"type": "json_object"}}}, "input", None),
        ({"input": "hi", "frequency_penalty": 1}, "frequency_penalty", "unknown_parameter"),
        ({}, "input", "missing_required_parameter"),
    ],
)
async def test_bad_requests_are_400s_naming_the_parameter(
    gateway: Gateway, body: dict[str, Any], param: str, code: str | None
) -> None:
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.post(f"{gateway.lite_url}/responses", json={"model": MODEL, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error


async def test_a_conversation_too_long_to_store_is_refused_before_generating(
    registry: Registry, tmp_path: Path
) -> None:
    # A nats-server with its default max_payload (1 MiB; the project's config allows 8 MB): a request under the
    # body limit (1 MiB) whose record, with room for its answer, would not fit in one NATS message.
    port = free_port()
    cmd = [nats_server_binary(), "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(tmp_path)]
    server = await asyncio.create_subprocess_exec(*cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        async with running_gateway(f"nats://127.0.0.1:{port}", registry) as gw:
            body = {**SHORT, "input": "x" * 1_040_000, "max_output_tokens": 256}
            async with httpx.AsyncClient(timeout=30) as http:
                r = await http.post(f"{gw.lite_url}/responses", json=body)
    finally:
        server.terminate()
        await server.wait()
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "conversation_too_large" and r.json()["error"]["param"] == "input"


async def test_an_unknown_model_is_a_404_before_anything_is_generated(aclient: AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await aclient.responses.create(model="no-such-model", input="Hi", stream=True)
    assert caught.value.code == "model_not_found"


async def test_text_format_json_schema_constrains_the_answer(aclient: AsyncOpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    r = await aclient.responses.create(
        model=MODEL,
        input="Answer in JSON",
        temperature=0,
        max_output_tokens=40,
        text={"format": {"type": "json_schema", "name": "answer", "schema": schema, "strict": True}},
    )
    assert r.status == "completed" and isinstance(json.loads(r.output_text)["ok"], bool)
    assert r.text is not None and r.text.format.type == "json_schema"  # type: ignore[union-attr]
    assert (await aclient.responses.retrieve(r.id)).text == r.text


@pytest.fixture
async def paced(nats_server: NatsServer, registry: Registry) -> AsyncIterator[Gateway]:
    """A gateway of the test's own and a worker of `tiny-solo` that takes 50 ms a token."""
    async with (
        running_paced_worker(nats_server.url, registry, "tiny-solo", 0.05, worker_id="paced-responses", slots=2),
        running_gateway(nats_server.url, registry) as gw,
    ):
        await wait_until(lambda: gw.core.workers.model_state("tiny-solo") == "ready")
        yield gw


async def test_a_stream_that_fails_midway_ends_with_an_error_event_and_response_failed(
    paced: Gateway, aclient: AsyncOpenAI
) -> None:
    async with sdk(paced.lite_url) as client:
        stream = await client.responses.create(model="tiny-solo", input="Go on", max_output_tokens=200, stream=True)
        events = []
        drain: asyncio.Task[None] | None = None
        async for event in stream:
            events.append(event)
            if event.type == "response.output_text.delta" and drain is None:
                # The gateway shuts down with no time left for open streams: they end with a retryable error.
                drain = asyncio.create_task(paced.core.drain(0))
        assert drain is not None
        await drain
    types = [e.type for e in events]
    assert types[:4] == STREAM_ORDER and types[-2:] == ["error", "response.failed"], types
    error, failed = events[-2], events[-1]
    assert error.code == "service_unavailable" and error.message  # type: ignore[union-attr]
    assert failed.response.status == "failed" and failed.response.error is not None  # type: ignore[union-attr]
    assert failed.response.error.code == "server_error"  # type: ignore[union-attr]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    # Not stored (asked of another gateway on the same NATS): a failed turn cannot be continued.
    with pytest.raises(openai.NotFoundError):
        await aclient.responses.retrieve(failed.response.id)  # type: ignore[union-attr]


async def test_the_stored_record_is_messagepack_in_a_bucket_with_the_configured_ttl(
    aclient: AsyncOpenAI, gateway: Gateway
) -> None:
    r = await aclient.responses.create(input="Store me", **SHORT)
    kv = await gateway.core.js.key_value(subjects.RESPONSES_BUCKET)
    entry = await kv.get(subjects.response_key(r.id))
    assert entry.value is not None
    record = response_decoder.decode(entry.value)
    assert record.id == r.id and record.output.content == [r.output_text]
    assert [(i.role, i.content) for i in record.conversation] == [("user", ["Store me"])]
    info = await gateway.core.js.stream_info(subjects.kv_stream(subjects.RESPONSES_BUCKET))
    assert info.config.max_age == gateway.core.settings.responses_ttl == 30 * 24 * 3600


async def test_the_gateways_nats_user_may_store_and_read_responses(registry: Registry, tmp_path: Path) -> None:
    token = "responses-internal-token"
    server = NatsServer(tmp_path / "data", token=token).start()
    try:
        async with (
            running_worker(server.url, registry, "tiny-solo", worker_id="auth-responses", internal_token=token),
            running_gateway(server.url, registry, internal_token=token) as gw,
        ):
            await wait_until(lambda: gw.core.workers.model_state("tiny-solo") == "ready")
            async with sdk(gw.lite_url) as client:
                first = await client.responses.create(**{**SHORT, "model": "tiny-solo"}, input="Hi")
                second = await client.responses.create(
                    **{**SHORT, "model": "tiny-solo"}, previous_response_id=first.id, input="Again"
                )
                assert second.usage is not None and first.usage is not None
                assert second.usage.input_tokens > first.usage.input_tokens
                await client.responses.delete(first.id)
    finally:
        server.stop()


async def test_a_bucket_lost_with_the_nats_store_is_made_again_on_the_next_write(
    aclient: AsyncOpenAI, gateway: Gateway
) -> None:
    before = await aclient.responses.create(input="Before", **SHORT)
    await gateway.core.js.delete_key_value(subjects.RESPONSES_BUCKET)
    with pytest.raises(openai.NotFoundError):
        await aclient.responses.retrieve(before.id)
    after = await aclient.responses.create(input="After", **SHORT)
    assert (await aclient.responses.retrieve(after.id)).output_text == after.output_text
