"""/api/v1 through a real HTTP server, a real nats-server and a real (tiny) model."""

from __future__ import annotations

import json
import time

import pytest
import structlog

from schemas import codec, subjects
from schemas.workers import ServedModel, WorkerInfo
from tests.helpers import Gateway, parse_sse

GREEDY = {"temperature": 0, "maxNewTokens": 13}


def body(**extra: object) -> dict[str, object]:
    return {"modelId": "tiny", "prompt": "Hello there", "generation": GREEDY, **extra}


async def test_inference_returns_the_spec_shape_with_true_usage(gateway: Gateway) -> None:
    async with gateway.client() as client:
        r = await client.post("/api/v1/inference", json=body())
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["id"].startswith("gen-") and data["modelId"] == "tiny" and data["object"] == "text_completion"
    assert isinstance(data["created"], int)
    choice = data["choices"][0]
    assert choice["index"] == 0 and choice["finish_reason"] in ("stop", "length")
    usage = data["usage"]
    assert 0 < usage["completion_tokens"] <= 13
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # The prompt goes through the chat template, so it is longer than the two words sent.
    assert usage["prompt_tokens"] > 5


async def test_stream_sends_chunks_with_increasing_offsets_then_finish_reason_then_done(gateway: Gateway) -> None:
    async with gateway.client() as client:
        r = await client.post("/api/v1/inference/stream", json=body(generation={"temperature": 0, "maxNewTokens": 20}))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "text_completion.chunk" and c["choices"][0]["index"] == 0 for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert [c["choices"][0]["offset"] for c in chunks] == list(range(len(chunks)))
    assert "finish_reason" in chunks[-1]["choices"][0]
    assert all("finish_reason" not in c["choices"][0] for c in chunks[:-1])


async def test_streamed_text_equals_the_non_streamed_text_for_greedy_decoding(gateway: Gateway) -> None:
    async with gateway.client() as client:
        full = (await client.post("/api/v1/inference", json=body())).json()["choices"][0]["text"]
        events = parse_sse((await client.post("/api/v1/inference/stream", json=body())).text)
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == full


@pytest.mark.parametrize(
    "meta",
    [
        {"traceId": "trace-001", "tenant": "tenant-123", "playerId": "player-456", "locale": "zh-CN"},
        {"trace_id": "trace-001", "tenant": "tenant-123", "player_id": "player-456", "locale": "zh-CN"},
    ],
    ids=["camelCase", "snake_case"],
)
async def test_metadata_travels_to_the_worker_and_into_its_log_lines(gateway: Gateway, meta: dict[str, str]) -> None:
    with structlog.testing.capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        async with gateway.client() as client:
            r = await client.post("/api/v1/inference/streamWithMetadata", json=body(metadata=meta))
    assert r.status_code == 200 and parse_sse(r.text)[-1] == "[DONE]"
    worker_lines = [e for e in logs if e.get("service") == "engine-worker" or e["event"] == "generation"]
    assert worker_lines, logs
    line = next(e for e in worker_lines if e["event"] == "generation")
    assert (line["client_trace_id"], line["tenant"], line["player_id"], line["locale"]) == (
        "trace-001",
        "tenant-123",
        "player-456",
        "zh-CN",
    )
    gateway_line = next(e for e in logs if e["event"] == "request")
    assert gateway_line["player_id"] == "player-456" and gateway_line["trace_id"] == line["trace_id"]


async def test_every_route_requires_the_api_key(gateway: Gateway) -> None:
    routes = [
        ("GET", "/api/v1/health"),
        ("GET", "/api/v1/health/details"),
        ("GET", "/api/v1/health/live"),
        ("GET", "/api/v1/health/ready"),
        ("GET", "/api/v1/models"),
        ("GET", "/api/v1/models/tiny"),
        ("POST", "/api/v1/inference"),
        ("POST", "/api/v1/inference/stream"),
        ("POST", "/api/v1/inference/streamWithMetadata"),
    ]
    for key in (None, "wrong-key"):
        async with gateway.client(api_key=key) as client:
            for method, path in routes:
                r = await client.request(method, path, json=body())
                assert r.status_code == 401, (method, path, key)
                assert r.json()["error"]["code"] == "UNAUTHORIZED"


async def test_models_lists_the_registry_with_live_status(gateway: Gateway) -> None:
    async with gateway.client() as client:
        models = {m["id"]: m for m in (await client.get("/api/v1/models")).json()["models"]}
        detail = (await client.get("/api/v1/models/tiny")).json()
    assert models["tiny"]["status"] == "ready" and models["tiny"]["engine"] == "transformers"
    assert models["tiny"]["capabilities"] == ["inference", "stream", "training"]
    assert models["tiny"]["maxModelLen"] == 256
    assert models["unserved"]["status"] == "unavailable"
    assert detail["modelPath"].endswith("tiny-llama-test")
    assert set(detail["config"]) >= {"maxModelLen", "gpuMemoryUtilization", "tensorParallelSize"}


async def test_health_details_reports_workers_queue_and_nats(gateway: Gateway) -> None:
    async with gateway.client() as client:
        health = (await client.get("/api/v1/health")).json()
        details = (await client.get("/api/v1/health/details")).json()
    assert health["status"] == "UP" and health["components"] == {"gateway": "UP", "coordinator": "UP", "nats": "UP"}
    assert health["models"]["tiny"] == "ready" and health["models"]["unserved"] == "unavailable"
    assert details["models"] == health["models"]
    coord = details["components"]["coordinator"]["details"]
    assert coord["workers"]["healthy"] >= 1 and coord["workers"]["total"] >= coord["workers"]["healthy"]
    assert coord["queue"] == {"pendingTasks": 0, "maxSize": 1000}
    assert details["components"]["nats"]["details"]["connected"] is True
    latency = details["components"]["nats"]["details"]["latencyMs"]
    assert isinstance(latency, int) and latency >= 1  # whole milliseconds, as in the spec's example
    assert details["components"]["gateway"]["details"]["uptime"].endswith("s")


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"modelId": "tiny"}, "prompt"),
        ({"prompt": "x"}, "modelId"),
        ({"modelId": "tiny", "prompt": 5}, "prompt"),
        ({"modelId": "tiny", "prompt": ""}, "prompt"),
        ({"modelId": "tiny", "prompt": "x", "generation": {"temperature": 5}}, "generation.temperature"),
        ({"modelId": "tiny", "prompt": "x", "generation": {"topP": 0}}, "generation.topP"),
        ({"modelId": "tiny", "prompt": "x", "generation": {"maxNewTokens": 0}}, "generation.maxNewTokens"),
        ({"modelId": "tiny", "prompt": "x", "generation": {"maxNewTokens": "many"}}, "generation.maxNewTokens"),
        ({"modelId": "tiny", "prompt": "x", "generation": {"maxNewToken": 3}}, "generation"),
    ],
)
async def test_bad_fields_get_400_naming_the_field(gateway: Gateway, payload: dict[str, object], field: str) -> None:
    async with gateway.client() as client:
        for path in ("/api/v1/inference", "/api/v1/inference/stream"):
            r = await client.post(path, json=payload)
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert err["code"] == "INVALID_REQUEST"
            assert err["details"][0]["field"].startswith(field), err


async def test_malformed_json_gets_400(gateway: Gateway) -> None:
    async with gateway.client() as client:
        r = await client.post(
            "/api/v1/inference", content=b'{"modelId": "tiny", "prompt": ', headers={"Content-Type": "application/json"}
        )
    assert r.status_code == 400 and r.json()["error"]["code"] == "INVALID_REQUEST"
    assert "malformed JSON" in r.json()["error"]["message"]


async def test_unknown_model_gets_404_model_not_found(gateway: Gateway) -> None:
    async with gateway.client() as client:
        for path in ("/api/v1/inference", "/api/v1/inference/stream"):
            r = await client.post(path, json=body(modelId="model-not-found"))
            assert r.status_code == 404
            err = r.json()["error"]
            assert err["code"] == "MODEL_NOT_FOUND" and err["details"][0]["field"] == "modelId"
        assert (await client.get("/api/v1/models/model-not-found")).status_code == 404


async def test_a_configured_model_without_workers_gets_503(gateway: Gateway) -> None:
    async with gateway.client() as client:
        r = await client.post("/api/v1/inference", json=body(modelId="unserved"))
    assert r.status_code == 503 and r.json()["error"]["code"] == "INSUFFICIENT_RESOURCES"
    assert "Retry-After" in r.headers


async def test_a_model_still_loading_gets_503_model_not_ready(gateway: Gateway) -> None:
    loading = WorkerInfo(
        worker_id="loader-1",
        engine="transformers",
        device="cpu",
        slots_total=1,
        heartbeat_ms=int(time.time() * 1000),
        models=[ServedModel(model_id="unserved", status="loading", engine="transformers")],
    )
    kv = await gateway.core.js.key_value(subjects.WORKERS_BUCKET)
    await kv.put(subjects.worker_key("loader-1"), codec.encode(loading))
    try:
        from tests.helpers import wait_until

        await wait_until(lambda: gateway.core.workers.model_state("unserved") == "loading")
        async with gateway.client() as client:
            r = await client.post("/api/v1/inference", json=body(modelId="unserved"))
            listed = {m["id"]: m for m in (await client.get("/api/v1/models")).json()["models"]}
        assert r.status_code == 503 and r.json()["error"]["code"] == "MODEL_NOT_READY"
        assert listed["unserved"]["status"] == "loading"
    finally:
        await kv.delete(subjects.worker_key("loader-1"))


async def test_a_prompt_longer_than_the_context_gets_400(gateway: Gateway) -> None:
    async with gateway.client() as client:
        for path in ("/api/v1/inference", "/api/v1/inference/stream"):
            r = await client.post(path, json=body(prompt="word " * 400))
            assert r.status_code == 400, r.text
            assert "context" in r.json()["error"]["message"]


async def test_a_body_over_the_size_limit_gets_413(gateway: Gateway) -> None:
    big = json.dumps(body(prompt="x" * 2_000_000))
    async with gateway.client() as client:
        r = await client.post("/api/v1/inference", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "INVALID_REQUEST"


async def test_unknown_route_gets_the_error_envelope(gateway: Gateway) -> None:
    async with gateway.client() as client:
        r = await client.get("/api/v1/nope")
    assert r.status_code == 404 and "error" in r.json()


async def test_client_disconnect_aborts_the_generation_on_the_worker(gateway: Gateway, tiny_worker) -> None:  # type: ignore[no-untyped-def]
    from tests.helpers import wait_until

    payload = body(prompt="go on", generation={"temperature": 0, "maxNewTokens": 240})
    async with gateway.client() as client, client.stream("POST", "/api/v1/inference/stream", json=payload) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                break
    # The worker sees the cancel and frees the slot well before 240 tokens would have been generated.
    await wait_until(lambda: tiny_worker.engine.busy == 0 and not tiny_worker._active, timeout=5)


async def test_concurrent_requests_all_complete(gateway: Gateway) -> None:
    import asyncio

    async with gateway.client() as client:
        rs = await asyncio.gather(*(client.post("/api/v1/inference", json=body(prompt=f"q{i}")) for i in range(12)))
    assert all(r.status_code == 200 for r in rs)
    assert len({r.json()["id"] for r in rs}) == 12


async def test_queue_wait_past_the_deadline_gets_503_not_a_hang(nats_server, registry) -> None:  # type: ignore[no-untyped-def]
    """A worker that announces itself but never pulls: the gateway gives up after queue_timeout."""
    from tests.helpers import announce_ghost_worker, running_gateway

    async with running_gateway(nats_server.url, registry, queue_timeout=1.0) as gw:
        try:
            await announce_ghost_worker(gw, "ghost-1")
            started = time.monotonic()
            async with gw.client() as client:
                r = await client.post("/api/v1/inference", json=body(modelId="unserved"))
            assert r.status_code == 503 and r.json()["error"]["code"] == "INSUFFICIENT_RESOURCES"
            assert "picked up" in r.json()["error"]["message"]
            assert time.monotonic() - started < 5
        finally:
            kv = await gw.core.js.key_value(subjects.WORKERS_BUCKET)
            await kv.delete(subjects.worker_key("ghost-1"))
            # Nobody will ever serve it: remove it from the queue so other tests see an empty queue.
            await gw.core.js.purge_stream(subjects.GENERATE_STREAM)
