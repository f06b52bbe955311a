"""X-API-Key on every /api/v1 route, compared in constant time."""

from __future__ import annotations

import hmac

from quart import request

from schemas.errors import CyError, ErrorCode


def require_api_key(expected: str) -> None:
    """Raises CyError(UNAUTHORIZED) when the header is missing or wrong."""
    given = request.headers.get("X-API-Key", "")
    if not given:
        raise CyError(ErrorCode.UNAUTHORIZED, "missing X-API-Key header")
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise CyError(ErrorCode.UNAUTHORIZED, "invalid API key")
