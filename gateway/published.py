"""Direct publishers' requests for a model nobody serves end at once, with an error reply to their publisher,
instead of waiting in the queue until they age out (a publisher could otherwise fill its share of the queue
with requests that never run). The gateway hears every publish on the publishers' stream (a core
subscription, like the workers' doorbell) and sweeps it periodically for models whose workers went away."""

from __future__ import annotations

import asyncio
import time

import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import APIError, NotFoundError

from gateway.inference_client import LinkWatch
from gateway.workers import WorkersView
from schemas import codec, subjects
from schemas.errors import ErrorCode
from schemas.inference import StreamError
from services.models.registry import Registry
from services.runtime import Tasks

log = structlog.get_logger()

# Model states with no worker that will ever pick a request up.
_UNSERVED = frozenset({"unavailable", "failed"})
# After this gateway's NATS link comes back, workers look stale until their next heartbeat reaches it: no
# request is ended for this long, or a NATS restart would wipe the publishers' queued work.
SETTLE_S = 10.0


class UnservedRequests:
    def __init__(
        self, nc: NATS, js: JetStreamContext, workers: WorkersView, registry: Registry, link: LinkWatch
    ) -> None:
        self._nc, self._js, self._workers, self._registry, self._link = nc, js, workers, registry, link
        self._tasks = Tasks()
        self._ending: set[str] = set()  # subjects being swept now
        self._again: set[str] = set()  # ... on which more came meanwhile

    async def start(self) -> None:
        await self._nc.subscribe(subjects.PUBLISHED_SUBJECTS, cb=self._on_publish)

    async def close(self) -> None:
        self._tasks.cancel_all()
        await self._tasks.close(timeout=1)

    def _unserved(self, subject: str) -> bool:
        if not self._link.up or time.monotonic() - self._link.dropped_at < SETTLE_S:
            return False
        return self._workers.model_state(subjects.model_of_request_subject(subject)) in _UNSERVED

    async def _on_publish(self, msg: Msg) -> None:
        if not self._unserved(msg.subject):
            return
        if msg.subject in self._ending:  # being swept: it may have passed this one's sequence already
            self._again.add(msg.subject)
            return
        self._ending.add(msg.subject)
        self._tasks.spawn(self._end_subject(msg.subject), name="end-unserved")

    async def sweep(self) -> int:
        """End what waits for unserved models (run periodically). Returns how many requests were ended."""
        info = await self._js.stream_info(subjects.PUBLISHED_STREAM, subjects_filter=subjects.PUBLISHED_SUBJECTS)
        ended = 0
        for subject in info.state.subjects or {}:
            if self._unserved(subject) and subject not in self._ending:
                self._ending.add(subject)
                ended += await self._end_subject(subject)
        return ended

    async def _end_subject(self, subject: str) -> int:
        """Take every request queued on `subject` out and tell each publisher why. Deleting is atomic, so
        with several gateways each request gets exactly one reply."""
        ended = 0
        try:
            await asyncio.sleep(0.05)  # the publish is stored by the time its copy reaches us; be sure
            seq = 0
            while True:
                try:
                    raw = await self._js.get_msg(subjects.PUBLISHED_STREAM, seq=seq + 1, subject=subject, next=True)
                except NotFoundError:
                    if subject not in self._again:
                        break
                    self._again.discard(subject)
                    await asyncio.sleep(0.05)
                    continue
                seq = int(raw.seq or 0)
                try:
                    if not await self._js.delete_msg(subjects.PUBLISHED_STREAM, seq):
                        continue
                except (NotFoundError, APIError):  # a worker or another gateway took it
                    continue
                ended += 1
                await self._reply(subject, raw.data or b"")
        except Exception as exc:  # NATS down: the next sweep tries again
            log.warning("unserved_requests_not_ended", subject=subject, error=repr(exc))
        finally:
            self._ending.discard(subject)
        if ended:
            log.warning("unserved_requests_ended", subject=subject, ended=ended)
        return ended

    async def _reply(self, subject: str, data: bytes) -> None:
        owner = subjects.owner_of_request_subject(subject) or ""
        try:
            trace_id = codec.request_decoder.decode(data).trace_id
        except (codec.DecodeError, codec.ValidationError):
            return
        if subjects.owner_of_trace(trace_id) != owner:
            trace_id = subjects.rehomed_trace_id(owner, trace_id)
        if not subjects.is_valid_trace_id(trace_id):
            return
        model_id = subjects.model_of_request_subject(subject)
        if self._registry.resolve(model_id) is None and not self._workers.engines(model_id):
            code, message, retryable = ErrorCode.MODEL_NOT_FOUND, f"model {model_id!r} is not configured", False
        else:
            code, message, retryable = ErrorCode.INSUFFICIENT_RESOURCES, f"no worker is serving {model_id!r}", True
        await self._nc.publish(
            subjects.stream_subject(trace_id),
            codec.encode(StreamError(trace_id=trace_id, code=code, message=message, retryable=retryable)),
        )
