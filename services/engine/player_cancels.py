"""A worker's side of the player and tenant cancels (`subjects.player_cancel_subject`).

Every worker hears every such cancel. It cancels the matching requests it is running, and remembers the cancel
for `REMEMBER_S` so that a matching request queued before it (its JetStream timestamp at or before the cancel)
ends at pickup instead of running. A request queued after the cancel runs: the player may play on.

The cancel's time is when this worker heard it, on this worker's clock, compared with the JetStream server's
timestamp of the request: hosts are expected to keep their clocks in step (NTP); skew shifts the line between
"queued before" and "queued after" by as much.
"""

from __future__ import annotations

import time
from collections import OrderedDict

from schemas import subjects
from schemas.inference import GenerateRequest

# Longer than any queue wait of the services' requests (their deadline) and the publishers' usual ones.
REMEMBER_S = 600.0
REMEMBER_MAX = 100_000

# (scope, tenant, player id or "" for the whole tenant)
_Key = tuple[str, str, str]


def _scopes(trace_id: str) -> tuple[str, ...]:
    """The scopes whose cancels reach a request: the services', and its publisher's when it has one."""
    owner = subjects.owner_of_trace(trace_id)
    return (subjects.SERVICES_SCOPE, owner) if owner else (subjects.SERVICES_SCOPE,)


class PlayerCancels:
    """The running requests by player, and the recent cancels. Not thread-safe: the worker's event loop only."""

    def __init__(self) -> None:
        self._running: dict[str, tuple[str, str]] = {}  # trace id -> (tenant, player id)
        self._heard: OrderedDict[_Key, float] = OrderedDict()  # -> epoch seconds, oldest first

    def started(self, request: GenerateRequest) -> None:
        meta = request.metadata
        if meta.tenant or meta.player_id:
            self._running[request.trace_id] = (meta.tenant, meta.player_id)

    def ended(self, trace_id: str) -> None:
        self._running.pop(trace_id, None)

    def heard(self, subject: str) -> list[str]:
        """Remember the cancel on `subject`; the trace ids of the running requests it cancels."""
        parsed = subjects.parse_player_cancel(subject)
        if parsed is None:
            return []
        self._remember(parsed)
        scope, tenant, player_id = parsed
        return [
            trace_id
            for trace_id, (t, p) in self._running.items()
            if t == tenant and (not player_id or p == player_id) and scope in _scopes(trace_id)
        ]

    def cancelled_before(self, request: GenerateRequest, queued_at: float | None) -> bool:
        """Whether a cancel heard at or after `queued_at` (epoch seconds; None: not known) covers `request`."""
        meta = request.metadata
        if queued_at is None or not (meta.tenant or meta.player_id):
            return False
        horizon = time.time() - REMEMBER_S
        for scope in _scopes(request.trace_id):
            for player_id in {meta.player_id, ""}:
                at = self._heard.get((scope, meta.tenant, player_id))
                if at is not None and at > horizon and queued_at <= at:
                    return True
        return False

    def _remember(self, key: _Key) -> None:
        """Bounded by age and count, oldest first (O(1) per cancel)."""
        now = time.time()
        self._heard.pop(key, None)
        self._heard[key] = now
        while self._heard:
            oldest, at = next(iter(self._heard.items()))
            if len(self._heard) <= REMEMBER_MAX and now - at < REMEMBER_S:
                break
            del self._heard[oldest]
