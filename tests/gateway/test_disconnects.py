"""A client that leaves at any moment of its request's life (right after sending, while queued, before the first
token, mid-stream) leaves nothing behind: the generation is cancelled on the worker, the client's rate-limit
slot and the gateway's open count return, the request leaves the queue, and one request log line says 499."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import pytest
import structlog

from schemas import subjects
from schemas.inference import GenerationParams, StreamEnd
from services.engine.worker import Worker
from tests.helpers import API_KEY, Gateway, NatsServer, running_paced_worker, wait_until
from tests.nats_client import connect, request, submit

MODEL = "tiny-solo"
# 200 tokens at 50 ms a step: a generation nobody cancels runs ~10 s; a cancelled one ends in milliseconds.
PACE_S = 0.05
MAX_TOKENS = 200

ROUTES = [
    ("api", "/api/v1/inference", {"modelId": MODEL, "prompt": "go on", "generation": {"maxNewTokens": MAX_TOKENS}}),
    ("api", "/api/v1/inference/stream", {"modelId": MODEL, "prompt": "go on", "generation": {"maxNewTokens": 200}}),
    (
        "api",
        "/api/v1/inference/streamWithMetadata",
        {"modelId": MODEL, "prompt": "go", "generation": {"maxNewTokens": 200}, "metadata": {"playerId": "p1"}},
    ),
    ("lite", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "go"}], "stream": True}),
    ("lite", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "go"}]}),
    ("lite", "/v1/completions", {"model": MODEL, "prompt": "go on", "stream": True}),
    ("lite", "/v1/completions", {"model": MODEL, "prompt": "go on", "n": 2}),
]


@pytest.fixture(scope="module")
async def paced_worker(nats_server: NatsServer, registry, gateway: Gateway) -> AsyncIterator[Worker]:  # type: ignore[no-untyped-def]
    async with running_paced_worker(
        nats_server.url, registry, MODEL, pace=PACE_S, worker_id="paced-disconnect", slots=4
    ) as worker:
        await wait_until(lambda: gateway.core.workers.model_state(MODEL) == "ready")
        yield worker


async def send_and_leave(gateway: Gateway, face: str, path: str, payload: dict[str, object], after: float) -> None:
    """A raw HTTP/1.1 client that sends one request and closes the connection `after` seconds later."""
    url = gateway.api_url if face == "api" else gateway.lite_url
    assert url is not None
    port = int(url.split(":")[2].split("/")[0])
    if face == "lite":
        payload = {"max_tokens": MAX_TOKENS, "temperature": 0, **payload}
    body = json.dumps(payload).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"X-API-Key: {API_KEY}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head + body)
    await writer.drain()
    if after:
        await asyncio.sleep(after)
    writer.close()
    await writer.wait_closed()


def limiter_active(gateway: Gateway) -> int:
    return sum(b.active for b in gateway.core.limiter._buckets.values())


async def queued(gateway: Gateway) -> int:
    info = await gateway.core.js.stream_info(
        subjects.GENERATE_STREAM, subjects_filter=subjects.model_requests_filter(MODEL)
    )
    return int(info.state.messages)


@pytest.mark.parametrize("after", [0.0, 0.005, 0.02, 0.3])
@pytest.mark.parametrize(
    ("face", "path", "payload"),
    ROUTES,
    ids=[f"{r[1]}{'-stream' * bool(r[2].get('stream') or 'stream' in r[1])}" for r in ROUTES],
)
async def test_a_client_that_leaves_at_any_moment_leaves_nothing_running_or_held(
    gateway: Gateway, paced_worker: Worker, face: str, path: str, payload: dict[str, object], after: float
) -> None:
    with structlog.testing.capture_logs() as logs:
        left = time.monotonic()
        await send_and_leave(gateway, face, path, payload, after)
        # Every request log line this test caused, once the gateway has let go of it.
        await wait_until(lambda: gateway.core.open_requests == 0 and limiter_active(gateway) == 0, timeout=5)
        await wait_until(lambda: not paced_worker._active and paced_worker.engine.busy == 0, timeout=5)
        settled = time.monotonic() - left
        assert await queued(gateway) == 0
    # Far sooner than the ~10 s the generation takes when nobody cancels it.
    assert settled < 3, settled
    generations = [e for e in logs if e["event"] == "generation"]
    assert all(e["outcome"] == "cancelled" for e in generations), generations
    requests = [e for e in logs if e["event"] == "request"]
    if generations or after > 0:  # a request the gateway saw is logged once, as a client that closed
        assert requests and all(e["status"] == 499 for e in requests), requests
        assert all(e["outcome"] == "client_disconnected" for e in requests)


async def test_a_cancel_that_arrives_before_the_request_is_picked_up_ends_it_at_once(
    gateway: Gateway, paced_worker: Worker
) -> None:
    """The requester left while its publish was in flight: its cancel reaches the worker before the request."""
    req = request(MODEL, "go on", generation=GenerationParams(max_new_tokens=MAX_TOKENS))
    nc = await connect(gateway.core.settings.nats_url)
    try:
        await nc.publish(subjects.cancel_subject(req.trace_id), b"")
        await nc.flush()
        await wait_until(lambda: req.trace_id in paced_worker._early_cancels, timeout=5)
        with structlog.testing.capture_logs() as logs:
            out = await submit(nc, req)
            await asyncio.wait_for(out.done.wait(), 5)
            await wait_until(lambda: any(e["event"] == "generation" for e in logs), timeout=5)
    finally:
        await nc.close()
    assert isinstance(out.end, StreamEnd) and out.end.finish_reason == "cancelled"
    assert out.end.completion_tokens == 0
    assert next(e for e in logs if e["event"] == "generation")["outcome"] == "cancelled"
