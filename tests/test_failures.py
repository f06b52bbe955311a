"""Failures turn into fast, clear outcomes: killed workers, SIGTERM, a restarting nats-server."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from schemas import subjects
from schemas.inference import GenerationParams, StreamEnd, StreamError, TokenChunk
from services import jetstream
from services.models.registry import Registry
from tests.helpers import NatsServer, WorkerProcess, parse_sse, running_gateway, running_worker, wait_until
from tests.nats_client import connect, request, submit

SMOL = "smollm2-135m-instruct"


async def _stream_text(client, body: dict[str, object], kill: WorkerProcess | None = None) -> tuple[list, float]:  # type: ignore[no-untyped-def]
    """The SSE events of one /api/v1 stream; with `kill`, that worker is SIGKILLed after the first chunk.
    Returns (events, the longest wait for an event after the kill: the stall a client sees)."""
    lines: list[str] = []
    killed_at = last = 0.0
    stall = 0.0
    async with client.stream("POST", "/api/v1/inference/stream", json=body) as r:
        async for line in r.aiter_lines():
            lines.append(line)
            if not line.startswith("data: "):
                continue
            now = time.monotonic()
            if killed_at:
                stall = max(stall, now - last)
            last = now
            if kill is not None and not killed_at:
                kill.proc.kill()
                killed_at = last = time.monotonic()
    return parse_sse("\n".join(lines)), stall


@contextlib.asynccontextmanager
async def _doomed(
    server: NatsServer, registry: Registry, registry_file: Path, model_id: str, worker_id: str, **gateway: object
) -> AsyncIterator[tuple[WorkerProcess, httpx.AsyncClient]]:
    """A worker process of `model_id` (to be killed by the test) and an /api/v1 client of a gateway that saw it."""
    nc = await connect(server.url)
    worker = WorkerProcess(server.url, registry_file, model_id, worker_id)
    try:
        await worker.wait_ready(nc)
        async with running_gateway(server.url, registry, **gateway) as gw, gw.client() as client:
            await wait_until(lambda: gw.core.workers.is_alive(worker_id))
            yield worker, client
    finally:
        worker.stop()
        await nc.drain()


@pytest.mark.slow
async def test_a_stream_whose_worker_is_killed_goes_on_on_another_worker_with_the_same_text(
    nats_server: NatsServer, registry: Registry, registry_file: Path, real_worker
) -> None:  # type: ignore[no-untyped-def]
    """The rest of the generation moves to a live worker (prompt + the text already streamed, budget reduced):
    no error event, no repeated or missing text, offsets continuous, usage true; greedy: the text of a run
    nobody interrupted."""
    async with _doomed(nats_server, registry, registry_file, SMOL, "doomed-1") as (worker, client):
        body: dict[str, object] = {
            "modelId": SMOL,
            "prompt": "Write a long story about a lighthouse keeper.",
            "generation": {"temperature": 0, "maxNewTokens": 48},
        }
        whole, _ = await _stream_text(client, {**body, "workerHint": real_worker.worker_id})
        events, stall = await _stream_text(client, {**body, "workerHint": "doomed-1"}, kill=worker)
        r = await client.post("/api/v1/inference", json=body)
    chunks = [e for e in events[:-1] if isinstance(e, dict)]
    assert events[-1] == "[DONE]" and not any("error" in e for e in chunks), events[-3:]
    assert [c["choices"][0]["offset"] for c in chunks] == list(range(len(chunks)))
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    assert text == "".join(e["choices"][0]["text"] for e in whole[:-1]), (text, whole)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == text
    assert stall < 30, stall  # moved, not hung (how fast is for `just chaos` to tell, not a test)


@pytest.mark.slow
async def test_a_stream_whose_worker_is_killed_with_no_other_worker_ends_with_an_error_keeping_its_text(
    nats_server: NatsServer, registry: Registry, registry_file: Path
) -> None:
    async with _doomed(nats_server, registry, registry_file, "tiny-solo", "doomed-3", queue_timeout=2.0) as (
        worker,
        client,
    ):
        body = {"modelId": "tiny-solo", "prompt": "go", "generation": {"temperature": 0, "maxNewTokens": 200}}
        events, stall = await _stream_text(client, {**body, "workerHint": "doomed-3"}, kill=worker)
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == "INSUFFICIENT_RESOURCES", events[-2]
    assert events[0]["choices"][0]["text"]  # what came before the kill was sent
    assert stall < 30, stall  # an error, not a hang (1.5 s to notice, then 2 s of queue timeout)


@pytest.mark.slow
async def test_a_worker_killed_before_its_first_token_is_retried_on_another_worker(
    nats_server: NatsServer, registry: Registry, registry_file: Path, real_worker
) -> None:  # type: ignore[no-untyped-def]
    nc = await connect(nats_server.url)
    worker = WorkerProcess(nats_server.url, registry_file, SMOL, "doomed-2")
    try:
        await worker.wait_ready(nc)
        async with running_gateway(nats_server.url, registry) as gw:
            await wait_until(lambda: gw.core.workers.is_alive("doomed-2"))
            req = request(
                SMOL,
                "word " * 1500,
                worker_hint="doomed-2",
                generation=GenerationParams(temperature=0, max_new_tokens=4),
            )
            async with gw.core.inference.open(req) as stream:
                first = await stream.next(60)
                assert first is not None and getattr(first, "worker_id", "") == "doomed-2"
                worker.proc.kill()  # during the long prefill: no token was sent yet
                replies = []
                while not stream.finished:
                    reply = await stream.next()
                    if reply is not None:
                        replies.append(reply)
        assert isinstance(replies[-1], StreamEnd), replies[-1]
        assert replies[-1].worker_id == real_worker.worker_id
    finally:
        worker.stop()
        await nc.drain()


@pytest.mark.slow
async def test_sigterm_lets_open_streams_finish_then_the_worker_exits(
    nats_server: NatsServer, registry: Registry, registry_file: Path
) -> None:
    nc = await connect(nats_server.url)
    worker = WorkerProcess(nats_server.url, registry_file, SMOL, "draining-1")
    try:
        await worker.wait_ready(nc)
        got = await submit(
            nc,
            request(
                SMOL,
                "Count to twenty.",
                worker_hint="draining-1",
                generation=GenerationParams(temperature=0, max_new_tokens=40),
            ),
            subjects.hinted_subject(SMOL, "draining-1"),
        )
        await wait_until(lambda: any(isinstance(r, TokenChunk) for r in got.replies), timeout=60)
        worker.proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(got.done.wait(), 60)
        assert isinstance(got.end, StreamEnd) and got.end.completion_tokens > 1
        assert await asyncio.to_thread(worker.proc.wait, 30) == 0
    finally:
        worker.stop()
        await nc.drain()


async def test_queued_work_survives_a_nats_restart_and_services_reconnect(tmp_path: Path, registry: Registry) -> None:
    server = NatsServer(tmp_path).start()
    try:
        nc = await connect(server.url)
        await jetstream.ensure_generate_stream(nc.jetstream(), 1000)
        queued = [await submit(nc, request("tiny-solo", f"q{i}")) for i in range(3)]
        async with running_gateway(server.url, registry) as gw:
            server.stop()
            await asyncio.sleep(0.5)
            server.start()  # same port, same store directory
            async with running_worker(server.url, registry, "tiny-solo", worker_id="after-restart", slots=4):
                await asyncio.wait_for(asyncio.gather(*(c.done.wait() for c in queued)), 60)
                assert all(isinstance(c.end, StreamEnd) for c in queued)
                await wait_until(lambda: gw.core.workers.model_state("tiny-solo") == "ready", timeout=20)
                async with gw.client() as client:
                    r = await client.post(
                        "/api/v1/inference",
                        json={"modelId": "tiny-solo", "prompt": "hi", "generation": {"maxNewTokens": 3}},
                    )
                assert r.status_code == 200, r.text
        await nc.drain()
    finally:
        server.stop()


async def test_an_error_event_is_sent_when_the_request_is_undecodable(nats_server: NatsServer, tiny_worker) -> None:  # type: ignore[no-untyped-def]
    import msgspec

    nc = await connect(nats_server.url)
    inbox = await nc.subscribe(subjects.stream_subject("bad-1"))
    bad = msgspec.msgpack.encode({"trace_id": "bad-1", "model_id": "tiny", "generation": {"temperature": "hot"}})
    await nc.jetstream().publish(subjects.generate_subject("tiny"), bad)
    from schemas import codec

    reply = codec.reply_decoder.decode((await inbox.next_msg(timeout=10)).data)
    await nc.drain()
    assert isinstance(reply, StreamError) and reply.code == "INVALID_REQUEST"


@pytest.mark.slow
async def test_sigterm_on_the_gateway_refuses_new_work_finishes_open_streams_and_exits(
    nats_server: NatsServer, registry_file: Path, real_worker
) -> None:  # type: ignore[no-untyped-def]
    import os
    import subprocess
    import sys

    import httpx

    from infra.nats import free_port
    from tests.helpers import API_KEY

    port = free_port()
    env = dict(
        os.environ,
        CY_LLM_NATS_URL=nats_server.url,
        CY_LLM_MODELS_FILE=str(registry_file),
        CY_LLM_API_KEY=API_KEY,
        CY_LLM_PORT=str(port),
        CY_LLM_LITE_PORT=str(free_port()),
    )
    proc = subprocess.Popen(  # noqa: ASYNC220 - a real OS process is the point of this test
        [sys.executable, "-m", "gateway"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", headers={"X-API-Key": API_KEY}, timeout=120
        ) as client:
            for _ in range(200):
                try:
                    models = (await client.get("/api/v1/models")).json()["models"]
                    if {m["id"]: m["status"] for m in models}.get(SMOL) == "ready":
                        break
                except (httpx.HTTPError, KeyError, ValueError):
                    pass
                await asyncio.sleep(0.1)
            body = {"modelId": SMOL, "prompt": "Count to ten.", "generation": {"temperature": 0, "maxNewTokens": 30}}
            lines: list[str] = []
            async with client.stream("POST", "/api/v1/inference/stream", json=body) as r:
                async for line in r.aiter_lines():
                    lines.append(line)
                    if line.startswith("data: ") and len(lines) == 1:
                        proc.send_signal(signal.SIGTERM)
                        await asyncio.sleep(0.3)
                        refused = await client.post("/api/v1/inference", json=body)
        events = parse_sse("\n".join(lines))
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "INSUFFICIENT_RESOURCES"
        assert events[-1] == "[DONE]" and "finish_reason" in events[-2]["choices"][0]
        assert await asyncio.to_thread(proc.wait, 30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


async def test_sigterm_ends_a_worker_within_seconds_even_when_nats_is_gone(tmp_path: Path, registry_file: Path) -> None:
    server = NatsServer(tmp_path).start()
    worker = WorkerProcess(server.url, registry_file, "tiny-solo", "orphan-1")
    try:
        nc = await connect(server.url)
        await worker.wait_ready(nc)
        await nc.close()
        server.stop()
        await asyncio.sleep(1.0)  # the worker notices and starts reconnecting
        started = time.monotonic()
        worker.proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(worker.proc.wait, 20)
        assert code == 0, worker.proc.stderr.read().decode()[-3000:]  # type: ignore[union-attr]
        assert time.monotonic() - started < 10
    finally:
        worker.stop()
        server.stop()
