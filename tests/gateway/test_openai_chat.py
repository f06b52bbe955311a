"""/v1/chat/completions driven by the official `openai` package (sync and async clients), against a real
HTTP server, a real nats-server and the tiny random-weight model (the registry's default)."""

from __future__ import annotations

import asyncio
from typing import Any

import structlog
from openai import AsyncOpenAI, OpenAI
from transformers import AutoTokenizer

from services.engine.worker import Worker
from services.models.registry import Registry
from tests.helpers import Gateway, wait_until

GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": 12}
HELLO = [{"role": "user", "content": "Hello there"}]


async def test_chat_completion_has_the_openai_shape_and_true_usage(aclient: AsyncOpenAI) -> None:
    r = await aclient.chat.completions.create(model="default", messages=HELLO, **GREEDY)  # type: ignore[arg-type]
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == "default"
    assert isinstance(r.created, int) and len(r.choices) == 1
    choice = r.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert r.usage is not None
    assert 0 < r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


async def test_the_models_chat_template_formats_system_user_and_assistant_turns(
    aclient: AsyncOpenAI, registry: Registry
) -> None:
    conversation = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": [{"type": "text", "text": "How are"}, {"type": "text", "text": "you?"}]},
    ]
    r = await aclient.chat.completions.create(model="tiny", messages=conversation, **GREEDY)  # type: ignore[arg-type]
    tokenizer = AutoTokenizer.from_pretrained(registry.models["tiny"].model_path)
    expected = [dict(m) for m in conversation]
    expected[3]["content"] = "How are\nyou?"
    ids = tokenizer.apply_chat_template(expected, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert r.usage is not None and r.usage.prompt_tokens == len(ids["input_ids"])


async def test_streamed_content_equals_the_non_streamed_content_for_greedy_decoding(sync_client: OpenAI) -> None:
    def run() -> tuple[str, list[Any]]:
        full = sync_client.chat.completions.create(model="default", messages=HELLO, **GREEDY)  # type: ignore[arg-type]
        with sync_client.chat.completions.create(model="default", messages=HELLO, stream=True, **GREEDY) as stream:  # type: ignore[arg-type]
            chunks = list(stream)
        return full.choices[0].message.content or "", chunks

    text, chunks = await asyncio.to_thread(run)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert all(c.object == "chat.completion.chunk" and c.model == "default" for c in chunks)
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert all(c.usage is None for c in chunks)  # usage only when stream_options.include_usage


async def test_hitting_max_tokens_gives_finish_reason_length_and_max_completion_tokens_wins(
    aclient: AsyncOpenAI,
) -> None:
    r = await aclient.chat.completions.create(model="default", messages=HELLO, temperature=0, max_tokens=5)
    assert r.choices[0].finish_reason == "length" and r.usage is not None and r.usage.completion_tokens == 5
    r = await aclient.chat.completions.create(
        model="default", messages=HELLO, temperature=0, max_tokens=50, max_completion_tokens=3
    )
    assert r.choices[0].finish_reason == "length" and r.usage is not None and r.usage.completion_tokens == 3


async def test_include_usage_adds_a_last_chunk_with_no_choices_and_the_true_usage(aclient: AsyncOpenAI) -> None:
    full = await aclient.chat.completions.create(model="default", messages=HELLO, **GREEDY)  # type: ignore[arg-type]
    stream = await aclient.chat.completions.create(
        model="default",
        messages=HELLO,  # type: ignore[arg-type]
        stream=True,
        stream_options={"include_usage": True},
        **GREEDY,
    )
    chunks = [c async for c in stream]
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.model_dump() == full.usage.model_dump()  # type: ignore[union-attr]
    assert all(c.usage is None and len(c.choices) == 1 for c in chunks[:-1])
    assert chunks[-2].choices[0].finish_reason == full.choices[0].finish_reason


async def test_stop_strings_end_the_text_before_the_stop_text(aclient: AsyncOpenAI) -> None:
    params: dict[str, Any] = {"model": "default", "messages": HELLO, "temperature": 0, "max_tokens": 30}
    text = (await aclient.chat.completions.create(**params)).choices[0].message.content or ""
    assert len(text) > 10, text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    expected = text[: text.find(stop)]
    r = await aclient.chat.completions.create(**params, stop=[stop, "never-appears-xyz"])
    assert r.choices[0].message.content == expected and r.choices[0].finish_reason == "stop"
    stream = await aclient.chat.completions.create(**params, stop=stop, stream=True)
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_the_same_seed_gives_the_same_text_and_n_choices_get_their_own_seeds(aclient: AsyncOpenAI) -> None:
    params: dict[str, Any] = {"model": "default", "messages": HELLO, "temperature": 1.0, "top_p": 1.0, "max_tokens": 8}
    a = await aclient.chat.completions.create(**params, seed=1234)
    b = await aclient.chat.completions.create(**params, seed=1234)
    c = await aclient.chat.completions.create(**params, seed=99)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert c.choices[0].message.content != a.choices[0].message.content
    three = await aclient.chat.completions.create(**params, seed=1234, n=3)
    texts = [ch.message.content for ch in three.choices]
    assert [ch.index for ch in three.choices] == [0, 1, 2]
    assert texts[0] == a.choices[0].message.content  # choice 0 keeps the request's seed
    assert len(set(texts)) == 3
    assert three.usage is not None and a.usage is not None
    assert three.usage.prompt_tokens == a.usage.prompt_tokens  # the prompt counts once
    if all(ch.finish_reason == "length" for ch in three.choices):
        assert three.usage.completion_tokens == 3 * 8


async def test_n_streamed_choices_each_get_an_opening_deltas_and_a_finish(aclient: AsyncOpenAI) -> None:
    stream = await aclient.chat.completions.create(
        model="default", messages=HELLO, n=2, temperature=0.9, seed=7, max_tokens=8, stream=True
    )
    chunks = [c async for c in stream]
    by_index: dict[int, list[Any]] = {0: [], 1: []}
    for c in chunks:
        (choice,) = c.choices
        by_index[choice.index].append(choice)
    for choices in by_index.values():
        assert choices[0].delta.role == "assistant"
        assert choices[-1].finish_reason == "length"
        assert all(ch.finish_reason is None for ch in choices[:-1])


async def test_a_client_that_disconnects_mid_stream_aborts_the_generation(
    aclient: AsyncOpenAI, tiny_worker: Worker
) -> None:
    with structlog.testing.capture_logs() as logs:
        stream = await aclient.chat.completions.create(
            model="default", messages=[{"role": "user", "content": "go on"}], temperature=0, max_tokens=200, stream=True
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                break
        await stream.close()
        await wait_until(lambda: any(e["event"] == "generation" for e in logs), timeout=10)
        await wait_until(lambda: tiny_worker.engine.busy == 0 and not tiny_worker._active, timeout=5)
    generation = next(e for e in logs if e["event"] == "generation")
    assert generation["outcome"] == "cancelled", generation
    request = next(e for e in logs if e["event"] == "request" and e.get("outcome"))
    assert request["outcome"] == "client_disconnected"


async def test_a_client_that_gives_up_on_a_non_streamed_request_aborts_it_and_frees_its_slot(
    gateway: Gateway, aclient: AsyncOpenAI, tiny_worker: Worker
) -> None:
    with structlog.testing.capture_logs() as logs:
        task = asyncio.create_task(
            aclient.chat.completions.create(
                model="default", messages=[{"role": "user", "content": "go on"}], temperature=0, max_tokens=200
            )
        )
        await wait_until(lambda: bool(tiny_worker._active), timeout=10)
        task.cancel()
        await wait_until(lambda: any(e["event"] == "generation" for e in logs), timeout=10)
        await wait_until(lambda: gateway.core.open_requests == 0, timeout=5)
    assert next(e for e in logs if e["event"] == "generation")["outcome"] == "cancelled"
    assert tiny_worker.engine.busy == 0
