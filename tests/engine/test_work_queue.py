"""Dispatch through the JetStream work queue: priority tiers, worker hints, bounded queue."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from nats.js.errors import APIError

from schemas import subjects
from schemas.inference import GenerationParams
from services import jetstream
from services.models.registry import Registry
from tests.helpers import NatsServer, running_worker
from tests.nats_client import connect, request, submit


async def test_high_priority_requests_start_before_queued_low_priority_ones(
    nats_server: NatsServer, registry: Registry
) -> None:
    nc = await connect(nats_server.url)
    await jetstream.ensure_generate_stream(nc.jetstream(), 1000)
    # Queue while no worker serves the model: 3 low first, then 3 high.
    low = [await submit(nc, request("tiny-solo", f"low {i}", priority=-1)) for i in range(3)]
    high = [await submit(nc, request("tiny-solo", f"high {i}", priority=5)) for i in range(3)]
    finished: list[str] = []

    async def record(name: str, c) -> None:  # type: ignore[no-untyped-def]
        await c.done.wait()
        finished.append(name)

    waits = [record("low", c) for c in low] + [record("high", c) for c in high]
    async with running_worker(nats_server.url, registry, "tiny-solo", worker_id="prio-w", slots=1):
        await asyncio.wait_for(asyncio.gather(*waits), 60)
    await nc.drain()
    assert finished == ["high"] * 3 + ["low"] * 3


async def test_worker_hint_sends_requests_to_the_named_live_worker(nats_server: NatsServer, registry: Registry) -> None:
    nc = await connect(nats_server.url)
    async with (
        running_worker(nats_server.url, registry, "tiny-solo", worker_id="hint-a", slots=4),
        running_worker(nats_server.url, registry, "tiny-solo", worker_id="hint-b", slots=4),
    ):
        hinted = [
            await submit(
                nc, request("tiny-solo", f"q{i}", worker_hint="hint-b"), subjects.hinted_subject("tiny-solo", "hint-b")
            )
            for i in range(6)
        ]
        await asyncio.wait_for(asyncio.gather(*(c.done.wait() for c in hinted)), 60)
    await nc.drain()
    assert {c.worker_id for c in hinted} == {"hint-b"}


async def test_a_full_queue_refuses_the_publish_at_once(tmp_path: Path) -> None:
    server = NatsServer(tmp_path).start()
    try:
        nc = await connect(server.url)
        js = nc.jetstream()
        await jetstream.ensure_generate_stream(js, 3)
        for i in range(3):
            await submit(nc, request("nobody-serves-this", f"q{i}"))
        with pytest.raises(APIError) as err:
            await submit(nc, request("nobody-serves-this", "one too many"))
        assert err.value.err_code == 10077
        await nc.drain()
    finally:
        server.stop()


async def test_a_request_past_its_deadline_is_refused_by_the_worker(
    nats_server: NatsServer, registry: Registry
) -> None:
    nc = await connect(nats_server.url)
    async with running_worker(nats_server.url, registry, "tiny-solo", worker_id="deadline-w", slots=1):
        late = await submit(nc, request("tiny-solo", deadline_ms=1))
        await asyncio.wait_for(late.done.wait(), 30)
    await nc.drain()
    assert late.end is not None and getattr(late.end, "code", None) == "INSUFFICIENT_RESOURCES"


async def test_chunks_carry_stream_chunk_size_tokens_after_the_first(nats_server: NatsServer, tiny_worker) -> None:  # type: ignore[no-untyped-def]
    from schemas.inference import StreamEnd, TokenChunk

    nc = await connect(nats_server.url)
    got = await submit(
        nc, request("tiny", "count", stream_chunk_size=3, generation=GenerationParams(temperature=0, max_new_tokens=40))
    )
    await asyncio.wait_for(got.done.wait(), 30)
    await nc.drain()
    chunks = [r for r in got.replies if isinstance(r, TokenChunk)]
    end = got.end
    assert isinstance(end, StreamEnd)
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert sum(c.token_count for c in chunks) == end.completion_tokens
    # The first chunk goes out as soon as there is text; middle chunks hold >= 3 tokens.
    assert all(c.token_count >= 3 for c in chunks[1:-1])
    assert chunks[-1].end_of_stream and chunks[-1].finish_reason == end.finish_reason


async def test_cancel_subject_aborts_a_generation_and_reports_cancelled(nats_server: NatsServer, tiny_worker) -> None:  # type: ignore[no-untyped-def]
    nc = await connect(nats_server.url)
    got = await submit(
        nc, request("tiny", "long", generation=GenerationParams(temperature=0, max_new_tokens=240), stream_chunk_size=1)
    )
    for _ in range(200):
        if len(got.replies) >= 2:
            break
        await asyncio.sleep(0.01)
    await nc.publish(subjects.cancel_subject(got.trace_id), b"")
    await asyncio.wait_for(got.done.wait(), 10)
    await nc.drain()
    assert got.end is not None and got.end.finish_reason == "cancelled"  # type: ignore[union-attr]
