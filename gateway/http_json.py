"""JSON at the HTTP edge, shared by both faces (/api/v1 and /v1): the response helper and the reason a body
could not be read. Each face's own error shape lives in its `errors.py`."""

from __future__ import annotations

from typing import Any

import msgspec
from quart import Response


def json_response(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(msgspec.json.encode(payload), status=status, headers=headers, content_type="application/json")


def unreadable_json(exc: UnicodeDecodeError | RecursionError) -> str:
    """Why msgspec could not read a body, for the two failures it does not raise as DecodeError: bytes that
    are not UTF-8 inside a string, and arrays/objects nested past the recursion limit (an `Any` field takes
    any depth). The reason never quotes the body: it would carry prompt text into responses and logs."""
    if isinstance(exc, UnicodeDecodeError):
        return f"a string is not valid UTF-8 ({exc.reason})"
    return "arrays or objects are nested too deeply"
