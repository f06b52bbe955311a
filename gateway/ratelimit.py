"""Per-client limits at the HTTP edge: requests per minute and concurrent requests.

Requests per minute are shared by every gateway through NATS KV (`subjects.RATELIMITS_BUCKET`) when the
gateway is attached to it (`attach`), so N gateways enforce one limit:

- algorithm: a sliding window estimated from two fixed windows of `window_s` (60 s) per client. The
  counter of a client's window lives under key `<client>.<limit>.<window number>` (gateways configured
  with another limit count apart). A request is admitted while `this window's count + the last window's
  count x the share of the last window less than 60 s ago` stays below the limit, and counted with a
  compare-and-set (`kv.update(key, n + 1, last=revision)`, `kv.create` for the window's first request)
  retried on a conflict: increments are never lost, no window ever counts more than `per_minute`, however
  many gateways there are, and a client at its limit regains requests at the limit's pace (one every
  60/limit s), as with the token bucket below. The bucket's max age (two windows) drops old counters.
- burst bound: at most `per_minute` admitted in one fixed window; in any 60 s straddling two windows the
  estimate keeps it near `per_minute`, at worst 2 x `per_minute` (a burst at the very end of one window,
  the next one when the estimate has decayed) -- the bound of the per-process token bucket, which starts
  full and refills while its tokens are spent.
- NATS unavailable (disconnected, a KV call failing or slower than `SHARED_TIMEOUT_S`): fail open to the
  per-process token bucket, i.e. each gateway then enforces the whole limit on its own (N gateways admit
  at most N x `per_minute`); it is logged and the shared counter is used again as soon as it answers.

Concurrent requests stay per gateway process: sharing them would need a KV write at the end of every
request and leases for the slots of a gateway that dies mid-request; each gateway admits up to
`concurrent` open requests per client.

`hold(key)` is an async context manager (shared counting); used as a plain `with` it counts in this
process only.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

import structlog
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from schemas import subjects
from schemas.errors import CyError, ErrorCode

log = structlog.get_logger()

WINDOW_S = 60.0
# A shared admission slower than this falls back to the local bucket (NATS in trouble).
SHARED_TIMEOUT_S = 1.0
# Compare-and-set attempts per request (each conflict means another gateway admitted one meanwhile).
_CAS_TRIES = 16


@dataclass
class _Bucket:
    tokens: float
    updated: float
    active: int = 0


class RateLimiter:
    def __init__(
        self, per_minute: int, concurrent: int, max_clients: int = 100_000, *, window_s: float = WINDOW_S
    ) -> None:
        self.per_minute = per_minute
        self.concurrent = concurrent
        self.window_s = window_s
        self._max_clients = max_clients
        self._buckets: dict[str, _Bucket] = {}
        self._kv: KeyValue | None = None
        self._connected: Callable[[], bool] = lambda: True
        # Last (count, revision) seen per counter key of the current window: one round trip per request
        # while this gateway's view is current, a re-read after a conflict.
        self._seen: dict[str, tuple[int, int]] = {}
        self._seen_window = -1
        self._previous: dict[str, int] = {}  # client -> its count in the window before the current one
        # One shared admission at a time per client in this gateway: concurrent requests of one client would
        # otherwise collide on their own compare-and-set (measured: 4 of 32 simultaneous requests refused).
        self._locks: dict[str, asyncio.Lock] = {}
        self.shared_failures = 0

    def attach(self, kv: KeyValue, connected: Callable[[], bool]) -> None:
        """Count requests per minute in `kv` (shared with every gateway) while `connected()`."""
        self._kv, self._connected = kv, connected

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

    def hold(self, key: str) -> _Hold:
        """Admit one request for its whole duration. Raises CyError(RATE_LIMITED) with retry_after."""
        return _Hold(self, key)

    def _check_concurrent(self, bucket: _Bucket) -> None:
        if self.concurrent and bucket.active >= self.concurrent:
            raise CyError(
                ErrorCode.RATE_LIMITED,
                f"too many concurrent requests for this client (limit {self.concurrent})",
                retryable=True,
                retry_after=1,
            )

    def _take_local(self, bucket: _Bucket) -> None:
        if not self.per_minute:
            return
        if bucket.tokens < 1.0:
            wait = (1.0 - bucket.tokens) * 60.0 / self.per_minute
            raise self._limited(wait)
        bucket.tokens -= 1.0

    def _limited(self, wait: float) -> CyError:
        return CyError(
            ErrorCode.RATE_LIMITED,
            f"rate limit of {self.per_minute} requests per minute exceeded",
            retryable=True,
            retry_after=max(1.0, wait),
        )

    async def _take(self, key: str, bucket: _Bucket) -> None:
        """One request per minute: from the shared counter, else (NATS unavailable) the local bucket."""
        if not self.per_minute:
            return
        if self._kv is not None and self._connected():
            lock = self._locks.setdefault(key, asyncio.Lock())
            try:
                async with asyncio.timeout(SHARED_TIMEOUT_S), lock:
                    await self._take_shared(self._kv, key)
                return
            except CyError:
                raise
            except Exception as exc:  # fail open to this process's own count
                self.shared_failures += 1
                log.warning("rate_limit_shared_unavailable", error=repr(exc))
        self._take_local(bucket)

    async def _take_shared(self, kv: KeyValue, client: str) -> None:
        now = time.time()
        window = int(now // self.window_s)
        if window != self._seen_window:
            self._seen, self._previous, self._seen_window = {}, {}, window
            self._locks = {k: v for k, v in self._locks.items() if v.locked()}
        previous = self._previous.get(client)
        if previous is None:  # the last window's final count, read once per window
            previous = self._previous[client] = (
                await _read(kv, subjects.ratelimit_key(client, self.per_minute, window - 1))
            )[0]
        # The last window's requests still weigh by the share of it that is less than window_s ago.
        elapsed = now / self.window_s - window
        carried = previous * (1.0 - elapsed)
        key = subjects.ratelimit_key(client, self.per_minute, window)
        for _ in range(_CAS_TRIES):
            seen = self._seen.get(key) or await _read(kv, key)
            count, revision = seen
            if count + carried > self.per_minute - 1:
                self._seen[key] = seen
                raise self._limited(self._wait(count, previous, elapsed))
            try:
                if revision:
                    revision = await kv.update(key, str(count + 1).encode(), last=revision)
                else:
                    revision = await kv.create(key, b"1")
            except KeyWrongLastSequenceError:  # another gateway counted one meanwhile: re-read
                self._seen.pop(key, None)
                continue
            self._seen[key] = (count + 1, revision)
            return
        # Other gateways kept counting this client's requests faster than this one could: the limit is being
        # enforced around us; let this one through rather than refuse it for contention (logged, counted).
        self.shared_failures += 1
        log.warning("rate_limit_shared_contended", tries=_CAS_TRIES)

    def _wait(self, count: int, previous: int, elapsed: float) -> float:
        """Seconds until the estimate lets one more request in, if no other is counted meanwhile (at most
        one window: a true sliding window frees a slot within that)."""
        room = self.per_minute - 1 - count
        if room >= 0 and previous:  # later in this window, as the last one's weight decays
            wait = (1.0 - room / previous - elapsed) * self.window_s
        else:  # in the next window, once this one's weight has decayed enough
            wait = (1.0 - elapsed + 1.0 - (self.per_minute - 1) / max(count, 1)) * self.window_s
        return min(wait, self.window_s)


async def _read(kv: KeyValue, key: str) -> tuple[int, int]:
    """(count, revision) of a counter; (0, 0) when it does not exist."""
    try:
        entry = await kv.get(key)
    except KeyNotFoundError:
        return 0, 0
    return int(entry.value or b"0"), int(entry.revision or 0)


class _Hold:
    """The client's slot: `async with` counts per minute across gateways, `with` in this process only."""

    def __init__(self, limiter: RateLimiter, key: str) -> None:
        self._limiter = limiter
        self._key = key
        self._bucket: _Bucket | None = None

    def _enter(self) -> _Bucket:
        bucket = self._limiter._bucket(self._key, time.monotonic())
        self._limiter._check_concurrent(bucket)
        return bucket

    def __enter__(self) -> None:
        bucket = self._enter()
        self._limiter._take_local(bucket)
        bucket.active += 1
        self._bucket = bucket

    async def __aenter__(self) -> None:
        bucket = self._enter()
        bucket.active += 1  # reserved while the shared counter is asked (no second request slips past)
        try:
            await self._limiter._take(self._key, bucket)
        except BaseException:
            bucket.active -= 1
            raise
        self._bucket = bucket

    def __exit__(self, *exc: object) -> None:
        if self._bucket is not None:
            self._bucket.active -= 1
            self._bucket = None

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.__exit__()
