"""Cache-aware routing: a session's next request goes to the worker that holds its conversation.

A game's player talks to an NPC over many turns, each turn's prompt the long persona plus the history so
far. The worker that served the last turn has all of it in its prefix cache; any other worker prefills it
from scratch (seconds for a long persona on a CPU). No coordinator process: workers advertise the sessions
they served in their heartbeat (`WorkerInfo.sessions`), and this gateway also remembers where it sent each
session. A request with an affinity key (GenerateRequest.affinity_key) is hinted to:
- the session's worker, while it is alive and has a free slot;
- nobody (the shared tier, any worker) when that worker is busy: waiting would cost more than a cold prefill;
- for a new session, or one whose worker died, the least loaded worker (ties: the one holding fewer sessions),
  so that sessions spread evenly and each stays where it started.
The hint is soft: a hinted request that no worker picks up within `affinity_wait` goes to the shared tier
(gateway/inference_client.py), and the session then belongs to whoever served it.
"""

from __future__ import annotations

from collections import Counter, OrderedDict

from gateway.workers import WorkersView
from schemas.inference import GenerateRequest
from schemas.workers import WorkerInfo

# How many sessions this gateway remembers (least recently used forgotten first).
REMEMBERED_SESSIONS = 100_000


class SessionRouter:
    def __init__(self, workers: WorkersView) -> None:
        self.workers = workers
        self._owner: OrderedDict[str, str] = OrderedDict()  # affinity key -> worker id
        self._in_flight: Counter[str] = Counter()  # worker id -> requests this gateway hinted there, not ended
        self._held: Counter[str] = Counter()  # worker id -> sessions in `_owner` that it holds (kept in step)

    def pick(self, request: GenerateRequest) -> str:
        """The worker to hint for `request` ("" = the shared tier)."""
        key = request.affinity_key()
        if not key:
            return ""
        candidates = {w.worker_id: w for w in self._serving(request)}
        if not candidates:
            return ""
        owner = self._owner.get(key)
        if owner not in candidates:
            owner = next((wid for wid, w in candidates.items() if key in w.sessions), None)
        if owner is not None:
            return owner if self._load(candidates[owner]) < 1.0 else ""
        best = min(candidates.values(), key=lambda w: (self._load(w), self._held[w.worker_id], w.worker_id))
        if self._load(best) >= 1.0:
            return ""
        self._remember(key, best.worker_id)
        return best.worker_id

    def started(self, hinted: str) -> None:
        """A request hinted to `hinted` ("" = none) is about to be queued."""
        if hinted:
            self._in_flight[hinted] += 1

    def ended(self, request: GenerateRequest, hinted: str, served_by: str) -> None:
        """`request`, hinted to `hinted` ("" = none), is over; `served_by` generated it ("" = nobody)."""
        if hinted:
            self._in_flight[hinted] -= 1
            if self._in_flight[hinted] <= 0:
                del self._in_flight[hinted]
        key = request.affinity_key()
        if key and served_by:
            self._remember(key, served_by)

    def _remember(self, key: str, worker_id: str) -> None:
        previous = self._owner.pop(key, None)
        if previous is not None:
            self._drop_held(previous)
        self._owner[key] = worker_id
        self._held[worker_id] += 1
        while len(self._owner) > REMEMBERED_SESSIONS:
            self._drop_held(self._owner.popitem(last=False)[1])

    def _drop_held(self, worker_id: str) -> None:
        self._held[worker_id] -= 1
        if self._held[worker_id] <= 0:
            del self._held[worker_id]

    def _serving(self, request: GenerateRequest) -> list[WorkerInfo]:
        """Live workers that serve the request's model (and have its adapter loaded, when it names one)."""
        return [
            w
            for w in self.workers.workers()
            if self.workers.is_alive(w.worker_id)
            and any(
                m.model_id == request.model_id
                and m.status == "ready"
                and (not request.adapter or request.adapter in m.adapters)
                for m in w.models
            )
        ]

    def _load(self, worker: WorkerInfo) -> float:
        """Busy share of the worker's slots: what its last heartbeat said, or what this gateway has sent it
        since (heartbeats lag by up to one interval), whichever is more."""
        busy = max(worker.slots_busy, self._in_flight[worker.worker_id])
        return busy / max(worker.slots_total, 1)
