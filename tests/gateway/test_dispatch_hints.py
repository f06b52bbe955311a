"""`worker_hint` naming a worker that is gone: the request goes to the model's normal tier instead of
waiting for a worker that will never pull it, and nothing is left behind in the queue."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from schemas import subjects
from services import jetstream
from services.models.registry import Registry
from tests.helpers import Gateway, NatsServer, WorkerProcess, running_gateway, running_worker, wait_until
from tests.nats_client import connect, request, submit

MODEL = "tiny-solo"


async def _pending(client: httpx.AsyncClient) -> int:
    details = (await client.get("/api/v1/health/details")).json()
    return int(details["components"]["coordinator"]["details"]["queue"]["pendingTasks"])


async def _wait_pending_zero(client: httpx.AsyncClient, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while await _pending(client) != 0:
        assert time.monotonic() < deadline, f"pendingTasks stayed at {await _pending(client)}"
        await asyncio.sleep(0.2)


@contextlib.asynccontextmanager
async def _gateway_after_a_worker_was_killed(
    tmp_path: Path, registry: Registry, registry_file: Path, doomed_id: str, live_id: str, **gateway: Any
) -> AsyncIterator[Gateway]:
    """A gateway, a live worker of MODEL and a second worker of MODEL (a process of its own) that is SIGKILLed
    once the gateway has seen it alive."""
    server = NatsServer(tmp_path).start()
    nc = await connect(server.url)
    doomed = WorkerProcess(server.url, registry_file, MODEL, doomed_id)
    try:
        await doomed.wait_ready(nc)
        async with (
            running_worker(server.url, registry, MODEL, worker_id=live_id, slots=2),
            running_gateway(server.url, registry, **gateway) as gw,
        ):
            await wait_until(lambda: gw.core.workers.is_alive(doomed_id))
            doomed.proc.kill()
            yield gw
    finally:
        doomed.stop()
        await nc.close()
        server.stop()


async def test_a_hint_naming_a_worker_killed_just_before_is_served_by_another_worker_of_the_model(
    tmp_path: Path, registry: Registry, registry_file: Path
) -> None:
    async with _gateway_after_a_worker_was_killed(
        tmp_path, registry, registry_file, "hint-doomed-1", "hint-live-1", queue_timeout=30
    ) as gw:
        await asyncio.sleep(0.2)  # the gateway still believes the worker is alive: its heartbeat is fresh
        body = {"modelId": MODEL, "prompt": "hi", "workerHint": "hint-doomed-1", "generation": {"maxNewTokens": 3}}
        async with gw.client() as client:
            started = time.monotonic()
            r = await client.post("/api/v1/inference", json=body)
            took = time.monotonic() - started
            assert r.status_code == 200, r.text
            assert took < 15, f"waited {took:.1f}s for a dead worker"
            await _wait_pending_zero(client)


async def test_a_hint_naming_a_worker_known_to_be_gone_goes_straight_to_the_normal_tier(
    tmp_path: Path, registry: Registry, registry_file: Path
) -> None:
    async with _gateway_after_a_worker_was_killed(
        tmp_path, registry, registry_file, "hint-doomed-2", "hint-live-2"
    ) as gw:
        await wait_until(lambda: not gw.core.workers.is_alive("hint-doomed-2"), timeout=15)
        body = {"modelId": MODEL, "prompt": "hi", "workerHint": "hint-doomed-2", "generation": {"maxNewTokens": 3}}
        async with gw.client() as client:
            started = time.monotonic()
            r = await client.post("/api/v1/inference", json=body)
            assert r.status_code == 200, r.text
            assert time.monotonic() - started < 5
            assert await _pending(client) == 0


@pytest.mark.parametrize("publisher", ["", "alice"])
async def test_a_request_left_on_a_dead_workers_hint_subject_is_moved_to_the_normal_tier(
    tmp_path: Path, registry: Registry, publisher: str
) -> None:
    """A direct publisher (no gateway watching its request) hints a worker that is gone: a gateway's sweep
    moves the message, so it neither waits for the worker nor stays queued (on either work queue)."""
    server = NatsServer(tmp_path).start()
    nc = await connect(server.url)
    try:
        await jetstream.ensure_request_streams(nc.jetstream(), 1000, 64)
        orphan_request = request(MODEL, "orphan", worker_hint="never-was")
        subject = subjects.hinted_subject(MODEL, "never-was")
        if publisher:
            orphan_request.trace_id = subjects.owned_trace_id(publisher, orphan_request.trace_id)
            subject = subjects.published_hinted_subject(publisher, MODEL, "never-was")
        orphan = await submit(nc, orphan_request, subject)
        async with (
            running_worker(server.url, registry, MODEL, worker_id="hint-live-3", slots=2),
            running_gateway(server.url, registry) as gw,
        ):
            await asyncio.wait_for(orphan.done.wait(), 30)
            assert orphan.worker_id == "hint-live-3"
            async with gw.client() as client:
                await _wait_pending_zero(client)
    finally:
        await nc.close()
        server.stop()


async def test_a_request_abandoned_while_queued_is_removed_from_the_queue(tmp_path: Path, registry: Registry) -> None:
    server = NatsServer(tmp_path).start()
    try:
        async with running_gateway(server.url, registry) as gw:  # no worker serves the model
            async with gw.core.inference.open(request(MODEL, "nobody home")) as stream:
                assert await stream.next(0.3) is None
                assert (await gw.core.queue_state())[0] == 1
            assert (await gw.core.queue_state())[0] == 0
    finally:
        server.stop()
