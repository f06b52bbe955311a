"""POST /api/v1/inference, /inference/stream and /inference/streamWithMetadata."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import structlog
from quart import Blueprint, Response, request

from gateway.api_v1.errors import decode_body, envelope
from gateway.api_v1.protocol import InferenceBody
from gateway.core import GatewayCore
from gateway.generation import FIRST_REPLY_GRACE_S, Outcome, complete, new_trace_id, resolve_model, streaming
from gateway.http_json import json_response
from gateway.ratelimit import RateLimiter
from gateway.sse import SSE_DONE, SSE_KEEPALIVE, sse_event, sse_response
from schemas.errors import CyError, ErrorCode
from schemas.inference import (
    ChatMessage,
    GenerateRequest,
    GenerationParams,
    Metadata,
    StreamEnd,
    StreamError,
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


def bind_request_context(req: GenerateRequest) -> None:
    meta = req.metadata
    structlog.contextvars.bind_contextvars(
        trace_id=req.trace_id,
        model_id=req.model_id,
        adapter=req.adapter or None,
        client_trace_id=meta.trace_id or None,
        tenant=meta.tenant or None,
        player_id=meta.player_id or None,
        locale=meta.locale or None,
    )


def make_blueprint(core: GatewayCore) -> Blueprint:
    bp = Blueprint("inference", __name__)

    async def parse() -> GenerateRequest:
        data: bytes = await request.get_data(as_text=False)  # type: ignore[assignment]
        req = build(core, decode_body(data, InferenceBody))
        bind_request_context(req)
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
    except BaseException:
        await stack.aclose()
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

    async def events() -> AsyncIterator[bytes]:
        bind_request_context(req)
        status = "ok"
        try:
            async with stack:
                if isinstance(first, TokenChunk):
                    yield chunk_event(first)
                while not stream.finished:
                    reply = await stream.next(keepalive)
                    if reply is None:
                        yield SSE_KEEPALIVE
                        continue
                    if isinstance(reply, StreamError):
                        status = reply.code.value
                        yield sse_event(envelope(CyError(reply.code, reply.message)))
                        break
                    outcome.observe(reply)
                    if isinstance(reply, TokenChunk):
                        yield chunk_event(reply)
                    elif isinstance(reply, StreamEnd):
                        break
        except CyError as exc:
            status = exc.code.value
            yield sse_event(envelope(exc))
        except Exception:
            status = ErrorCode.INTERNAL_ERROR.value
            log.exception("stream_failed")
            yield sse_event(envelope(CyError(ErrorCode.INTERNAL_ERROR, "internal error")))
        finally:
            if status == "ok" and outcome.finish_reason is None:
                status = "client_disconnected"
            log.info("request", route=route, status=200, outcome=status, **outcome.log_fields())
        yield SSE_DONE

    return sse_response(events())
