"""`Authorization: Bearer <GATEWAY_API_TOKEN>` on /v1 when the token is configured (compared in constant time)."""

from __future__ import annotations

import hmac

from quart import request

from schemas.errors import CyError, ErrorCode


def bearer_token() -> str:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def require_bearer(expected: str) -> None:
    """No-op when `expected` is empty; it may list several tokens separated by commas (one per client:
    rate limits are per token). Raises CyError(UNAUTHORIZED) for a missing or wrong token."""
    if not expected:
        return
    token = bearer_token()
    if not token:
        raise CyError(
            ErrorCode.UNAUTHORIZED,
            "You didn't provide an API key. Send it as `Authorization: Bearer <token>` "
            "(the gateway's GATEWAY_API_TOKEN).",
        )
    # Compare against every token (no early exit) so timing says nothing about which matched.
    matches = [hmac.compare_digest(token.encode(), key.strip().encode()) for key in expected.split(",") if key.strip()]
    if not any(matches):
        raise CyError(ErrorCode.UNAUTHORIZED, "Incorrect API key provided.")
