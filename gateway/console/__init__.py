"""The web console: static files (HTML, JS modules, CSS in `static/`) served at /console/ on the REST port.

The page itself holds nothing secret, so it loads without a key; every API call it makes sends `X-API-Key`
(the page asks for the key once and keeps it in the browser's session storage).

It is mounted as ASGI middleware in front of the Quart app rather than as routes: the console is not part of
the API, so it stays out of the app's URL map, its OpenAPI document (whose test demands that every registered
route be documented) and its authentication hook, which every /api/v1 route keeps unchanged.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import msgspec
from quart import Quart

from gateway.api_v1.errors import envelope
from schemas.errors import CyError, ErrorCode

PREFIX = "/console"
STATIC = Path(__file__).parent / "static"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[..., Awaitable[None]]

# Module scripts are refused by browsers unless served as JavaScript.
_TYPES = {
    ".html": b"text/html; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".svg": b"image/svg+xml",
}
# Same origin only: no inline script, no CDN, no other host to talk to (the page calls /api/v1 on this port).
_SECURITY = [
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        b"base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-cache"),
]


def mount(app: Quart) -> None:
    """Serve the console in front of `app` (Quart's documented way to wrap its ASGI callable)."""
    # Assigning over the method is the pattern Quart documents for ASGI middleware; mypy cannot know that.
    app.asgi_app = ConsoleFiles(app.asgi_app)  # type: ignore[method-assign, assignment]


class ConsoleFiles:
    """GET/HEAD of the files in `static/` under /console/; every other path goes to the wrapped app.

    The files (a few tens of KB) are read once at start into a table keyed by name: no disk I/O in the
    event loop, and no path is ever joined from client input, so nothing outside the folder can be reached.
    """

    def __init__(self, inner: ASGIApp, root: Path = STATIC) -> None:
        self.inner = inner
        self.files = {
            p.name: (_TYPES[p.suffix], p.read_bytes()) for p in root.iterdir() if p.is_file() and p.suffix in _TYPES
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if scope["type"] != "http" or (path != PREFIX and not path.startswith(PREFIX + "/")):
            await self.inner(scope, receive, send)
            return
        if path == PREFIX:  # relative module URLs in the page need the trailing slash
            await _send(send, 308, b"", [(b"location", (PREFIX + "/").encode())], head=False)
            return
        if scope["method"] not in ("GET", "HEAD"):
            await _error(send, 405, f"{scope['method']} is not allowed on the console", [(b"allow", b"GET, HEAD")])
            return
        name = path[len(PREFIX) + 1 :] or "index.html"
        found = self.files.get(name)
        if found is None:
            await _error(send, 404, f"no console file {path}")
            return
        content_type, body = found
        await _send(send, 200, body, [(b"content-type", content_type), *_SECURITY], head=scope["method"] == "HEAD")


async def _error(send: Send, status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    code = ErrorCode.INVALID_REQUEST
    body = msgspec.json.encode(envelope(CyError(code, message)))
    await _send(send, status, body, [(b"content-type", b"application/json"), *(headers or [])], head=False)


async def _send(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]], *, head: bool) -> None:
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else body})
