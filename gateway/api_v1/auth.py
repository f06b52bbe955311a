"""X-API-Key on every /api/v1 route, compared in constant time."""

from __future__ import annotations

import hmac

from quart import request

from schemas.errors import CyError, ErrorCode


def require_api_key(expected: str) -> None:
    """Raises CyError(UNAUTHORIZED) when the header is missing or wrong.

    `expected` may list several keys separated by commas (one per client: rate limits are per key).
    """
    given = request.headers.get("X-API-Key", "")
    if not given:
        raise CyError(ErrorCode.UNAUTHORIZED, "missing X-API-Key header")
    # Compare against every key (no early exit) so timing says nothing about which matched.
    matches = [hmac.compare_digest(given.encode(), key.strip().encode()) for key in expected.split(",") if key.strip()]
    if not any(matches):
        raise CyError(ErrorCode.UNAUTHORIZED, "invalid API key")
