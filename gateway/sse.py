"""Server-sent events framing, and the tail every SSE body shares, for both APIs."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

import msgspec
import structlog
from quart import Response

from schemas.errors import CyError, ErrorCode

log = structlog.get_logger()

SSE_DONE = b"data: [DONE]\n\n"
SSE_KEEPALIVE = b": keep-alive\n\n"


def sse_event(payload: Any) -> bytes:
    return b"data: " + msgspec.json.encode(payload) + b"\n\n"


def sse_response(events: AsyncIterator[bytes]) -> Response:
    response = Response(events, content_type="text/event-stream")
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"
    response.timeout = None  # type: ignore[assignment]  # streams end by themselves (request deadline)
    return response


async def guarded(
    body: AsyncGenerator[bytes, None],
    error_event: Callable[[CyError], bytes],
    finished: Callable[[], bool],
    log_fields: Callable[[], dict[str, Any]],
) -> AsyncGenerator[bytes, None]:
    """`body`'s events, then `[DONE]`. The response has started (status 200 sent), so an error becomes an error
    event (`error_event`), an unexpected exception an internal_error one; `body` is closed first (its cleanup:
    aborting generations, freeing slots), then one canonical log line with the outcome: "ok", the error code,
    or "client_disconnected" when the client left before `finished()`."""
    outcome = "ok"
    try:
        async with contextlib.aclosing(body):
            async for event in body:
                yield event
    except CyError as exc:
        outcome = exc.code.value
        yield error_event(exc)
    except Exception:
        outcome = ErrorCode.INTERNAL_ERROR.value
        log.exception("stream_failed")
        yield error_event(CyError(ErrorCode.INTERNAL_ERROR, "internal error"))
    finally:
        if outcome == "ok" and not finished():
            outcome = "client_disconnected"
        log.info("request", status=200, outcome=outcome, **log_fields())
    yield SSE_DONE
