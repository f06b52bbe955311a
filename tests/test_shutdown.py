"""Stopping the services with a signal, as real OS processes: exit code 0, a prompt exit, nothing on stderr that
looks like a crash (no traceback, no CancelledError, no error line), and every open stream ended with an error
its client can retry on."""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from schemas.inference import GenerationParams, StreamEnd, StreamError, TokenChunk
from tests.helpers import API_KEY, GatewayProcess, NatsServer, WorkerProcess, parse_sse, put_ghost_worker, wait_until
from tests.nats_client import connect, request, submit

DRAIN_S = 1.0


def assert_clean(stderr: str) -> None:
    assert "Traceback" not in stderr and "CancelledError" not in stderr, stderr[-4000:]
    errors = [line for line in stderr.splitlines() if '"level": "error"' in line or '"level": "critical"' in line]
    assert not errors, errors


async def read_stream(client: httpx.AsyncClient, opened: asyncio.Event, method: str, url: str, **kw: Any) -> str:
    async with client.stream(method, url, **kw) as r:
        assert r.status_code == 200, await r.aread()
        opened.set()
        return "".join([text async for text in r.aiter_text()])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_an_idle_gateway_stopped_by_a_signal_exits_at_once_with_code_0_and_no_traceback(
    tmp_path: Path, registry_file: Path, sig: signal.Signals
) -> None:
    server = NatsServer(tmp_path).start()
    gw = GatewayProcess(server.url, registry_file, tmp_path / "gateway.log")
    try:
        await gw.wait_listening()
        # A keep-alive connection stays open, as in any HTTP client's pool.
        async with httpx.AsyncClient(base_url=gw.lite_url.removesuffix("/v1"), timeout=30) as http:
            assert (await http.get("/health")).status_code == 200
            started = time.monotonic()
            gw.proc.send_signal(sig)
            code = await asyncio.to_thread(gw.proc.wait, 60)
        assert code == 0, gw.stderr()[-3000:]
        assert time.monotonic() - started < 3
        assert_clean(gw.stderr())
        assert '"event": "gateway_stopped"' in gw.stderr()
    finally:
        gw.stop()
        server.stop()


async def test_a_gateway_stopped_with_open_streams_ends_them_with_a_retryable_error_and_exits_within_the_drain_timeout(
    tmp_path: Path, registry_file: Path
) -> None:
    server = NatsServer(tmp_path / "nats").start()
    datasets, outputs = tmp_path / "datasets", tmp_path / "outputs"
    datasets.mkdir()
    (datasets / "rows.jsonl").write_text(json.dumps({"instruction": "Say hi.", "output": "Hi."}) + "\n")
    gw = GatewayProcess(
        server.url,
        registry_file,
        tmp_path / "gateway.log",
        CY_LLM_DRAIN_TIMEOUT=str(DRAIN_S),
        CY_LLM_QUEUE_TIMEOUT="300",
        CY_LLM_DATASETS_DIR=str(datasets),
        CY_LLM_OUTPUTS_DIR=str(outputs),
    )
    nc = await connect(server.url)
    rest = httpx.AsyncClient(base_url=gw.api_url, headers={"X-API-Key": API_KEY}, timeout=120)
    lite = httpx.AsyncClient(base_url=gw.lite_url, timeout=120)
    try:
        await gw.wait_listening()
        # A worker that is alive but never pulls: the generations wait in the queue for as long as the test likes.
        await put_ghost_worker(nc.jetstream(), "ghost-shutdown", "unserved", alive_s=300)

        async def model_ready() -> bool:
            return bool((await rest.get("/api/v1/models/unserved")).json()["status"] == "ready")

        for _ in range(200):
            if await model_ready():
                break
            await asyncio.sleep(0.05)
        start = {"baseModel": "tiny", "datasetPath": "rows.jsonl", "outputDir": f"out-{uuid.uuid4().hex[:6]}"}
        job = (await rest.post("/api/v1/training/start", json=start)).json()["jobId"]  # no trainer: stays queued

        chat = {"model": "unserved", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        opened = [asyncio.Event() for _ in range(3)]
        reads = [
            asyncio.create_task(
                read_stream(
                    rest, opened[0], "POST", "/api/v1/inference/stream", json={"modelId": "unserved", "prompt": "hi"}
                )
            ),
            asyncio.create_task(read_stream(lite, opened[1], "POST", "/chat/completions", json=chat)),
            asyncio.create_task(read_stream(rest, opened[2], "GET", f"/api/v1/training/events/{job}")),
        ]
        await asyncio.wait_for(asyncio.gather(*(o.wait() for o in opened)), 30)
        started = time.monotonic()
        gw.proc.send_signal(signal.SIGTERM)
        bodies = await asyncio.wait_for(asyncio.gather(*reads), 60)
        code = await asyncio.to_thread(gw.proc.wait, 60)
        elapsed = time.monotonic() - started

        assert code == 0, gw.stderr()[-3000:]
        # The drain timeout, the 2 s the ended streams get to send their error, and start-up slack of a busy CI.
        assert elapsed < DRAIN_S + 4, elapsed
        assert_clean(gw.stderr())
        for body in bodies:
            events = parse_sse(body)
            assert events[-1] == "[DONE]", body
            error = events[-2]["error"]
            assert "shutting down" in error["message"], error
        rest_error, lite_error, job_error = (parse_sse(body)[-2]["error"] for body in bodies)
        assert rest_error["code"] == job_error["code"] == "INSUFFICIENT_RESOURCES"
        assert (lite_error["type"], lite_error["code"]) == ("server_error", "service_unavailable")
    finally:
        await rest.aclose()
        await lite.aclose()
        await nc.drain()
        gw.stop()
        server.stop()


@pytest.mark.parametrize("streams", [0, 3], ids=["idle", "mid-stream"])
async def test_a_worker_process_stopped_by_sigterm_exits_with_code_0_and_no_traceback(
    tmp_path: Path, registry_file: Path, streams: int
) -> None:
    server = NatsServer(tmp_path).start()
    worker = WorkerProcess(
        server.url, registry_file, "tiny-solo", f"stopping-{uuid.uuid4().hex[:6]}", CY_LLM_DRAIN_TIMEOUT="0.2"
    )
    nc = await connect(server.url)
    try:
        await worker.wait_ready(nc)
        long = GenerationParams(temperature=0, max_new_tokens=250)
        got = [await submit(nc, request("tiny-solo", generation=long)) for _ in range(streams)]
        await wait_until(lambda: all(any(isinstance(r, TokenChunk) for r in g.replies) for g in got), timeout=30)
        started = time.monotonic()
        worker.proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(worker.proc.wait, 30)
        stderr = worker.proc.stderr.read().decode()  # type: ignore[union-attr]
        assert code == 0, stderr[-3000:]
        assert time.monotonic() - started < 5
        assert_clean(stderr)
        for g in got:  # each stream ended: finished within the drain timeout, or told the worker stopped
            await asyncio.wait_for(g.done.wait(), 10)
            assert isinstance(g.end, StreamEnd | StreamError), g.replies[-1:]
    finally:
        await nc.drain()
        worker.stop()
        server.stop()
