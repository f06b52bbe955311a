"""Per-client limits at the HTTP edge: requests per minute (token bucket) and concurrent streams.

State is per gateway process; with several gateways each enforces its own share (documented).
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

from schemas.errors import CyError, ErrorCode


@dataclass
class _Bucket:
    tokens: float
    updated: float
    active: int = 0


class RateLimiter:
    def __init__(self, per_minute: int, concurrent: int, max_clients: int = 100_000) -> None:
        self.per_minute = per_minute
        self.concurrent = concurrent
        self._max_clients = max_clients
        self._buckets: dict[str, _Bucket] = {}

    @staticmethod
    def client_key(secret: str, fallback: str) -> str:
        """Limits are per API key (hashed, never stored in clear); anonymous callers by address."""
        return hashlib.sha256(secret.encode()).hexdigest()[:16] if secret else f"addr:{fallback}"

    def _bucket(self, key: str, now: float) -> _Bucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._max_clients:
                self._buckets = {k: b for k, b in self._buckets.items() if b.active}
            bucket = self._buckets[key] = _Bucket(tokens=float(self.per_minute), updated=now)
        elif self.per_minute:
            rate = self.per_minute / 60.0
            bucket.tokens = min(float(self.per_minute), bucket.tokens + (now - bucket.updated) * rate)
            bucket.updated = now
        return bucket

    @contextlib.contextmanager
    def hold(self, key: str) -> Iterator[None]:
        """Admit one request for its whole duration. Raises CyError(RATE_LIMITED) with retry_after."""
        now = time.monotonic()
        bucket = self._bucket(key, now)
        if self.concurrent and bucket.active >= self.concurrent:
            raise CyError(
                ErrorCode.RATE_LIMITED,
                f"too many concurrent requests for this client (limit {self.concurrent})",
                retryable=True,
                retry_after=1,
            )
        if self.per_minute:
            if bucket.tokens < 1.0:
                wait = (1.0 - bucket.tokens) * 60.0 / self.per_minute
                raise CyError(
                    ErrorCode.RATE_LIMITED,
                    f"rate limit of {self.per_minute} requests per minute exceeded",
                    retryable=True,
                    retry_after=max(1.0, wait),
                )
            bucket.tokens -= 1.0
        bucket.active += 1
        try:
            yield
        finally:
            bucket.active -= 1
