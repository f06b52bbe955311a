"""POST /api/v1/inference, /inference/stream and /inference/streamWithMetadata."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator
from typing import Any

import structlog
from quart import Blueprint, Response, request

from gateway.api_v1.errors import decode_body, envelope
from gateway.api_v1.protocol import InferenceBody
from gateway.core import GatewayCore
from gateway.generation import (
    FIRST_REPLY_GRACE_S,
    Outcome,
    complete,
    log_client_left,
    new_trace_id,
    resolve_model,
    streaming,
)
from gateway.http_json import json_body, json_response
from gateway.ratelimit import RateLimiter
from gateway.sse import SSE_KEEPALIVE, SSE_PRIMING, Primed, guarded, sse_event, sse_response
from schemas.errors import CyError
from schemas.inference import (
    ChatMessage,
    GenerateRequest,
    GenerationParams,
    Metadata,
    StreamEnd,
    TokenChunk,
)

log = structlog.get_logger()


def build(core: GatewayCore, body: InferenceBody) -> GenerateRequest:
    model_id = resolve_model(core, body.model_id)
    return GenerateRequest(
        trace_id=new_trace_id(),
        model_id=model_id,
        prompt=body.prompt if body.raw_prompt else "",
        messages=None if body.raw_prompt else [ChatMessage(role="user", content=body.prompt)],
        adapter=body.adapter,
        priority=body.priority,
        generation=body.generation.to_params() if body.generation else GenerationParams(),
        metadata=body.metadata.to_wire() if body.metadata else Metadata(),
        worker_hint=body.worker_hint,
    )


def client_key() -> str:
    return RateLimiter.client_key(request.headers.get("X-API-Key", ""), request.remote_addr or "")


def make_blueprint(core: GatewayCore) -> Blueprint:
    bp = Blueprint("inference", __name__)

    async def parse() -> GenerateRequest:
        data = await json_body()
        req = build(core, decode_body(data, InferenceBody))
        structlog.contextvars.bind_contextvars(**req.log_context())
        return req

    @bp.post("/inference")
    async def inference() -> Response:
        req = await parse()
        outcome = Outcome()
        try:
            async with core.limiter.hold(client_key()):
                await complete(core, req, outcome)
        except CyError as exc:
            log.info("request", route="inference", status=exc.status, code=exc.code.value, **outcome.log_fields())
            raise
        except asyncio.CancelledError:
            log_client_left({"route": "inference", **outcome.log_fields()})
            raise
        log.info("request", route="inference", status=200, **outcome.log_fields())
        completion = outcome.completion_tokens
        return json_response(
            {
                "id": req.trace_id,
                "modelId": req.model_id,
                "object": "text_completion",
                "created": int(time.time()),
                "choices": [{"index": 0, "text": "".join(outcome.text), "finish_reason": outcome.finish_reason}],
                "usage": {
                    "prompt_tokens": outcome.prompt_tokens,
                    "completion_tokens": completion,
                    "total_tokens": outcome.prompt_tokens + completion,
                    "cachedTokens": outcome.cached_tokens,
                },
            }
        )

    @bp.post("/inference/stream")
    async def inference_stream() -> Response:
        return await stream_response(core, await parse(), route="inference/stream")

    @bp.post("/inference/streamWithMetadata")
    async def inference_stream_with_metadata() -> Response:
        return await stream_response(core, await parse(), route="inference/streamWithMetadata")

    return bp


async def stream_response(core: GatewayCore, req: GenerateRequest, *, route: str) -> Response:
    """SSE in the spec's `text_completion.chunk` shape; `[DONE]` last; errors before the first reply
    become real HTTP statuses."""
    outcome = Outcome()
    stack = contextlib.AsyncExitStack()
    try:
        await stack.enter_async_context(core.limiter.hold(client_key()))
        stream = await stack.enter_async_context(streaming(core, req))
        first = await stream.next(FIRST_REPLY_GRACE_S)
        if first is not None:
            outcome.observe(first)
    except CyError as exc:
        await stack.aclose()
        log.info("request", route=route, status=exc.status, code=exc.code.value, **outcome.log_fields())
        raise
    except BaseException as exc:
        await stack.aclose()
        if isinstance(exc, asyncio.CancelledError):
            log_client_left({"route": route, **outcome.log_fields()})
        raise
    created = int(time.time())
    keepalive = core.settings.keepalive_interval

    def chunk_event(reply: TokenChunk) -> bytes:
        choice: dict[str, Any] = {"index": 0, "text": reply.chunk}
        if reply.finish_reason:
            choice["finish_reason"] = reply.finish_reason
        choice["offset"] = reply.index
        return sse_event(
            {
                "id": req.trace_id,
                "object": "text_completion.chunk",
                "created": created,
                "model": req.model_id,
                "choices": [choice],
            }
        )

    def cancelled_event(end: StreamEnd) -> bytes:
        """Cancelled by POST /inference/cancel (the player's requests): the client learns why its stream ended."""
        return chunk_event(TokenChunk(trace_id=req.trace_id, chunk="", index=end.chunks, finish_reason="cancelled"))

    async def body() -> AsyncGenerator[bytes, None]:
        # The body runs in the response's task, not the handler's: bind the request's log context again.
        structlog.contextvars.bind_contextvars(**req.log_context())
        async with stack:
            yield SSE_PRIMING
            if isinstance(first, TokenChunk):
                yield chunk_event(first)
            elif isinstance(first, StreamEnd) and first.finish_reason == "cancelled":
                yield cancelled_event(first)
            while not stream.finished:
                reply = await stream.next(keepalive)
                if reply is None:
                    yield SSE_KEEPALIVE
                    continue
                outcome.observe(reply)  # raises CyError for a StreamError: guarded() sends it as the error event
                if isinstance(reply, TokenChunk):
                    yield chunk_event(reply)
                elif isinstance(reply, StreamEnd):
                    if reply.finish_reason == "cancelled":
                        yield cancelled_event(reply)
                    break

    events = guarded(
        body(),
        lambda exc: sse_event(envelope(exc)),
        finished=lambda: outcome.finish_reason is not None,
        log_fields=lambda: {"route": route, **outcome.log_fields()},
    )
    # Primed: from here the body owns the stack (slot, subscription, cancel), even if never sent.
    return sse_response(await Primed.start(events))
