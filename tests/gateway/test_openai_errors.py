"""Errors of the Lite API in OpenAI's shape, so the official SDK raises its typed exceptions; auth, rate
limits, parameters refused rather than ignored, keep-alives while a stream waits."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
import structlog
from openai import AsyncOpenAI

from gateway.openai.protocol import ChatCompletionRequest, CompletionRequest, Message
from gateway.openai.translate import plan_chat, plan_completion
from schemas import subjects
from schemas.inference import GenerationParams
from services.models.registry import Registry
from tests.gateway.conftest import sdk
from tests.helpers import Gateway, NatsServer, announce_ghost_worker, running_gateway, wait_until

HELLO = [{"role": "user", "content": "Hello there"}]


async def chat(client: AsyncOpenAI, **params: Any) -> Any:
    params.setdefault("model", "default")
    params.setdefault("messages", HELLO)
    params.setdefault("max_tokens", 4)
    return await client.chat.completions.create(**params)


async def test_an_unknown_model_raises_not_found_naming_the_model(aclient: AsyncOpenAI) -> None:
    for stream in (False, True):
        with pytest.raises(openai.NotFoundError) as err:
            await chat(aclient, model="no-such-model", stream=stream)
        assert err.value.code == "model_not_found" and err.value.param == "model"
        assert "no-such-model" in err.value.message
    with pytest.raises(openai.NotFoundError):
        await aclient.completions.create(model="no-such-model", prompt="x")


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"temperature": 5}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"n": 17}, "n"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        ({"stop": ""}, "stop"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
    ],
)
async def test_bad_values_raise_bad_request_naming_the_parameter(
    aclient: AsyncOpenAI, params: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        await chat(aclient, **params)
    assert err.value.param == param and err.value.type == "invalid_request_error", err.value.body


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"logit_bias": {"42": 10}}, "logit_bias"),
        ({"functions": [{"name": "f", "parameters": {"type": "object"}}]}, "functions"),
        ({"store": True}, "store"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"messages": [{"role": "function", "content": "42", "name": "f"}]}, "messages[0]"),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}
                ]
            },
            "messages[0].content[0]",
        ),
    ],
)
async def test_parameters_the_engine_cannot_honour_are_refused_not_ignored(
    aclient: AsyncOpenAI, params: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        await chat(aclient, **params)
    assert err.value.param == param, err.value.body
    assert err.value.code in ("unsupported_parameter", "unsupported_content")


async def test_an_unrecognised_parameter_is_refused_and_vllm_style_extensions_are_accepted(
    aclient: AsyncOpenAI,
) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        await chat(aclient, extra_body={"frobnicate": 1})
    assert err.value.param == "frobnicate" and err.value.code == "unknown_parameter"
    assert "Unrecognized request argument supplied: frobnicate" in err.value.message
    r = await chat(aclient, extra_body={"top_k": 20, "repetition_penalty": 1.2}, seed=3)
    assert r.choices[0].message.content


async def test_harmless_openai_fields_are_accepted_and_user_travels_as_the_player(aclient: AsyncOpenAI) -> None:
    with structlog.testing.capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        r = await chat(
            aclient,
            user="player-42",
            metadata={"tenant": "tenant-7", "locale": "zh-CN"},
            logprobs=False,
            service_tier="auto",
            store=False,
            parallel_tool_calls=False,
            response_format={"type": "text"},
            messages=[{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi", "name": "ann"}],
        )
    assert r.choices[0].finish_reason in ("stop", "length")
    line = next(e for e in logs if e["event"] == "request" and e.get("service") == "gateway-lite")
    assert (line["player_id"], line["tenant"], line["locale"]) == ("player-42", "tenant-7", "zh-CN")
    generation = next(e for e in logs if e["event"] == "generation")
    assert generation["player_id"] == "player-42"


async def test_a_prompt_longer_than_the_context_is_a_400_even_when_streaming(aclient: AsyncOpenAI) -> None:
    long = [{"role": "user", "content": "word " * 400}]
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as err:
            await chat(aclient, messages=long, stream=stream)
        assert err.value.code == "context_length_exceeded" and "context" in err.value.message


async def test_a_model_without_workers_is_a_retryable_503(aclient: AsyncOpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as err:
        await chat(aclient, model="unserved")
    assert err.value.status_code == 503 and err.value.code == "service_unavailable"
    assert err.value.response.headers["retry-after"] == "5"
    assert err.value.response.headers["x-should-retry"] == "true"


async def test_malformed_json_and_unknown_routes_get_openai_shaped_errors(gateway: Gateway) -> None:
    async with httpx.AsyncClient(base_url=gateway.lite_url or "", timeout=30) as http:
        bad = await http.post(
            "/chat/completions", content=b'{"messages": [', headers={"Content-Type": "application/json"}
        )
        nowhere = await http.get("/embeddings")
        empty = await http.post("/chat/completions")
        huge = await http.post(
            "/completions",
            content=b'{"prompt": "' + b"x" * 1_100_000 + b'"}',
            headers={"Content-Type": "application/json"},
        )
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"
    assert nowhere.status_code == 404 and nowhere.headers["x-should-retry"] == "false"
    assert nowhere.json() == {
        "error": {
            "message": "Invalid URL (GET /v1/embeddings)",
            "type": "invalid_request_error",
            "param": None,
            "code": "unknown_url",
        }
    }
    assert empty.status_code == 400 and set(empty.json()["error"]) == {"message", "type", "param", "code"}
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "request_too_large"


async def test_curl_style_requests_get_the_spec_defaults(gateway: Gateway) -> None:
    """The spec's curl example needs no `model` ("default"); unset sampling fields get the spec's defaults."""
    async with httpx.AsyncClient(base_url=gateway.lite_url or "", timeout=60) as http:
        r = await http.post(
            "/chat/completions", json={"messages": [{"role": "user", "content": "你好"}], "max_tokens": 3}
        )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "default" and body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant" and r.headers["x-request-id"] == body["id"]
    plan = plan_chat(gateway.core, ChatCompletionRequest(messages=[Message(role="user", content="x")]))
    assert plan.requests[0].model_id == "tiny"
    assert plan.requests[0].generation == GenerationParams(
        max_new_tokens=256, temperature=0.7, top_p=0.9, repetition_penalty=1.0
    )
    completion = plan_completion(gateway.core, CompletionRequest(prompt="x"))
    assert completion.requests[0].generation.max_new_tokens == 16  # OpenAI's and vLLM's default


# --- gateways of their own -----------------------------------------------------------------------------------


@pytest.fixture
async def token_gateway(nats_server: NatsServer, registry: Registry, gateway: Gateway) -> AsyncIterator[Gateway]:
    """GATEWAY_API_TOKEN set (two clients' tokens), one request per minute per token."""
    async with running_gateway(
        nats_server.url, registry, gateway_api_token="tok-a, tok-b", rate_limit_per_minute=1
    ) as gw:
        await wait_until(lambda: gw.core.workers.model_state("tiny") == "ready")
        yield gw


async def test_a_bearer_token_is_required_when_gateway_api_token_is_set(token_gateway: Gateway) -> None:
    url = token_gateway.lite_url
    wrong = sdk(url, api_key="nope")
    with pytest.raises(openai.AuthenticationError) as err:
        await wrong.models.list()
    assert err.value.code == "invalid_api_key"
    async with httpx.AsyncClient(base_url=url or "", timeout=30) as http:
        missing = await http.get("/models")
        assert missing.status_code == 401 and "Authorization: Bearer" in missing.json()["error"]["message"]
        base = (url or "").removesuffix("/v1")
        assert (await http.get(f"{base}/health")).json() == {"status": "ok"}  # probes need no token
        assert (await http.get(f"{base}/ready")).status_code == 200
    right = sdk(url, api_key="tok-b")
    assert any(m.id == "tiny" for m in (await right.models.list()).data)
    await wrong.close()
    await right.close()


async def test_the_per_token_rate_limit_raises_rate_limit_error_with_retry_after(token_gateway: Gateway) -> None:
    a, b = sdk(token_gateway.lite_url, api_key="tok-a"), sdk(token_gateway.lite_url, api_key="tok-b")
    await chat(a)
    with pytest.raises(openai.RateLimitError) as err:
        await chat(a, stream=True)
    assert err.value.status_code == 429 and err.value.type == "rate_limit_error"
    assert int(err.value.response.headers["retry-after"]) >= 1
    await chat(b)  # another client's token has its own budget
    await a.close()
    await b.close()


async def test_a_stream_waiting_in_the_queue_sends_keepalives_then_an_error_event(
    nats_server: NatsServer, registry: Registry, gateway: Gateway
) -> None:
    """A worker that announces "unserved" but never pulls: the stream starts after the first-reply grace, keeps
    the connection alive with SSE comments, and ends with an OpenAI-shaped error event when the queue wait
    runs out (the SDK raises APIError)."""
    async with running_gateway(nats_server.url, registry, queue_timeout=3.0, keepalive_interval=0.25) as gw:
        await announce_ghost_worker(gw, "ghost-lite")
        client = sdk(gw.lite_url)
        try:
            body = {"model": "unserved", "messages": HELLO, "stream": True}

            async def raw() -> str:
                async with httpx.AsyncClient(base_url=gw.lite_url or "", timeout=30) as http:
                    r = await http.post("/chat/completions", json=body)
                    assert r.status_code == 200
                    return r.text

            async def with_sdk() -> None:
                stream = await client.chat.completions.create(model="unserved", messages=HELLO, stream=True)  # type: ignore[arg-type]
                with pytest.raises(openai.APIError, match="picked up"):
                    async for _ in stream:
                        pass

            text, _ = await asyncio.gather(raw(), with_sdk())
            assert gw.core.open_requests == 0  # both streams gave their slots back
        finally:
            await client.close()
            kv = await gw.core.js.key_value(subjects.WORKERS_BUCKET)
            await kv.delete(subjects.worker_key("ghost-lite"))
            await gw.core.js.purge_stream(subjects.GENERATE_STREAM, subject=subjects.model_requests_filter("unserved"))
    assert text.count(": keep-alive") >= 2
    events = [line.removeprefix("data: ") for line in text.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert set(last["error"]) == {"message", "type", "param", "code"}
    assert last["error"]["code"] == "service_unavailable"
