"""The 3-node cluster (JetStream R3): one node dies while streams run, nothing is lost."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from infra.cluster import plan_free, servers_for, start_cluster
from schemas.inference import StreamEnd
from services import jetstream
from services.models.registry import Registry
from tests.helpers import parse_sse, running_gateway, running_worker, wait_until
from tests.nats_client import connect, request, submit


@pytest.mark.slow
async def test_killing_one_nats_node_loses_no_stream_no_queued_request_and_services_reconnect(
    tmp_path: Path, registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CY_LLM_JS_REPLICAS", "3")
    nodes = plan_free()
    procs = start_cluster(tmp_path, nodes)
    try:
        direct = await connect(servers_for(nodes[2], nodes).split(",")[0])
        for _ in range(100):  # until the JetStream meta group has a leader
            try:
                await jetstream.ensure_generate_stream(direct.jetstream(), 1000)
                break
            except Exception:
                await asyncio.sleep(0.2)
        queued = [await submit(direct, request("tiny-solo", f"queued {i}")) for i in range(3)]
        smol = "smollm2-135m-instruct"
        async with (
            running_worker(servers_for(nodes[1], nodes), registry, smol, worker_id="c-w1", slots=8),
            running_gateway(servers_for(nodes[0], nodes), registry) as gw1,
            running_gateway(servers_for(nodes[2], nodes), registry) as gw2,
        ):
            await wait_until(lambda: gw2.core.workers.model_state(smol) == "ready", timeout=60)
            body = {
                "modelId": smol,
                "prompt": "Tell me about the sea.",
                "generation": {"temperature": 0, "maxNewTokens": 32},
            }
            async with gw2.client() as client:
                runs = [asyncio.create_task(client.post("/api/v1/inference/stream", json=body)) for _ in range(4)]
                await wait_until(lambda: gw2.core.open_requests == 4, timeout=30)
                await asyncio.sleep(1.0)
                procs[0].kill()  # node n1: home of gw1, not of gw2 or the worker
                results = await asyncio.gather(*runs)
            for r in results:
                events = parse_sse(r.text)
                assert events[-1] == "[DONE]" and all("error" not in e for e in events[:-1]), events[-2:]
                assert "finish_reason" in events[-2]["choices"][0]
            # gw1 lost its node; it reconnects to a survivor and serves new requests.
            async with gw1.client() as client:
                for _ in range(60):
                    try:
                        r = await client.post("/api/v1/inference", json={**body, "generation": {"maxNewTokens": 4}})
                        if r.status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    await asyncio.sleep(0.5)
                assert r.status_code == 200, r.text
            # Requests queued before the node died are all still there for a worker that starts now.
            async with running_worker(servers_for(nodes[2], nodes), registry, "tiny-solo", worker_id="c-w2"):
                await asyncio.wait_for(asyncio.gather(*(c.done.wait() for c in queued)), 60)
            assert all(isinstance(c.end, StreamEnd) for c in queued)
        await direct.drain()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(10)
