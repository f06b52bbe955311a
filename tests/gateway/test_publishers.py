"""One direct publisher cannot hurt the others: its requests for a model nobody serves end at once with an error
reply, its pending requests are bounded (the excess refused to it alone, at publish), and HTTP clients keep
their own queue whatever it does."""

from __future__ import annotations

import pytest
from nats.js.errors import APIError

from schemas import codec, subjects
from schemas.inference import GenerateRequest, StreamError
from services import jetstream
from tests.helpers import Gateway, NatsServer, announce_ghost_worker, wait_until
from tests.nats_client import connect


async def _collect_errors(nc, owner: str, count: int) -> tuple[list[StreamError], list[str]]:  # type: ignore[no-untyped-def]
    """Subscribe to `count` of `owner`'s reply subjects; returns (replies so far, their trace ids)."""
    traces = [subjects.owned_trace_id(owner, f"flood-{i}") for i in range(count)]
    got: list[StreamError] = []

    async def on_reply(msg) -> None:  # type: ignore[no-untyped-def]
        got.append(codec.reply_decoder.decode(msg.data))  # type: ignore[arg-type]

    await nc.subscribe(subjects.owned_streams(owner), cb=on_reply)
    await nc.flush()
    return got, traces


async def test_a_publisher_flooding_a_model_nobody_serves_gets_every_request_ended_and_http_is_unaffected(
    nats_server: NatsServer, gateway: Gateway
) -> None:
    nc = await connect(nats_server.url)
    try:
        got, traces = await _collect_errors(nc, "flooder", 300)
        js = nc.jetstream()
        accepted: list[str] = []
        for trace_id in traces:  # faster than they can be ended: past its bound, refused at publish
            req = GenerateRequest(trace_id=trace_id, model_id="nomodel", prompt="x")
            try:
                await js.publish(subjects.published_subject("flooder", "nomodel"), codec.encode(req))
                accepted.append(trace_id)
            except APIError as exc:
                assert "maximum messages per subject" in str(exc)
        # HTTP clients meanwhile: served as usual.
        async with gateway.client() as client:
            r = await client.post(
                "/api/v1/inference", json={"modelId": "tiny", "prompt": "hi", "generation": {"maxNewTokens": 8}}
            )
        assert r.status_code == 200, r.text
        await wait_until(lambda: len(got) >= len(accepted), timeout=20)
        assert len(accepted) >= 64
        assert all(isinstance(e, StreamError) and e.code == "MODEL_NOT_FOUND" for e in got)
        assert sorted(e.trace_id for e in got) == sorted(accepted)  # each request gets exactly one reply
        info = await js.stream_info(subjects.PUBLISHED_STREAM, subjects_filter=subjects.PUBLISHED_SUBJECTS)
        assert not (info.state.subjects or {}).get(subjects.published_subject("flooder", "nomodel"))
    finally:
        await nc.close()


async def test_a_publisher_past_its_pending_bound_is_refused_at_publish_and_others_are_not(
    nats_server: NatsServer, gateway: Gateway
) -> None:
    await announce_ghost_worker(gateway, "ghost-publishers", model_id="unserved")  # ready, never pulls
    nc = await connect(nats_server.url)
    js = nc.jetstream()
    try:
        for i in range(jetstream.PUBLISHER_MAX_PENDING):
            req = GenerateRequest(trace_id=f"greedy.q{i}", model_id="unserved", prompt="x")
            await js.publish(subjects.published_subject("greedy", "unserved"), codec.encode(req))
        with pytest.raises(APIError) as refused:
            req = GenerateRequest(trace_id="greedy.one-too-many", model_id="unserved", prompt="x")
            await js.publish(subjects.published_subject("greedy", "unserved"), codec.encode(req))
        assert "maximum messages per subject" in str(refused.value).lower()
        # Another publisher, and the HTTP queue, still take requests for the same model.
        req = GenerateRequest(trace_id="modest.q1", model_id="unserved", prompt="x")
        await js.publish(subjects.published_subject("modest", "unserved"), codec.encode(req))
        req = GenerateRequest(trace_id="gen-http-like", model_id="unserved", prompt="x")
        await js.publish(subjects.generate_subject("unserved"), codec.encode(req))
    finally:
        kv = await js.key_value(subjects.WORKERS_BUCKET)
        await kv.delete(subjects.worker_key("ghost-publishers"))
        await js.purge_stream(subjects.PUBLISHED_STREAM)
        await js.purge_stream(subjects.GENERATE_STREAM)
        await nc.close()
