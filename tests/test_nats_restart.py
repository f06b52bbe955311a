"""A nats-server that is killed and restarted (same port, same store) costs the requests in flight, and
nothing else: every stream, bucket and consumer comes back without restarting the services."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from schemas import codec, subjects
from services.models.registry import Registry
from tests.helpers import NatsServer, parse_sse, running_gateway, running_paced_worker, wait_until
from tests.nats_client import connect


async def _bucket_has_worker(url: str, worker_id: str) -> bool:
    nc = await connect(url)
    try:
        kv = await nc.jetstream().key_value(subjects.WORKERS_BUCKET)
        entry = await kv.get(subjects.worker_key(worker_id))
        return entry.value is not None and codec.worker_decoder.decode(entry.value).worker_id == worker_id
    except Exception:
        return False
    finally:
        await nc.close()


async def test_after_nats_is_killed_and_restarted_the_same_gateway_and_worker_serve_again(
    tmp_path: Path, registry: Registry
) -> None:
    server = NatsServer(tmp_path).start()
    try:
        async with (
            running_paced_worker(server.url, registry, "tiny-solo", 0.05, worker_id="survivor-1", slots=4),
            running_gateway(server.url, registry) as gw,
        ):
            await wait_until(lambda: gw.core.workers.model_state("tiny-solo") == "ready")
            body = {
                "modelId": "tiny-solo",
                "prompt": "a long story",
                "generation": {"temperature": 0, "maxNewTokens": 200},
            }
            lines: list[str] = []
            restarted = False
            async with gw.client() as client, client.stream("POST", "/api/v1/inference/stream", json=body) as r:
                async for line in r.aiter_lines():
                    lines.append(line)
                    if line.startswith("data: ") and not restarted:
                        server.kill()  # SIGKILL mid-stream
                        await asyncio.sleep(0.5)
                        server.start()  # same port, same store directory
                        restarted = True
            events = parse_sse("\n".join(lines))
            assert events[-1] == "[DONE]"
            error = events[-2]["error"]
            assert "NATS connection was lost" in error["message"], error
            assert "stopped responding" not in error["message"]

            # The memory-backed workers bucket is back, with the (never restarted) worker in it.
            for _ in range(100):
                if await _bucket_has_worker(server.url, "survivor-1"):
                    break
                await asyncio.sleep(0.2)
            else:
                raise AssertionError("the workers bucket did not come back with the worker in it")
            async with gw.client() as client:
                r = await client.post(
                    "/api/v1/inference",
                    json={"modelId": "tiny-solo", "prompt": "hi", "generation": {"maxNewTokens": 3}},
                )
                assert r.status_code == 200, r.text
                details = (await client.get("/api/v1/health/details")).json()
            assert details["components"]["coordinator"]["details"]["workers"]["healthy"] >= 1, details
            assert details["components"]["nats"]["status"] == "UP", details
    finally:
        server.stop()


async def test_every_stream_bucket_and_consumer_is_recreated_when_nats_comes_back_with_an_empty_store(
    tmp_path: Path, registry: Registry
) -> None:
    from tests.nats_client import request, submit
    from tests.trainer.helpers import roots_for, running_trainer

    server = NatsServer(tmp_path / "nats").start()
    try:
        async with (
            running_paced_worker(server.url, registry, "tiny-solo", 0.0, worker_id="survivor-2", slots=2),
            running_trainer(server.url, registry, roots_for(tmp_path), trainer_id="survivor-t"),
            running_gateway(server.url, registry) as gw,
        ):
            server.kill()
            shutil.rmtree(tmp_path / "nats" / "nats")  # the JetStream store is lost too
            server.start()
            nc = await connect(server.url)
            js = nc.jetstream()
            wanted_streams = [
                subjects.GENERATE_STREAM,
                subjects.kv_stream(subjects.WORKERS_BUCKET),
                subjects.TRAINING_QUEUE_STREAM,
                subjects.TRAINING_EVENTS_STREAM,
                subjects.kv_stream(subjects.TRAINING_JOBS_BUCKET),
                subjects.kv_stream(subjects.ADAPTERS_BUCKET),
            ]
            wanted_consumers = [
                (subjects.GENERATE_STREAM, subjects.tier_consumer("tiny-solo", tier)) for tier in subjects.TIERS
            ] + [
                (subjects.GENERATE_STREAM, subjects.hint_consumer("tiny-solo", "survivor-2")),
                (subjects.TRAINING_QUEUE_STREAM, subjects.TRAINING_QUEUE_CONSUMER),
            ]

            async def missing() -> list[str]:
                names = {s.config.name for s in await js.streams_info()}
                gone = [name for name in wanted_streams if name not in names]
                for stream, consumer in wanted_consumers:
                    try:
                        await js.consumer_info(stream, consumer)
                    except Exception:
                        gone.append(f"{stream}/{consumer}")
                return gone

            for _ in range(150):
                if not await missing():
                    break
                await asyncio.sleep(0.2)
            assert not await missing()
            # The same worker serves a direct publisher and the same gateway serves HTTP.
            got = await submit(nc, request("tiny-solo", "after"))
            await asyncio.wait_for(got.done.wait(), 30)
            assert got.worker_id == "survivor-2"
            async with gw.client() as client:
                r = await client.post(
                    "/api/v1/inference",
                    json={"modelId": "tiny-solo", "prompt": "hi", "generation": {"maxNewTokens": 3}},
                )
                assert r.status_code == 200, r.text
                details = (await client.get("/api/v1/health/details")).json()
            assert details["components"]["coordinator"]["details"]["queue"]["pendingTasks"] == 0, details
            await nc.close()
    finally:
        server.stop()


async def test_a_request_sent_during_a_nats_outage_waits_for_it_and_an_orphaned_generation_is_cancelled(
    tmp_path: Path, registry: Registry
) -> None:
    import structlog

    server = NatsServer(tmp_path).start()
    try:
        async with (
            running_paced_worker(server.url, registry, "tiny-solo", 0.05, worker_id="outage-1", slots=4) as worker,
            running_gateway(server.url, registry) as gw,
        ):
            await wait_until(lambda: gw.core.workers.model_state("tiny-solo") == "ready")
            long_body = {"modelId": "tiny-solo", "prompt": "a long story", "generation": {"maxNewTokens": 400}}
            short_body = {"modelId": "tiny-solo", "prompt": "hi", "generation": {"maxNewTokens": 3}}
            with structlog.testing.capture_logs() as logs:
                async with gw.client() as client:
                    async with client.stream("POST", "/api/v1/inference/stream", json=long_body) as r:
                        async for line in r.aiter_lines():
                            if line.startswith("data: ") and server.proc is not None:
                                server.kill()  # mid-stream: this stream's client is told, its generation orphaned
                                await wait_until(lambda: not gw.core.link.up, timeout=5)
                                arriving = asyncio.create_task(client.post("/api/v1/inference", json=short_body))
                                await asyncio.sleep(1.5)
                                server.start()
                    answer = await arriving
                assert answer.status_code == 200, answer.text  # waited for NATS instead of a 503
                # 400 tokens at 50 ms take 20 s: the orphan is cancelled long before.
                await wait_until(lambda: not worker._active, timeout=8)
            outcomes = [e["outcome"] for e in logs if e["event"] == "generation"]
            assert "cancelled" in outcomes, outcomes  # the orphan (the short request ends "length")
    finally:
        server.stop()
