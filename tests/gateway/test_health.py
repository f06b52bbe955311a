"""/api/v1/health, /health/live and /health/ready (and the Lite port's /health and /ready) while workers load:
the gateway is not UP before a model can be served, and says which models can. Each test runs its own
nats-server so that the session's workers do not count."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import httpx
import msgspec

from services.models.registry import Registry
from tests.helpers import NatsServer, WorkerProcess, announce_ghost_worker, running_gateway

GREEDY = {"temperature": 0, "maxNewTokens": 4}


async def probe(client: httpx.AsyncClient, path: str) -> tuple[int, dict[str, Any]]:
    r = await client.get(path)
    return r.status_code, r.json()


async def test_health_says_up_only_once_a_starting_worker_process_can_serve_a_request(
    tmp_path: Path, registry: Registry, registry_file: Path
) -> None:
    server = NatsServer(tmp_path).start()
    try:
        async with running_gateway(server.url, registry) as gw, gw.client() as client:
            status, body = await probe(client, "/api/v1/health")
            assert (status, body["status"]) == (503, "STARTING"), body
            assert body["components"] == {"gateway": "UP", "coordinator": "DOWN", "nats": "UP"}
            assert set(body["models"]) == set(registry.models) and set(body["models"].values()) == {"unavailable"}
            assert await probe(client, "/api/v1/health/live") == (200, {"status": "UP"})
            status, ready = await probe(client, "/api/v1/health/ready")
            assert (status, ready["status"], ready["modelStatus"]) == (503, "NOT_READY", "unavailable"), ready
            assert ready["reason"] == "no live worker serves model 'tiny'"

            worker = WorkerProcess(server.url, registry_file, "tiny", f"starting-{uuid.uuid4().hex[:6]}")
            try:
                seen: list[str] = []
                deadline = asyncio.get_running_loop().time() + 120
                while True:
                    status, body = await probe(client, "/api/v1/health")
                    seen.append(body["models"]["tiny"])
                    if body["status"] == "UP":
                        break
                    assert (status, body["status"]) == (503, "STARTING"), body
                    assert worker.proc.poll() is None and asyncio.get_running_loop().time() < deadline, seen[-5:]
                    await asyncio.sleep(0.02)
                # UP means a request succeeds now, not once the model has loaded.
                served = await client.post(
                    "/api/v1/inference", json={"modelId": "tiny", "prompt": "Hi", "generation": GREEDY}
                )
                assert served.status_code == 200, served.text
                assert status == 200 and body["models"]["tiny"] == "ready"
                assert "loading" in seen  # the window in which health used to say UP already
                assert await probe(client, "/api/v1/health/ready") == (
                    200,
                    {"status": "READY", "modelId": "tiny", "modelStatus": "ready"},
                )
            finally:
                worker.stop()
    finally:
        server.stop()


async def test_health_lists_each_models_state_and_ready_says_why_the_default_model_cannot_serve(
    tmp_path: Path, registry: Registry
) -> None:
    server = NatsServer(tmp_path).start()
    try:
        async with running_gateway(server.url, msgspec.structs.replace(registry, default="unserved")) as gw:
            lite = httpx.AsyncClient(base_url=(gw.lite_url or "").removesuffix("/v1"), timeout=30)
            async with gw.client() as client, lite:
                reasons = {
                    "loading": "model 'unserved' is still loading on its workers",
                    "failed": "model 'unserved' failed to load on every live worker",
                }
                for state, reason in reasons.items():
                    await announce_ghost_worker(gw, "ghost-health", status=state)  # type: ignore[arg-type]
                    status, body = await probe(client, "/api/v1/health")
                    assert (status, body["status"], body["models"]["unserved"]) == (503, "STARTING", state), body
                    assert body["models"]["tiny"] == "unavailable" and body["components"]["coordinator"] == "UP"
                    status, details = await probe(client, "/api/v1/health/details")
                    assert (status, details["status"], details["models"]) == (503, "STARTING", body["models"])
                    assert await probe(client, "/api/v1/health/ready") == (
                        503,
                        {"status": "NOT_READY", "modelId": "unserved", "modelStatus": state, "reason": reason},
                    )
                    # The Lite port: /health stays the liveness probe, /ready mirrors the readiness.
                    assert await probe(lite, "/health") == (200, {"status": "ok"})
                    assert (await probe(lite, "/ready"))[0] == 503

                await announce_ghost_worker(gw, "ghost-health", status="ready")
                status, body = await probe(client, "/api/v1/health")
                assert (status, body["status"], body["models"]["unserved"]) == (200, "UP", "ready"), body
                assert (await probe(client, "/api/v1/health/ready"))[0] == 200
                assert (await probe(lite, "/ready"))[0] == 200

                gw.core.draining = True
                status, body = await probe(client, "/api/v1/health")
                assert (status, body["status"], body["components"]["gateway"]) == (200, "DEGRADED", "DRAINING")
                status, ready = await probe(client, "/api/v1/health/ready")
                assert (status, ready["modelStatus"], ready["reason"]) == (
                    503,
                    "draining",
                    "the gateway is shutting down",
                )
                gw.core.draining = False

                server.kill()
                deadline = asyncio.get_running_loop().time() + 10
                while (ready := await probe(client, "/api/v1/health/ready"))[0] == 200:
                    assert asyncio.get_running_loop().time() < deadline, ready
                    await asyncio.sleep(0.05)
                assert ready == (
                    503,
                    {
                        "status": "NOT_READY",
                        "modelId": "unserved",
                        "modelStatus": "disconnected",
                        "reason": "NATS is unreachable",
                    },
                )
                status, body = await probe(client, "/api/v1/health")
                assert (status, body["status"]) == (503, "DOWN")
                assert await probe(client, "/api/v1/health/live") == (200, {"status": "UP"})
                assert await probe(lite, "/health") == (200, {"status": "ok"})
    finally:
        server.stop()
