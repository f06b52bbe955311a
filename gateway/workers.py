"""The gateway's live view of the workers, fed by the workers KV bucket (a core subscription on its subjects)."""

from __future__ import annotations

import time
from typing import Literal

import msgspec
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from schemas import codec, subjects
from schemas.workers import WorkerInfo
from services import kv_scan
from services.jetstream import WORKERS_TTL_S

log = structlog.get_logger()

# Per model, over the live workers: one has it loaded, one is loading it, all failed to load it, or none runs it.
ModelState = Literal["ready", "loading", "failed", "unavailable"]


class WorkersView:
    def __init__(self) -> None:
        self._workers: dict[str, WorkerInfo] = {}
        self._heard: dict[str, float] = {}  # worker id -> when this gateway last heard it (monotonic)

    async def start(self, nc: NATS, kv: KeyValue) -> None:
        await nc.subscribe(subjects.workers_updates(), cb=self._on_update)
        await self.reload(nc.jetstream(), kv)

    async def reload(self, js: JetStreamContext, kv: KeyValue) -> None:
        """Read every announcement stored in the bucket (at start, and after a reconnect)."""
        try:
            found = await kv_scan.entries(js, kv, subjects.WORKERS_BUCKET)
        except NatsError as exc:  # the live heartbeats fill the view anyway
            log.warning("workers_reload_failed", error=repr(exc))
            return
        for key, value in found.items():
            try:
                self._store(codec.worker_decoder.decode(value))
            except msgspec.DecodeError as exc:
                log.warning("worker_announcement_undecodable", key=key, error=repr(exc))

    def _store(self, info: WorkerInfo) -> None:
        self._workers[info.worker_id] = info
        self._heard[info.worker_id] = time.monotonic()

    def silent_for(self, worker_id: str) -> float:
        """Seconds since this gateway last received `worker_id`'s heartbeat (its own clock: no skew)."""
        return time.monotonic() - self._heard.get(worker_id, float("-inf"))

    def is_lost(self, worker_id: str) -> bool:
        """A worker that serves a stream is lost after three missed heartbeats (1.5 s at the default 0.5 s),
        or when it is gone from the bucket or stale by its own clock."""
        info = self._workers.get(worker_id)
        if info is None or not self.is_healthy(info):
            return True
        return self.silent_for(worker_id) > max(3 * info.heartbeat_interval, 1.0)

    async def _on_update(self, msg: Msg) -> None:
        op = (msg.headers or {}).get("KV-Operation")
        if op in ("DEL", "PURGE"):
            for wid in [w for w in self._workers if subjects.worker_key(w) == msg.subject.rsplit(".", 1)[-1]]:
                self._workers.pop(wid, None)
                self._heard.pop(wid, None)
            return
        try:
            self._store(codec.worker_decoder.decode(msg.data))
        except Exception as exc:
            log.warning("worker_announcement_undecodable", error=repr(exc))

    # --- derived state ---------------------------------------------------------------------------
    @staticmethod
    def age(info: WorkerInfo) -> float:
        return time.time() - info.heartbeat_ms / 1000

    def is_healthy(self, info: WorkerInfo) -> bool:
        return self.age(info) <= 3 * info.heartbeat_interval + 1.0

    def workers(self) -> list[WorkerInfo]:
        """Known workers, forgetting those silent for longer than the bucket TTL."""
        for wid, info in list(self._workers.items()):
            if self.age(info) > WORKERS_TTL_S:
                del self._workers[wid]
        return list(self._workers.values())

    def get(self, worker_id: str) -> WorkerInfo | None:
        return self._workers.get(worker_id)

    def is_alive(self, worker_id: str) -> bool:
        info = self._workers.get(worker_id)
        return info is not None and self.is_healthy(info) and not info.draining

    def model_state(self, model_id: str) -> ModelState:
        states = [
            m.status
            for w in self.workers()
            if self.is_healthy(w) and not w.draining
            for m in w.models
            if m.model_id == model_id
        ]
        for state in ("ready", "loading", "failed"):
            if state in states:
                return state  # type: ignore[return-value]
        return "unavailable"

    def adapters(self, model_id: str) -> list[str]:
        names: set[str] = set()
        for w in self.workers():
            if self.is_healthy(w):
                for m in w.models:
                    if m.model_id == model_id:
                        names.update(m.adapters)
        return sorted(names)

    def engines(self, model_id: str) -> list[str]:
        return sorted({m.engine for w in self.workers() for m in w.models if m.model_id == model_id})

    def counts(self) -> tuple[int, int, int]:
        ws = self.workers()
        healthy = sum(1 for w in ws if self.is_healthy(w))
        return len(ws), healthy, len(ws) - healthy
