"""Bounded everything at the HTTP edge: rate limits per key, a full queue, draining."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from services.models.registry import Registry
from tests.helpers import NatsServer, announce_ghost_worker, running_gateway, wait_until

BODY = {"modelId": "tiny", "prompt": "hi", "generation": {"temperature": 0, "maxNewTokens": 4}}


async def test_requests_over_the_per_minute_limit_get_429_with_retry_after(
    nats_server: NatsServer, registry: Registry, tiny_worker
) -> None:  # type: ignore[no-untyped-def]
    async with running_gateway(nats_server.url, registry, rate_limit_per_minute=3) as gw:
        await wait_until(lambda: gw.core.workers.model_state("tiny") == "ready")
        async with gw.client() as client:
            codes = [(await client.post("/api/v1/inference", json=BODY)).status_code for _ in range(3)]
            limited = await client.post("/api/v1/inference/stream", json=BODY)
        assert codes == [200, 200, 200]
        assert limited.status_code == 429 and limited.json()["error"]["code"] == "RATE_LIMITED"
        assert int(limited.headers["Retry-After"]) >= 1


async def test_concurrent_streams_over_the_limit_get_429(
    nats_server: NatsServer, registry: Registry, tiny_worker
) -> None:  # type: ignore[no-untyped-def]
    async with running_gateway(nats_server.url, registry, rate_limit_concurrent=1) as gw:
        await wait_until(lambda: gw.core.workers.model_state("tiny") == "ready")
        long = {**BODY, "generation": {"temperature": 0, "maxNewTokens": 240}, "prompt": "go"}
        async with gw.client() as client, client.stream("POST", "/api/v1/inference/stream", json=long) as first:
            async for line in first.aiter_lines():
                if line.startswith("data: "):
                    break
            second = await client.post("/api/v1/inference", json=BODY)
        assert second.status_code == 429 and "concurrent" in second.json()["error"]["message"]


async def test_each_api_key_has_its_own_limit(nats_server: NatsServer, registry: Registry, tiny_worker) -> None:  # type: ignore[no-untyped-def]
    from tests.helpers import API_KEY

    async with running_gateway(
        nats_server.url, registry, rate_limit_per_minute=1, api_key=f"{API_KEY},second-key"
    ) as gw:
        await wait_until(lambda: gw.core.workers.model_state("tiny") == "ready")
        async with gw.client() as a, gw.client(api_key="second-key") as b:
            assert (await a.post("/api/v1/inference", json=BODY)).status_code == 200
            assert (await a.post("/api/v1/inference", json=BODY)).status_code == 429
            assert (await b.post("/api/v1/inference", json=BODY)).status_code == 200


async def test_a_full_queue_gets_503_insufficient_resources_with_retry_after(
    tmp_path: Path, registry: Registry
) -> None:
    server = NatsServer(tmp_path).start()
    try:
        async with running_gateway(server.url, registry, queue_max_size=2, queue_timeout=30) as gw:
            # A worker that is alive but never pulls keeps the queue full.
            await announce_ghost_worker(gw, "ghost", alive_s=120)
            body = {**BODY, "modelId": "unserved"}
            async with gw.client() as client:
                waiting = [asyncio.create_task(client.post("/api/v1/inference", json=body)) for _ in range(2)]
                await wait_until(lambda: gw.core.open_requests == 2)
                started = time.monotonic()
                full = await client.post("/api/v1/inference", json=body)
                assert time.monotonic() - started < 2
                details = (await client.get("/api/v1/health/details")).json()
                for task in waiting:
                    task.cancel()
            assert full.status_code == 503 and full.json()["error"]["code"] == "INSUFFICIENT_RESOURCES"
            assert "full" in full.json()["error"]["message"] and "Retry-After" in full.headers
            assert details["components"]["coordinator"]["details"]["queue"] == {"pendingTasks": 2, "maxSize": 2}
    finally:
        server.stop()


async def test_a_draining_gateway_refuses_new_work_with_503_and_says_so_in_health(
    nats_server: NatsServer, registry: Registry, tiny_worker
) -> None:  # type: ignore[no-untyped-def]
    async with running_gateway(nats_server.url, registry) as gw:
        await wait_until(lambda: gw.core.workers.model_state("tiny") == "ready")
        gw.core.draining = True
        async with gw.client() as client:
            r = await client.post("/api/v1/inference", json=BODY)
            health = (await client.get("/api/v1/health")).json()
        assert r.status_code == 503 and r.json()["error"]["code"] == "INSUFFICIENT_RESOURCES"
        assert health["components"]["gateway"] == "DRAINING" and health["status"] != "UP"
