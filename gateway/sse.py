"""Server-sent events framing shared by both APIs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import msgspec
from quart import Response

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
