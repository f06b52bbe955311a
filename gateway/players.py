"""A gateway's view of the players (`metadata.tenant` + `metadata.playerId`): how many requests each tenant and
player has open here (the concurrency limits), and which streams to end when a player or a tenant is cancelled.

Limits are counted per gateway process, like `rate_limit_concurrent` (gateway/ratelimit.py says why): with N
gateways a tenant may hold up to N x `tenant_max_concurrent` generations. A count is one generation: an
OpenAI request with `n` choices holds `n`. Requests without a tenant count for the tenant "" (the limit applies
to them together), requests without a player id are not counted per player.

A cancel (`cancel_player`, or one heard on `subjects.player_cancel_subject`, whoever sent it) ends this gateway's
open streams of the player or tenant: a request still queued is taken back and its stream ends here as
cancelled; one a worker has is cancelled by that worker (it hears the same cancel) with its usual cancelled
ending. Only the services' scope reaches the gateway's streams: a direct publisher's cancel reaches only that
publisher's own requests, which no gateway streams.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from typing import Any

import structlog

from gateway.inference_client import InferenceClient, ReplyStream
from schemas import subjects
from schemas.errors import CyError, ErrorCode
from schemas.inference import GenerateRequest

log = structlog.get_logger()

# Seconds a client refused for concurrency should wait (a generation usually frees its slot within that).
RETRY_AFTER_S = 1.0


@dataclass(eq=False)
class Held:
    """One admitted generation; `stream` once it is open."""

    tenant: str
    player_id: str
    stream: ReplyStream | None = None
    cancelled: bool = False


class Players:
    def __init__(self, tenant_max: int, player_max: int) -> None:
        self.tenant_max = tenant_max
        self.player_max = player_max
        self._tenants: Counter[str] = Counter()
        self._players: Counter[tuple[str, str]] = Counter()
        self._held: set[Held] = set()
        self._tasks: set[asyncio.Task[bool]] = set()  # take-backs under way (strong references)

    @contextlib.contextmanager
    def holding(self, request: GenerateRequest) -> Iterator[Held]:
        """Count `request` against its tenant's and player's limits while the block runs. Raises
        CyError(RATE_LIMITED, retry_after) when either is at its limit."""
        tenant, player_id = request.metadata.tenant, request.metadata.player_id
        player = (tenant, player_id)
        if self.tenant_max and self._tenants[tenant] >= self.tenant_max:
            raise _limited(f"too many concurrent requests for tenant {tenant!r} (limit {self.tenant_max})")
        if self.player_max and player_id and self._players[player] >= self.player_max:
            raise _limited(f"too many concurrent requests for player {player_id!r} (limit {self.player_max})")
        held = Held(tenant, player_id)
        self._tenants[tenant] += 1
        if player_id:
            self._players[player] += 1
        self._held.add(held)
        try:
            yield held
        finally:
            self._held.discard(held)
            self._tenants[tenant] -= 1
            if not self._tenants[tenant]:
                del self._tenants[tenant]
            if player_id:
                self._players[player] -= 1
                if not self._players[player]:
                    del self._players[player]

    def opened(self, held: Held, stream: ReplyStream, inference: InferenceClient) -> None:
        """`held`'s stream is open (its request queued); a cancel that came while it opened ends it now."""
        held.stream = stream
        if held.cancelled:
            self._spawn(inference.end_queued(stream))

    def _spawn(self, work: Coroutine[Any, Any, bool]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def open_count(self, tenant: str, player_id: str = "") -> int:
        return self._players[(tenant, player_id)] if player_id else self._tenants[tenant]

    def cancel_player(self, inference: InferenceClient, tenant: str, player_id: str = "") -> int:
        """End this gateway's open requests of `player_id` in `tenant` (every player's when empty); how many.
        Those still queued are taken back in the background (the count does not wait for NATS)."""
        matched = [
            held
            for held in self._held
            if held.tenant == tenant and (not player_id or held.player_id == player_id) and not held.cancelled
        ]
        for held in matched:
            held.cancelled = True
            if held.stream is not None:
                self._spawn(inference.end_queued(held.stream))
        if matched:
            log.info("player_cancelled", tenant=tenant, player_id=player_id or None, streams=len(matched))
        return len(matched)

    def heard(self, inference: InferenceClient, subject: str) -> int:
        """A player cancel heard on NATS (another gateway's, or this one's own echo: already ended)."""
        parsed = subjects.parse_player_cancel(subject)
        if parsed is None or parsed[0] != subjects.SERVICES_SCOPE:
            return 0
        return self.cancel_player(inference, parsed[1], parsed[2])


def _limited(message: str) -> CyError:
    return CyError(ErrorCode.RATE_LIMITED, message, retryable=True, retry_after=RETRY_AFTER_S)
