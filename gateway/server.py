"""The HTTP layer under both apps (hypercorn, werkzeug's router), made to answer everything it refuses in
the refusing API's own error shape instead of an empty body or an HTML page.

- A request head that hypercorn's HTTP/1.1 parser (h11) refuses never reaches the app: headers larger than
  `MAX_HEAD_BYTES` (431) or malformed ones such as a NUL in a header value (400). hypercorn then writes a
  bare status with no body and has no hook for it, so `_EnvelopedH11Protocol` renders the body with the
  renderer the app registered through `harden()`.
- werkzeug merges `//` inside a path and answers with an HTML 308 redirect (`merge_slashes`), and it matches
  `//api/v1/x` as `/api/v1/x` (it strips leading slashes). A path with an empty segment names no route
  here: `harden()` turns the merging off and `refuse_empty_segments()` makes both a 404.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import h11
import hypercorn.protocol
from hypercorn.config import Config as HypercornConfig
from hypercorn.protocol.h11 import H11Protocol
from quart import Quart, request
from werkzeug.exceptions import NotFound

from schemas.errors import CyError, ErrorCode, ErrorDetail

# Request line + headers; hypercorn's default (h11_max_incomplete_size), stated so the 431 can name it.
MAX_HEAD_BYTES = 16 * 1024

# error -> (JSON body, extra headers), in the shape of the app that owns the port.
ErrorRenderer = Callable[[CyError], tuple[bytes, dict[str, str]]]

_RENDERER = "cy_llm_protocol_error"


def hypercorn_config(host: str, port: int) -> HypercornConfig:
    config = HypercornConfig()
    config.bind = [f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = None
    # After the shutdown trigger: the gateway has drained by then (CY_LLM_DRAIN_TIMEOUT, then it ends what is
    # still open: GatewayCore.drain), so this only lets the last error events and closes go out.
    config.graceful_timeout = 5
    config.keep_alive_timeout = 75
    config.h11_max_incomplete_size = MAX_HEAD_BYTES
    return config


def harden(app: Quart, render: ErrorRenderer) -> None:
    """Call before registering routes: routing that never redirects, and `render` for the requests that
    hypercorn refuses before `app` runs."""
    app.url_map.merge_slashes = False  # read by each rule when it is added
    app.extensions[_RENDERER] = render
    # Process-wide, but only for apps that registered a renderer (others keep hypercorn's bare answer).
    hypercorn.protocol.H11Protocol = _EnvelopedH11Protocol  # type: ignore[misc]


def sent_path() -> str:
    """The path as the client sent it (werkzeug's `request.path` has leading slashes collapsed)."""
    path: str = request.scope.get("path") or request.path
    return path


def refuse_empty_segments() -> None:
    """Raises NotFound for a path with an empty segment (`//api/v1/x`, `/api//v1/x`)."""
    if "//" in sent_path():
        raise NotFound()


def protocol_error(status: int) -> CyError:
    """The error for a request head that h11 refused with `status`."""
    if status == 431:
        return CyError(
            ErrorCode.INVALID_REQUEST,
            f"the request line and headers exceed {MAX_HEAD_BYTES} bytes",
            details=[ErrorDetail(type="request_headers_too_large")],
        )
    # h11's own reason quotes the offending line (it may hold a credential): not echoed.
    return CyError(
        ErrorCode.INVALID_REQUEST,
        "malformed HTTP request: its request line or headers could not be parsed (HTTP/1.1, RFC 9112)",
        details=[ErrorDetail(type="malformed_http_request")],
    )


class _EnvelopedH11Protocol(H11Protocol):
    async def _send_error_response(self, status_code: int) -> None:
        # hypercorn wraps an ASGI app in ASGIWrapper, which keeps it as `.app`.
        app: Any = getattr(self.app, "app", None)
        render: ErrorRenderer | None = getattr(app, "extensions", {}).get(_RENDERER)
        if render is None:
            await super()._send_error_response(status_code)
            return
        body, extra = render(protocol_error(status_code))
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
            *((name.lower().encode(), value.encode()) for name, value in extra.items()),
            *self.config.response_headers("h11"),
        ]
        await self._send_h11_event(h11.Response(status_code=status_code, headers=headers))
        await self._send_h11_event(h11.Data(data=body))
        await self._send_h11_event(h11.EndOfMessage())
