"""The /api/v1 error envelope (`{"error": {"code", "message", "details"}}`): CyError and request-body decoding
failures mapped to it."""

from __future__ import annotations

import re
from typing import Any, TypeVar

import msgspec
from quart import Response

from gateway.http_json import json_response, unreadable_json
from schemas.errors import CyError, ErrorCode, ErrorDetail, invalid

T = TypeVar("T")

_PATH = re.compile(r"at `\$\.?([^`]*)`")
_MISSING = re.compile(r"missing required field `([^`]+)`")


def envelope(error: CyError) -> dict[str, Any]:
    body = error.body
    return {
        "error": {
            "code": body.code.value,
            "message": body.message,
            "details": [msgspec.to_builtins(d) for d in body.details],
        }
    }


def error_response(error: CyError) -> Response:
    headers = {"Retry-After": str(max(1, round(error.body.retry_after)))} if error.body.retry_after else None
    return json_response(envelope(error), status=error.status, headers=headers)


def decode_body(data: bytes, type_: type[T]) -> T:
    """Decode a JSON body into `type_`. Raises CyError(INVALID_REQUEST) naming the bad field."""
    if not data.strip():
        raise CyError(
            ErrorCode.INVALID_REQUEST,
            "the request body is empty; send a JSON object",
            details=[ErrorDetail(type="missing_body")],
        )
    try:
        return msgspec.json.decode(data, type=type_)
    except msgspec.ValidationError as exc:
        text = str(exc)
        missing = _MISSING.search(text)
        path = _PATH.search(text)
        field = (path.group(1) if path else "") or ""
        if missing:
            field = f"{field}.{missing.group(1)}" if field else missing.group(1)
            raise invalid(field, text.split(" - at ")[0], type_="missing_field") from exc
        raise invalid(field or "body", text.split(" - at ")[0]) from exc
    except msgspec.DecodeError as exc:
        raise CyError(
            ErrorCode.INVALID_REQUEST,
            f"malformed JSON body: {exc}",
            details=[ErrorDetail(type="malformed_json", description=str(exc))],
        ) from exc
    except (UnicodeDecodeError, RecursionError) as exc:
        reason = unreadable_json(exc)
        raise CyError(
            ErrorCode.INVALID_REQUEST,
            f"malformed JSON body: {reason}",
            details=[ErrorDetail(type="malformed_json", description=reason)],
        ) from None
