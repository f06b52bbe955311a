"""POST /v1/chat/completions and /v1/completions: JSON or SSE, n choices, usage with real token counts."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator

import structlog
from quart import Blueprint, Response, request

from gateway.core import GatewayCore
from gateway.generation import FIRST_REPLY_GRACE_S, log_client_left
from gateway.http_json import json_body, json_response
from gateway.openai.auth import bearer_token
from gateway.openai.bodies import ChatChunks, Chunks, TextChunks, chat_body, completion_body
from gateway.openai.choices import Choices
from gateway.openai.errors import decode_request, error_body
from gateway.openai.protocol import ChatCompletionRequest, CompletionRequest
from gateway.openai.translate import Plan, plan_chat, plan_completion
from gateway.ratelimit import RateLimiter
from gateway.sse import SSE_KEEPALIVE, SSE_PRIMING, Primed, guarded, sse_event, sse_response
from schemas.errors import CyError
from schemas.inference import StreamEnd, TokenChunk

log = structlog.get_logger()


# --- running a plan ----------------------------------------------------------------------------------------


def bind_plan(plan: Plan, route: str) -> None:
    # The plan's id is the trace id clients see (choice i of n has its own, plan.id-i).
    structlog.contextvars.bind_contextvars(route=route, **{**plan.requests[0].log_context(), "trace_id": plan.id})


def _rate_limit(core: GatewayCore) -> contextlib.AbstractAsyncContextManager[None]:
    """The client's slot (per bearer token, else per address), held for the whole request (n choices = one)."""
    return core.limiter.hold(RateLimiter.client_key(bearer_token(), request.remote_addr or ""))


async def respond(core: GatewayCore, plan: Plan, route: str, *, chat: bool) -> Response:
    bind_plan(plan, route)
    headers = {"x-request-id": plan.id}
    created = int(time.time())
    if plan.stream:
        chunks: Chunks = ChatChunks(plan, created) if chat else TextChunks(plan, created)
        choices = await open_choices(core, plan)
        response = sse_response(await Primed.start(_events(core, plan, choices, chunks, route)))
        response.headers.update(headers)
        return response
    choices = await run_to_end(core, plan)
    body = chat_body(plan, choices, created) if chat else completion_body(plan, choices, created)
    return json_response(body, headers=headers)


async def run_to_end(core: GatewayCore, plan: Plan) -> Choices:
    """Run every generation of `plan` to its end (a whole answer, not streamed) and log the request's line.
    Raises CyError."""
    choices = Choices(core, plan.requests, hold=_rate_limit(core))
    try:
        async with choices:
            async for _ in choices.replies():
                pass
    except CyError as exc:
        log.info("request", status=exc.status, code=exc.code.value, **choices.log_fields())
        raise
    except asyncio.CancelledError:
        log_client_left(choices.log_fields())
        raise
    log.info("request", status=200, **choices.log_fields())
    return choices


async def open_choices(core: GatewayCore, plan: Plan) -> Choices:
    """Enqueue `plan` and wait briefly for the first replies, so that early failures get a real HTTP status; the
    caller's SSE body reads the rest and closes the choices (start it with `Primed.start`). Raises CyError."""
    choices = Choices(core, plan.requests, hold=_rate_limit(core))
    try:
        await choices.start()
        await choices.first_replies(FIRST_REPLY_GRACE_S)
    except CyError as exc:
        await choices.close()
        log.info("request", status=exc.status, code=exc.code.value, **choices.log_fields())
        raise
    except BaseException as exc:
        await choices.close()
        if isinstance(exc, asyncio.CancelledError):
            log_client_left(choices.log_fields())
        raise
    return choices


def _events(core: GatewayCore, plan: Plan, choices: Choices, chunks: Chunks, route: str) -> AsyncGenerator[bytes, None]:
    """The SSE body: an opening chunk per choice, content deltas, a finish chunk per choice, the usage chunk
    when asked, `[DONE]`. A keep-alive comment while nothing comes (queue, long prefill); an error after the
    response has started becomes an error event. Leaving early (client gone) aborts the generations."""

    async def body() -> AsyncGenerator[bytes, None]:
        bind_plan(plan, route)
        try:
            yield SSE_PRIMING
            for i in range(len(plan.requests)):
                if (opening := chunks.opening(i)) is not None:
                    yield sse_event(opening)
            async for item in choices.replies(core.settings.keepalive_interval):
                if item is None:
                    yield SSE_KEEPALIVE
                    continue
                i, reply = item
                if isinstance(reply, TokenChunk):
                    for chunk in chunks.content(i, reply):
                        yield sse_event(chunk)
                elif isinstance(reply, StreamEnd):
                    for chunk in chunks.finish(i, reply.finish_reason):
                        yield sse_event(chunk)
            if plan.include_usage:
                yield sse_event(chunks.usage(choices.usage(plan.n)))
        finally:
            await choices.close()

    return guarded(
        body(),
        lambda exc: sse_event(error_body(exc)),
        finished=lambda: all(o.finish_reason is not None for o in choices.outcomes),
        log_fields=choices.log_fields,
    )


def make_blueprint(core: GatewayCore) -> Blueprint:
    bp = Blueprint("openai_completions", __name__)

    @bp.post("/chat/completions")
    async def chat_completions() -> Response:
        data = await json_body()
        plan = plan_chat(core, decode_request(data, ChatCompletionRequest))
        return await respond(core, plan, "chat/completions", chat=True)

    @bp.post("/completions")
    async def completions() -> Response:
        data = await json_body()
        plan = plan_completion(core, decode_request(data, CompletionRequest))
        return await respond(core, plan, "completions", chat=False)

    return bp
