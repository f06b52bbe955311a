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
SSE_PRIMING = b""  # the first event of a primed body (see Primed); never sent

# The status logged for a client that left before its response was complete (nginx's convention).
CLIENT_CLOSED = 499


def sse_event(payload: Any, name: str = "") -> bytes:
    """One event: `data:` the JSON of `payload`, after an `event: <name>` line when named (OpenAI's Responses
    API names each event by its type)."""
    data = b"data: " + msgspec.json.encode(payload) + b"\n\n"
    return b"event: " + name.encode() + b"\n" + data if name else data


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
    done: bytes = SSE_DONE,
) -> AsyncGenerator[bytes, None]:
    """`body`'s events, then `done` (`[DONE]`; b"" for none, as OpenAI's Responses API ends its streams). The
    response has started (status 200 sent), so an error becomes an error event (`error_event`), an unexpected
    exception an internal_error one; `body` is closed first (its cleanup: aborting generations, freeing slots),
    then one canonical log line with the outcome: "ok", the error code, or "client_disconnected" when the client
    left before `finished()`."""
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
        status = 200
        if outcome == "ok" and not finished():
            outcome, status = "client_disconnected", CLIENT_CLOSED
        log.info("request", status=status, outcome=outcome, **log_fields())
    if done:
        yield done


class Primed:
    """An SSE body already run up to its priming event (`SSE_PRIMING`), so that its cleanup (abort the
    generations, free the client's slot) runs even when the client leaves before the first byte: an async
    generator that never started never runs its `finally`, a started one is closed when dropped (by Quart's
    response, or by the event loop's finalizer when the response is never sent)."""

    def __init__(self, gen: AsyncGenerator[bytes, None]) -> None:
        self._gen = gen

    @classmethod
    async def start(cls, gen: AsyncGenerator[bytes, None]) -> Primed:
        """Raises RuntimeError when `gen` does not begin with the priming event."""
        if await anext(gen) != SSE_PRIMING:
            raise RuntimeError("an SSE body must yield SSE_PRIMING first")
        return cls(gen)

    def __aiter__(self) -> Primed:
        return self

    async def __anext__(self) -> bytes:
        return await anext(self._gen)

    async def aclose(self) -> None:
        await self._gen.aclose()
