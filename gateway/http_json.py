"""JSON at the HTTP edge, shared by both faces (/api/v1 and /v1): the response helper, the body of a JSON
route and the reason a body could not be read. Each face's own error shape lives in its `errors.py`."""

from __future__ import annotations

from typing import Any

import msgspec
from quart import Response, request

from schemas.errors import CyError, ErrorCode, ErrorDetail

# Longest Content-Type quoted back in a 415 (the header may be up to the 16 KiB head limit).
_QUOTED_TYPE_CHARS = 80


def json_response(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(msgspec.json.encode(payload), status=status, headers=headers, content_type="application/json")


class UnsupportedMediaType(CyError):
    """A JSON route's body sent as something else: 415 on both faces (an INVALID_REQUEST whose detail is
    `unsupported_media_type` on `Content-Type`)."""

    def __init__(self, given: str) -> None:
        super().__init__(
            ErrorCode.INVALID_REQUEST,
            f"this route takes a JSON body: send it with Content-Type: application/json (got {given})",
            details=[
                ErrorDetail(
                    type="unsupported_media_type", field="Content-Type", description=f"{given} is not application/json"
                )
            ],
        )

    @property
    def status(self) -> int:
        return 415


async def json_body() -> bytes:
    """The raw body of a JSON route, to decode with the face's own decoder.

    Content-Type must be `application/json`; its parameters (`charset=utf-8`) are ignored. A request without
    any Content-Type is read as JSON too, for clients that never send one (docs/api.md). Anything else
    (`text/plain`, a form, `curl -d` without `-H`) raises UnsupportedMediaType before the body is read.
    """
    mimetype = request.mimetype  # lowercased, parameters dropped; "" when the header is missing
    if mimetype not in ("", "application/json"):
        raise UnsupportedMediaType(mimetype[:_QUOTED_TYPE_CHARS])
    data: bytes = await request.get_data(as_text=False)  # type: ignore[assignment]
    return data


def unreadable_json(exc: UnicodeDecodeError | RecursionError) -> str:
    """Why msgspec could not read a body, for the two failures it does not raise as DecodeError: bytes that
    are not UTF-8 inside a string, and arrays/objects nested past the recursion limit (an `Any` field takes
    any depth). The reason never quotes the body: it would carry prompt text into responses and logs."""
    if isinstance(exc, UnicodeDecodeError):
        return f"a string is not valid UTF-8 ({exc.reason})"
    return "arrays or objects are nested too deeply"
