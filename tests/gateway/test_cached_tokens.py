"""Cached prompt tokens end to end: a `cpu-openvino` worker (the default CPU engine, prefix caching on) on the bundled
SmolLM2, behind a real gateway, asked through /api/v1 and the official `openai` package; and the worker's metrics.

Each test sends prompts no other test sent (a uuid first), so its first request finds nothing in the cache.
A repeated prompt finds its full blocks of 32 tokens: all of its prompt but the last, partial block, whose key
also covered the tokens generated after it.
"""

from __future__ import annotations

import importlib.util
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from openai import AsyncOpenAI

from services.engine.worker import Worker
from services.models.registry import ModelSpec, Registry
from tests.gateway.conftest import sdk
from tests.helpers import Gateway, NatsServer, real_model_dir, running_gateway, running_worker, wait_until
from tests.test_metrics import sample, scrape, worker_url

needs_openvino = pytest.mark.skipif(
    importlib.util.find_spec("openvino_genai") is None, reason="openvino-genai is not installed"
)

MODEL = "smol-cache"
BLOCK = 32  # the pipeline's KV block on CPU (measured at the worker's start: engine_loaded kv_block_size)
GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": 4}


def long_text() -> str:
    """A prompt of ~250 tokens that no request sent before."""
    return f"{uuid.uuid4().hex} " + " ".join(f"Row {i} lists a {uuid.uuid4().hex[:4]} lamp." for i in range(25))


@pytest.fixture(scope="module")
async def ov(nats_server: NatsServer) -> AsyncIterator[tuple[Gateway, Worker]]:
    spec = ModelSpec(
        name="SmolLM2 on OpenVINO", model_path=str(real_model_dir()), engine="cpu-openvino", max_model_len=2048
    )
    registry = Registry(default=MODEL, models={MODEL: spec})
    async with (
        running_worker(nats_server.url, registry, MODEL, worker_id=f"cache-{uuid.uuid4().hex[:6]}", slots=4) as worker,
        running_gateway(nats_server.url, registry) as gw,
    ):
        await wait_until(lambda: gw.core.workers.model_state(MODEL) == "ready", timeout=60)
        yield gw, worker


@pytest.fixture
async def openai_client(ov: tuple[Gateway, Worker]) -> AsyncIterator[AsyncOpenAI]:
    async with sdk(ov[0].lite_url) as client:
        yield client


def assert_repeat_hit(first: int, again: int, prompt_tokens: int) -> None:
    assert first == 0
    assert prompt_tokens - BLOCK < again <= prompt_tokens, (again, prompt_tokens)


@pytest.mark.slow
@needs_openvino
async def test_a_repeated_long_prompt_reports_its_cached_tokens_in_api_v1_usage(ov: tuple[Gateway, Worker]) -> None:
    body = {"modelId": MODEL, "prompt": long_text(), "generation": {"temperature": 0, "maxNewTokens": 4}}
    async with ov[0].client() as client:
        usages = [(await client.post("/api/v1/inference", json=body)).json()["usage"] for _ in range(2)]
    first, again = usages
    assert first["prompt_tokens"] == again["prompt_tokens"] > 200
    assert_repeat_hit(first["cachedTokens"], again["cachedTokens"], again["prompt_tokens"])
    assert again["total_tokens"] == again["prompt_tokens"] + again["completion_tokens"]  # the spec's fields stay


@pytest.mark.slow
@needs_openvino
async def test_chat_completions_report_cached_tokens_streamed_or_not(openai_client: AsyncOpenAI) -> None:
    messages: Any = [{"role": "user", "content": long_text()}]
    first = await openai_client.chat.completions.create(model=MODEL, messages=messages, **GREEDY)
    again = await openai_client.chat.completions.create(model=MODEL, messages=messages, **GREEDY)
    assert first.usage and first.usage.prompt_tokens_details and again.usage and again.usage.prompt_tokens_details
    assert_repeat_hit(
        first.usage.prompt_tokens_details.cached_tokens or 0,
        again.usage.prompt_tokens_details.cached_tokens or 0,
        again.usage.prompt_tokens,
    )
    stream = await openai_client.chat.completions.create(
        model=MODEL, messages=messages, stream=True, stream_options={"include_usage": True}, **GREEDY
    )
    usage = [chunk.usage async for chunk in stream if chunk.usage][-1]
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens - BLOCK < (usage.prompt_tokens_details.cached_tokens or 0) <= usage.prompt_tokens


@pytest.mark.slow
@needs_openvino
async def test_completions_report_cached_tokens_streamed_or_not(openai_client: AsyncOpenAI) -> None:
    prompt = long_text()
    first = await openai_client.completions.create(model=MODEL, prompt=prompt, **GREEDY)
    stream = await openai_client.completions.create(
        model=MODEL, prompt=prompt, stream=True, stream_options={"include_usage": True}, **GREEDY
    )
    usage = [chunk.usage async for chunk in stream if chunk.usage][-1]
    assert first.usage and first.usage.prompt_tokens_details and usage.prompt_tokens_details
    assert_repeat_hit(
        first.usage.prompt_tokens_details.cached_tokens or 0,
        usage.prompt_tokens_details.cached_tokens or 0,
        usage.prompt_tokens,
    )


@pytest.mark.slow
@needs_openvino
async def test_a_responses_conversation_reports_its_earlier_turns_as_cached(openai_client: AsyncOpenAI) -> None:
    """The second turn's prompt begins with the first turn's whole conversation: the prefix cache has it."""
    first = await openai_client.responses.create(model=MODEL, input=long_text(), max_output_tokens=4, temperature=0)
    again = await openai_client.responses.create(
        model=MODEL, input="And then?", previous_response_id=first.id, max_output_tokens=4, temperature=0
    )
    assert first.usage and again.usage
    assert first.usage.input_tokens_details.cached_tokens == 0
    assert first.usage.input_tokens - BLOCK < again.usage.input_tokens_details.cached_tokens < again.usage.input_tokens


@pytest.mark.slow
@needs_openvino
async def test_the_worker_counts_prefix_cache_queries_and_hits_and_shows_kv_usage_while_it_runs(
    ov: tuple[Gateway, Worker], openai_client: AsyncOpenAI
) -> None:
    worker = ov[1]
    labels = {"worker": worker.worker_id, "model": MODEL}
    before = await scrape(worker_url(worker))
    prompt = long_text()
    usages = [(await openai_client.completions.create(model=MODEL, prompt=prompt, **GREEDY)).usage for _ in range(2)]
    after = await scrape(worker_url(worker))
    assert usages[0] and usages[1] and usages[1].prompt_tokens_details
    hits = sample(after, "cy_llm:prefix_cache_hits_total", **labels) - sample(
        before, "cy_llm:prefix_cache_hits_total", **labels
    )
    queries = sample(after, "cy_llm:prefix_cache_queries_total", **labels) - sample(
        before, "cy_llm:prefix_cache_queries_total", **labels
    )
    assert hits == usages[1].prompt_tokens_details.cached_tokens > 0
    assert queries == usages[0].prompt_tokens + usages[1].prompt_tokens
    # Idle: no sequence holds a block, nothing waits.
    assert "cy_llm:kv_cache_usage_perc{" in after and "cy_llm:num_requests_waiting{" in after
    assert sample(after, "cy_llm:kv_cache_usage_perc", **labels) == 0
    assert sample(after, "cy_llm:num_requests_waiting", **labels) == 0

    stream = await openai_client.completions.create(model=MODEL, prompt=long_text(), max_tokens=200, stream=True)
    during = ""
    async for _ in stream:
        if not during:
            during = await scrape(worker_url(worker))
    # ~250 prompt tokens in blocks of 32, out of the cache's thousands (2 GB): a small fraction, not nothing.
    assert 0 < sample(during, "cy_llm:kv_cache_usage_perc", **labels) < 0.05


async def test_an_engine_without_a_prefix_cache_reports_zero_cached_tokens(gateway: Gateway) -> None:
    """The session's tiny model runs on the transformers engine: no prefix cache, so never a cached token."""
    async with sdk(gateway.lite_url) as client:
        for _ in range(2):
            r = await client.completions.create(model="tiny", prompt="Hello there, hello there", **GREEDY)
            assert r.usage and r.usage.prompt_tokens_details
            assert r.usage.prompt_tokens_details.cached_tokens == 0
    async with gateway.client() as api:
        body = {"modelId": "tiny", "prompt": "Hello there", "generation": {"maxNewTokens": 4}}
        assert (await api.post("/api/v1/inference", json=body)).json()["usage"]["cachedTokens"] == 0
