"""A direct NATS publisher (no HTTP): what a backend service that skips the gateway sees.

Exactly the documented client protocol, as a minted publisher (its own NATS user, trace ids
`<name>.<hex>`, inbox prefix `_INBOX_pub.<name>`): subscribe to `stream_subject(trace_id)` first, then
publish the msgpack GenerateRequest to the JetStream work queue, then read Accepted, TokenChunk..., StreamEnd.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from nats.aio.client import Client as NATS

from infra.bench.workloads import OneRequest, Sample, TokenCounter
from schemas import codec, subjects
from schemas.inference import (
    Accepted,
    ChatMessage,
    GenerateRequest,
    GenerationParams,
    StreamEnd,
    StreamError,
    TokenChunk,
)


async def connect_publisher(url: str, name: str, password: str) -> NATS:
    """Connect as the direct publisher `name` (minted with infra.nats.mint_publisher)."""
    import nats

    return await nats.connect(
        url, user=name, password=password, inbox_prefix=subjects.publisher_inbox_prefix(name), name="cy-bench"
    )


async def connect(url: str, internal_token: str) -> NATS:
    """Connect as the gateway's role: it may read the workers bucket (a publisher may not), and publish
    requests with any trace id (infra/gpu/stack.py sends its direct requests this way)."""
    import nats

    from services.runtime import role_password

    return await nats.connect(
        url, user="gateway", password=role_password(internal_token, "gateway"), name="cy-bench-services"
    )


def nats_request(
    nc: NATS, model_id: str, counter: TokenCounter, timeout: float = 600.0, *, owner: str = "bench"
) -> OneRequest:
    """Requests with trace ids `<owner>.<hex>` (a publisher may only read its own)."""
    js = nc.jetstream()

    async def one(prompt: str, max_new_tokens: int) -> Sample:
        trace_id = subjects.owned_trace_id(owner, uuid.uuid4().hex)
        request = GenerateRequest(
            trace_id=trace_id,
            model_id=model_id,
            messages=[ChatMessage(role="user", content=prompt)],
            generation=GenerationParams(max_new_tokens=max_new_tokens, temperature=0.0),
        )
        sent = time.monotonic()
        sub = await nc.subscribe(subjects.stream_subject(trace_id), pending_msgs_limit=100_000)
        try:
            await js.publish(subjects.generate_subject(model_id, "normal"), codec.encode(request), timeout=5)
            ttft: float | None = None
            queued: float | None = None
            text: list[str] = []
            while True:
                msg = await sub.next_msg(timeout=timeout)
                match codec.reply_decoder.decode(msg.data):
                    case Accepted():
                        queued = time.monotonic() - sent
                    case TokenChunk() as chunk:
                        if chunk.chunk and ttft is None:
                            ttft = time.monotonic() - sent
                        text.append(chunk.chunk)
                    case StreamEnd() as end:
                        duration = time.monotonic() - sent
                        tokens = counter.count("".join(text))
                        return Sample(
                            ttft,
                            duration,
                            tokens,
                            end.finish_reason,
                            server_tokens=end.completion_tokens,
                            queued=queued,
                        )
                    case StreamError() as err:
                        raise RuntimeError(f"{err.code.value}: {err.message}")
        finally:
            await sub.unsubscribe()

    return one


async def worker_info(nc: NATS, worker_id: str) -> dict[str, Any]:
    """What the worker announced in the workers bucket (engine, slots after its start, ...); {} if nothing."""
    try:
        kv = await nc.jetstream().key_value(subjects.WORKERS_BUCKET)
        entry = await kv.get(subjects.worker_key(worker_id))
        if not entry.value:
            return {}
        info = codec.worker_decoder.decode(entry.value)
    except Exception:
        return {}
    model = info.models[0] if info.models else None
    return {
        "engine": info.engine,
        "device": info.device,
        "slots": info.slots_total,
        "max_model_len": model.max_model_len if model else None,
    }
