"""The engine contract: what every engine behind the real worker and nats-server must do.

Not collected on its own: each engine's module (`test_vllm_contract.py`, `test_openvino_contract.py`)
imports these tests and provides the fixtures `worker` (module-scoped, serving MODEL_ID with the adapters
alpha and beta from `adapter_dir`), `engine_registry`, `batch_invariant` and `nc`.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import jsonschema
import msgspec
import pytest
from nats.aio.client import Client as NATS

from schemas import subjects
from schemas.errors import CyError, ErrorCode
from schemas.inference import (
    ChatMessage,
    GenerateRequest,
    GenerationParams,
    StreamEnd,
    StreamError,
    TokenChunk,
    Tool,
    ToolFunction,
)
from services.engine.worker import Worker
from services.models.registry import Registry
from tests.helpers import NatsServer, parse_sse, running_gateway, wait_until
from tests.nats_client import Collected, submit

MODEL_ID = "smol-engine"
STORY = "Write a long story about a dragon who learns to bake bread."


def make_adapter_dir(root: Path) -> Path:
    """alpha, beta, gamma: random LoRA adapters that visibly change outputs; broken: a corrupt one."""
    from tests.engine.vllm_support import make_adapter

    for name, seed in (("alpha", 1), ("beta", 2), ("gamma", 3)):
        make_adapter(root / name, seed)
    broken = root / "broken"
    broken.mkdir(exist_ok=True)
    (broken / "adapter_config.json").write_text((root / "alpha" / "adapter_config.json").read_text())
    (broken / "adapter_model.safetensors").write_bytes(b"\xff" * 1000)
    return root


def request(text: str = STORY, *, adapter: str = "", chunk: int = 0, **gen: object) -> GenerateRequest:
    params = GenerationParams(**{"temperature": 0, "max_new_tokens": 24, **gen})  # type: ignore[arg-type]
    return GenerateRequest(
        trace_id=f"t-{uuid.uuid4().hex}",
        model_id=MODEL_ID,
        adapter=adapter,
        messages=[ChatMessage(role="user", content=text)],
        generation=params,
        stream_chunk_size=chunk,
    )


async def ask(nc: NATS, req: GenerateRequest, timeout: float = 120) -> Collected:
    out = await submit(nc, req)
    await asyncio.wait_for(out.done.wait(), timeout)
    return out


def chunks(out: Collected) -> list[TokenChunk]:
    return [r for r in out.replies if isinstance(r, TokenChunk)]


def end(out: Collected) -> StreamEnd:
    assert isinstance(out.end, StreamEnd), out.replies[-1:]
    return out.end


async def test_stream_sends_indexed_chunks_then_an_end_with_true_token_counts(worker: Worker, nc: NATS) -> None:
    out = await ask(nc, request(max_new_tokens=30))
    assert out.worker_id == worker.worker_id
    parts = chunks(out)
    assert len(parts) >= 3
    assert [c.index for c in parts] == list(range(len(parts)))
    assert parts[-1].end_of_stream and parts[-1].finish_reason in ("stop", "length")
    assert not any(c.end_of_stream for c in parts[:-1])
    final = end(out)
    assert final.completion_tokens == sum(c.token_count for c in parts) <= 30
    assert final.chunks == len(parts) and final.prompt_tokens > 10 and final.ttft_ms > 0
    assert out.text.strip()


async def test_chunks_carry_stream_chunk_size_tokens(worker: Worker, nc: NATS) -> None:
    out = await ask(nc, request(max_new_tokens=40, chunk=5))
    parts = chunks(out)
    # The first chunk leaves as soon as there is text (time to first token), the last when it ends.
    middle = parts[1:-1]
    assert middle and all(c.token_count >= 5 for c in middle)
    assert sum(c.token_count == 5 for c in middle) >= len(middle) - 1
    assert end(out).completion_tokens == sum(c.token_count for c in parts)


async def test_greedy_output_is_identical_alone_and_among_concurrent_requests(
    worker: Worker, nc: NATS, batch_invariant: bool
) -> None:
    if not batch_invariant:
        pytest.skip("this engine mode does not promise batch-invariant output (see its own module)")
    alone = await ask(nc, request())
    again = await ask(nc, request())
    others = [request(f"Tell me about number {i}.") for i in range(5)]
    together = await asyncio.gather(ask(nc, request()), *(ask(nc, r) for r in others))
    assert alone.text == again.text == together[0].text
    assert end(alone).completion_tokens == end(together[0]).completion_tokens


async def test_the_seed_makes_sampling_repeatable(worker: Worker, nc: NATS) -> None:
    sampled = {"temperature": 1.2, "top_p": 0.95, "top_k": 50, "max_new_tokens": 20}
    first = await ask(nc, request(seed=1234, **sampled))
    second = await ask(nc, request(seed=1234, **sampled))
    other = await ask(nc, request(seed=99, **sampled))
    assert first.text == second.text != other.text


async def test_penalties_reach_the_engine(worker: Worker, nc: NATS) -> None:
    plain = await ask(nc, request(max_new_tokens=30))
    penalised = await ask(nc, request(max_new_tokens=30, repetition_penalty=3.0))
    presence = await ask(nc, request(max_new_tokens=30, presence_penalty=2.0, frequency_penalty=2.0))
    assert plain.text != penalised.text and plain.text != presence.text


async def test_max_new_tokens_is_honoured_and_reported_as_length(worker: Worker, nc: NATS) -> None:
    out = await ask(nc, request(max_new_tokens=7))
    final = end(out)
    assert final.completion_tokens == 7 and final.finish_reason == "length"
    assert chunks(out)[-1].finish_reason == "length"


async def test_a_stop_string_ends_the_text_before_it_and_the_engine_request(worker: Worker, nc: NATS) -> None:
    full = (await ask(nc, request(max_new_tokens=40))).text
    words = full.split()
    assert len(words) > 6, full
    stop = f" {words[len(words) // 2]}"
    cut = full.index(stop)
    out = await ask(nc, request(max_new_tokens=40, stop=[stop]))
    assert out.text == full[:cut]
    assert end(out).finish_reason == "stop" and end(out).completion_tokens < 40
    await wait_until(lambda: worker.engine.unfinished_requests() == 0, timeout=5)  # type: ignore[attr-defined]


async def test_cancel_aborts_the_request_inside_the_engine(worker: Worker, nc: NATS) -> None:
    req = request(max_new_tokens=1500, temperature=0.8, seed=7)
    out = await submit(nc, req)
    await wait_until(lambda: len(chunks(out)) >= 2, timeout=60)
    assert worker.engine.unfinished_requests() == 1  # type: ignore[attr-defined]
    await nc.publish(subjects.cancel_subject(req.trace_id), b"")
    await asyncio.wait_for(out.done.wait(), 10)
    assert end(out).finish_reason == "cancelled" and end(out).completion_tokens < 1500
    # The request leaves the engine's running set at once: its slot and KV blocks are free again.
    await wait_until(lambda: worker.engine.unfinished_requests() == 0, timeout=5)  # type: ignore[attr-defined]
    assert not worker._active


async def test_an_http_client_that_disconnects_aborts_the_request_inside_the_engine(
    nats_server: NatsServer,
    engine_registry: Registry,
    worker: Worker,
) -> None:
    async with running_gateway(nats_server.url, engine_registry) as gw:
        await wait_until(lambda: gw.core.workers.model_state(MODEL_ID) == "ready")
        payload = {"modelId": MODEL_ID, "prompt": STORY, "generation": {"temperature": 0.8, "maxNewTokens": 1500}}
        async with gw.client() as client, client.stream("POST", "/api/v1/inference/stream", json=payload) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    assert worker.engine.unfinished_requests() == 1  # type: ignore[attr-defined]
                    break
        await wait_until(lambda: worker.engine.unfinished_requests() == 0 and not worker._active, timeout=5)  # type: ignore[attr-defined]
        # ...and the engine keeps serving.
        async with gw.client() as client:
            r = await client.post(
                "/api/v1/inference/stream", json={**payload, "generation": {"temperature": 0, "maxNewTokens": 5}}
            )
        events = parse_sse(r.text)
        assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"


async def test_two_adapters_serve_concurrently_each_as_it_does_alone(worker: Worker, nc: NATS) -> None:
    solo = {name: (await ask(nc, request(adapter=name))).text for name in ("", "alpha", "beta")}
    assert len(set(solo.values())) == 3, solo  # the adapters really change the model
    names = ["alpha", "beta", "", "beta", "alpha"]
    together = await asyncio.gather(*(ask(nc, request(adapter=n)) for n in names))
    assert [o.text for o in together] == [solo[n] for n in names]


async def test_an_unknown_adapter_is_model_not_found(worker: Worker, nc: NATS) -> None:
    out = await ask(nc, request(adapter="no-such-adapter"))
    assert isinstance(out.end, StreamError) and out.end.code == ErrorCode.MODEL_NOT_FOUND
    assert "no-such-adapter" in out.end.message and not chunks(out)


async def test_an_adapter_registered_while_running_serves_at_once_and_stops_when_unregistered(
    worker: Worker, nc: NATS, adapter_dir: Path
) -> None:
    base = (await ask(nc, request())).text
    await worker.engine.register_adapter("gamma", str(adapter_dir / "gamma"))  # type: ignore[attr-defined]
    assert "gamma" in worker.info().models[0].adapters
    out = await ask(nc, request(adapter="gamma"))
    assert end(out).completion_tokens > 0 and out.text != base
    await worker.engine.unregister_adapter("gamma")  # type: ignore[attr-defined]
    gone = await ask(nc, request(adapter="gamma"))
    assert isinstance(gone.end, StreamError) and gone.end.code == ErrorCode.MODEL_NOT_FOUND


async def test_a_broken_adapter_is_refused_at_registration_and_the_engine_keeps_serving(
    worker: Worker, nc: NATS, adapter_dir: Path
) -> None:
    with pytest.raises(CyError) as err:
        await worker.engine.register_adapter("broken", str(adapter_dir / "broken"))  # type: ignore[attr-defined]
    assert err.value.code == ErrorCode.INVALID_REQUEST and "broken" in err.value.body.message
    # Replacing a good adapter with broken files keeps the good one.
    with pytest.raises(CyError):
        await worker.engine.register_adapter("alpha", str(adapter_dir / "broken"))  # type: ignore[attr-defined]
    assert worker.engine.adapters() == ["alpha", "beta"]
    assert end(await ask(nc, request(adapter="alpha", max_new_tokens=4))).completion_tokens == 4
    assert end(await ask(nc, request(max_new_tokens=4))).completion_tokens == 4


async def test_logprobs_cover_every_token_with_its_text_and_greedy_picks_the_top_alternative(
    worker: Worker, nc: NATS
) -> None:
    out = await ask(nc, request(max_new_tokens=12, logprobs=True, top_logprobs=3))
    entries = [e for c in chunks(out) for e in c.logprobs]
    assert len(entries) == end(out).completion_tokens == 12
    assert "".join(e.token for e in entries) == out.text
    for e in entries:
        assert e.logprob <= 0 and len(e.top) == 3
        assert [t.logprob for t in e.top] == sorted((t.logprob for t in e.top), reverse=True)
        assert e.top[0].token_id == e.token_id and abs(e.top[0].logprob - e.logprob) < 1e-3
    # Without logprobs asked, none travel.
    assert not any(c.logprobs for c in chunks(await ask(nc, request(max_new_tokens=4))))


async def test_json_schema_constrains_the_output_beside_free_requests(worker: Worker, nc: NATS) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    constrained = request("Describe a person as JSON.", max_new_tokens=48, json_schema=json.dumps(schema))
    outs = await asyncio.gather(ask(nc, constrained), ask(nc, request(max_new_tokens=16)))
    assert end(outs[0]).finish_reason == "stop", outs[0].text
    jsonschema.validate(json.loads(outs[0].text), schema)
    assert outs[1].text.strip()


async def test_tools_reach_the_prompt(worker: Worker, nc: NATS) -> None:
    plain = request("What is the weather in Paris?", max_new_tokens=2)
    with_tools = msgspec.structs.replace(
        request("What is the weather in Paris?", max_new_tokens=2),
        tools=[Tool(function=ToolFunction(name="get_weather", parameters={"type": "object"}))],
    )
    a, b = await asyncio.gather(ask(nc, plain), ask(nc, with_tools))
    assert end(b).prompt_tokens > end(a).prompt_tokens + 50
