"""Publish a GenerateRequest on the work queue and iterate its replies; cancel when the caller leaves."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import msgspec
import structlog
from nats.aio.client import Client as NATS
from nats.aio.subscription import Subscription
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.errors import APIError, NotFoundError

from gateway.workers import WorkersView
from schemas import codec, subjects
from schemas.errors import CyError, ErrorCode
from schemas.inference import Accepted, GenerateRequest, Reply, StreamEnd, StreamError, TokenChunk
from services.runtime import raise_if_cancelled, shielded

log = structlog.get_logger()

_QUEUE_FULL = 10077  # JetStream: maximum messages exceeded (discard=new)
# Seconds between re-sends, after a reconnect, of the cancels sent while NATS was down.
ORPHAN_CANCEL_RESENDS_S = (0.5, 1.0, 2.0)


class _WorkerLost(Exception):
    pass


class _HintedWorkerGone(Exception):
    pass


class LinkWatch:
    """Counts the drops of one NATS connection. Replies are core-NATS messages: any that a worker published
    while we were disconnected are gone, so a stream that was open across a drop cannot be trusted to be
    complete. Also tells new requests when the link is back (they wait for it rather than fail)."""

    def __init__(self) -> None:
        self.drops = 0
        self.dropped_at = float("-inf")  # monotonic time of the last drop
        self._up = asyncio.Event()
        self._up.set()

    def dropped(self) -> None:
        self.drops += 1
        self.dropped_at = time.monotonic()
        self._up.clear()

    def restored(self) -> None:
        self._up.set()

    @property
    def up(self) -> bool:
        return self._up.is_set()

    async def wait_up(self, timeout: float) -> bool:
        """Wait up to `timeout` s for the link; False if it is still down."""
        try:
            await asyncio.wait_for(self._up.wait(), timeout)
        except TimeoutError:
            return False
        return True


class Queued(msgspec.Struct, frozen=True):
    """Where a request waits in the work queue: its subject and its stream sequence (to take it back)."""

    subject: str
    seq: int


class ReplyStream:
    """Replies of one request, in order, with the deadlines and worker-liveness checks applied.

    A worker that dies after accepting but before sending any text is retried once on another
    worker, transparently; one that dies later ends the stream with a retryable INTERNAL_ERROR.
    """

    def __init__(
        self,
        sub: Subscription,
        request: GenerateRequest,
        workers: WorkersView,
        *,
        queue_timeout: float,
        request_timeout: float,
        requeue: Callable[[GenerateRequest], Awaitable[Queued]] | None = None,
        reroute: Callable[[Queued, GenerateRequest], Awaitable[Queued | None]] | None = None,
        link: LinkWatch | None = None,
        retries: int = 1,
    ) -> None:
        self._sub = sub
        self.request = request
        self._workers = workers
        self._reroute = reroute
        self._link = link or LinkWatch()
        self._drops = self._link.drops
        self.queued: Queued | None = None
        self.replied = False
        self._queue_timeout = queue_timeout
        self._request_timeout = request_timeout
        self._accepted_at: float | None = None
        self._next_index = 0
        self._requeue = requeue
        self._retries = retries
        self.worker_id = ""
        self.finished = False
        self.ended = False  # the worker sent its end or error: nothing runs there any more
        self.started = self._queued_at = time.monotonic()

    async def next(self, wait: float = float("inf")) -> Reply | None:
        """The next reply, or None when nothing came within `wait` seconds (keep-alive time).

        Raises CyError when the queue wait, the worker's heartbeat or the request deadline runs out.
        """
        until = time.monotonic() + wait
        while True:
            raise_if_cancelled()
            now = time.monotonic()
            try:
                self._check_deadlines(now)
            except _HintedWorkerGone:
                await self._leave_hint()
                continue
            except _WorkerLost:
                if self._next_index == 0 and self._retries > 0 and self._requeue is not None:
                    log.warning("worker_lost_retrying", worker_id=self.worker_id)
                    self._retries -= 1
                    self._accepted_at, self.worker_id = None, ""
                    self._queued_at = now
                    self.queued = await self._requeue(self.request)
                    continue
                self.finished = True
                raise CyError(
                    ErrorCode.INTERNAL_ERROR, f"worker {self.worker_id} stopped responding mid-stream", retryable=True
                ) from None
            if now >= until:
                return None
            try:
                msg = await self._sub.next_msg(timeout=min(0.5, max(until - now, 0.001)))
            except (TimeoutError, NatsTimeoutError):
                continue
            return self._accept(codec.reply_decoder.decode(msg.data))

    async def _leave_hint(self) -> None:
        """The hinted worker died before pulling the request: take it back and queue it on its tier."""
        queued, self.queued = self.queued, None
        if queued is None or self._reroute is None:
            return
        moved = await self._reroute(queued, self.request)
        if moved is not None:
            log.warning("hinted_worker_gone_rerouted", worker_hint=self.request.worker_hint, subject=moved.subject)
            self.queued = moved

    @property
    def crossed_outage(self) -> bool:
        """The NATS link dropped while this stream was open (or is down now)."""
        return self._link.drops != self._drops or not self._link.up

    def _accept(self, reply: Reply) -> Reply:
        self.replied = True
        match reply:
            case Accepted():
                self._accepted_at, self.worker_id = time.monotonic(), reply.worker_id
            case TokenChunk():
                if reply.index != self._next_index:
                    self.finished = True
                    raise CyError(
                        ErrorCode.INTERNAL_ERROR,
                        f"stream lost chunks: expected #{self._next_index}, got #{reply.index}",
                        retryable=True,
                    )
                self._next_index += 1
            case StreamEnd() | StreamError():
                self.finished = self.ended = True
        return reply

    def _check_deadlines(self, now: float) -> None:
        if self._link.drops != self._drops and self.replied:
            # Checked before the worker's liveness: during an outage its heartbeats stop reaching us too.
            self.finished = True
            raise CyError(
                ErrorCode.INTERNAL_ERROR,
                "the NATS connection was lost mid-stream; replies sent meanwhile are gone",
                retryable=True,
            )
        if self._accepted_at is None and now - self._queued_at > self._queue_timeout:
            self.finished = True
            raise CyError(
                ErrorCode.INSUFFICIENT_RESOURCES,
                f"no worker picked up the request within {self._queue_timeout:g}s",
                retryable=True,
                retry_after=5,
            )
        if self._accepted_at is not None and self.worker_id:
            info = self._workers.get(self.worker_id)
            if info is None or not self._workers.is_healthy(info):
                raise _WorkerLost
        if (
            self._accepted_at is None
            and self.queued is not None
            and subjects.is_hinted_subject(self.queued.subject)
            and not self._workers.is_alive(self.request.worker_hint)
        ):
            raise _HintedWorkerGone
        if now - self.started > self._request_timeout:
            self.finished = True
            raise CyError(ErrorCode.INTERNAL_ERROR, f"request exceeded {self._request_timeout:g}s")


class InferenceClient:
    def __init__(
        self,
        nc: NATS,
        js: JetStreamContext,
        workers: WorkersView,
        *,
        queue_timeout: float,
        request_timeout: float,
        link: LinkWatch | None = None,
    ) -> None:
        self.nc = nc
        self.js = js
        self.workers = workers
        self.queue_timeout = queue_timeout
        self.request_timeout = request_timeout
        self.link = link or LinkWatch()
        self._orphans: dict[str, float] = {}  # trace id -> when its cancel was sent across an outage

    async def resend_cancels(self) -> None:
        """After a reconnect, the cancels of generations orphaned by the outage, again: the client's reconnect
        buffer may reach the server before the workers have subscribed again (a cancel nobody hears)."""
        for delay in ORPHAN_CANCEL_RESENDS_S:
            await asyncio.sleep(delay)
            cutoff = time.monotonic() - 120
            self._orphans = {t: at for t, at in self._orphans.items() if at > cutoff}
            for trace_id in list(self._orphans):
                with contextlib.suppress(Exception):
                    await self.nc.publish(subjects.cancel_subject(trace_id), b"")

    def check_ready(self, model_id: str) -> None:
        """Fail fast when nobody can serve the model. Raises CyError (503)."""
        state = self.workers.model_state(model_id)
        if state == "ready":
            return
        if state == "loading":
            raise CyError(
                ErrorCode.MODEL_NOT_READY, f"model {model_id!r} is still loading", retryable=True, retry_after=5
            )
        if state == "failed":
            raise CyError(ErrorCode.MODEL_NOT_READY, f"model {model_id!r} failed to load on its workers")
        raise CyError(
            ErrorCode.INSUFFICIENT_RESOURCES, f"no worker is serving model {model_id!r}", retryable=True, retry_after=5
        )

    def subject_for(self, request: GenerateRequest) -> str:
        """The hinted worker's subject while the workers bucket shows it alive, else the model's tier."""
        if request.worker_hint and self.workers.is_alive(request.worker_hint):
            return subjects.hinted_subject(request.model_id, request.worker_hint)
        return subjects.generate_subject(request.model_id, subjects.tier_of(request.priority))

    @contextlib.asynccontextmanager
    async def open(self, request: GenerateRequest) -> AsyncIterator[ReplyStream]:
        """Subscribe to the reply subject, enqueue the request, yield its replies; cancel on early exit."""
        sub = await self.nc.subscribe(subjects.stream_subject(request.trace_id), pending_msgs_limit=100_000)
        stream = ReplyStream(
            sub,
            request,
            self.workers,
            queue_timeout=self.queue_timeout,
            request_timeout=self.request_timeout,
            requeue=self._enqueue,
            reroute=self._reroute,
            link=self.link,
        )
        try:
            stream.queued = await self._enqueue(request)
            yield stream
        finally:
            # Shielded: a client that leaves cancels this task, and the worker must still hear the cancel (a
            # cancel sent while the publish was in flight reaches the worker before the request: it remembers).
            await shielded(self._leave(stream, sub))

    async def _leave(self, stream: ReplyStream, sub: Subscription) -> None:
        # Unless the worker ended it, a generation may still run for nobody (client gone, deadline, a NATS
        # outage mid-stream): cancel it. While NATS is down the cancel waits in the client's reconnect buffer.
        if not stream.ended:
            if stream.crossed_outage:  # the worker may not be subscribed again yet: repeat after the reconnect
                self._orphans[stream.request.trace_id] = time.monotonic()
            with contextlib.suppress(Exception):
                await self.nc.publish(subjects.cancel_subject(stream.request.trace_id), b"")
        if stream.queued is not None and not stream.replied:
            # Nobody took it (queue timeout, client gone): a request nobody waits for must not stay queued.
            await self._take_back(stream.queued)
        with contextlib.suppress(Exception):
            await sub.unsubscribe()

    async def _take_back(self, queued: Queued, stream: str = subjects.GENERATE_STREAM) -> bool:
        """Delete a queued request by its sequence. False when it is no longer queued (a worker has it, or
        someone else took it back first: deleting is atomic, so exactly one taker republishes)."""
        try:
            return bool(await self.js.delete_msg(stream, queued.seq))
        except (NotFoundError, APIError):
            return False
        except Exception as exc:  # NATS down: the stream's max_age still bounds how long it stays
            log.warning("queued_request_not_removed", seq=queued.seq, error=repr(exc))
            return False

    async def _reroute(self, queued: Queued, request: GenerateRequest) -> Queued | None:
        if not await self._take_back(queued):
            return None
        return await self._enqueue(request)

    async def sweep_orphaned_hints(self) -> int:
        """Move requests waiting on the hint subject of a worker that is gone (a direct publisher's, or one
        whose gateway died) to their model's tier. Returns how many were moved."""
        moved = 0
        for stream, hinted in (
            (subjects.GENERATE_STREAM, subjects.HINTED_SUBJECTS),
            (subjects.PUBLISHED_STREAM, subjects.PUBLISHED_HINTED_SUBJECTS),
        ):
            info = await self.js.stream_info(stream, subjects_filter=hinted)
            for subject, count in (info.state.subjects or {}).items():
                if not self.workers.is_alive(subjects.worker_of_hinted_subject(subject)):
                    moved += await self._unhint(stream, subject, count)
        if moved:
            log.warning("orphaned_hints_rerouted", moved=moved)
        return moved

    async def _unhint(self, stream: str, subject: str, count: int) -> int:
        moved = seq = 0
        for _ in range(count):
            try:
                raw = await self.js.get_msg(stream, seq=seq + 1, subject=subject, next=True)
            except NotFoundError:
                break
            seq = int(raw.seq or 0)
            try:
                priority = codec.request_decoder.decode(raw.data or b"").priority
            except (codec.DecodeError, codec.ValidationError):
                priority = 0
            if await self._take_back(Queued(subject, seq), stream):
                await self.js.publish(subjects.unhinted_subject(subject, priority), raw.data or b"", timeout=5)
                moved += 1
        return moved

    async def _enqueue(self, request: GenerateRequest) -> Queued:
        subject = self.subject_for(request)
        try:
            ack = await self.js.publish(subject, codec.encode(request), timeout=5)
            return Queued(subject, int(ack.seq))
        except APIError as exc:
            if exc.err_code == _QUEUE_FULL:
                raise CyError(
                    ErrorCode.INSUFFICIENT_RESOURCES, "the request queue is full", retryable=True, retry_after=2
                ) from exc
            raise CyError(ErrorCode.INTERNAL_ERROR, f"the request queue refused the request: {exc}") from exc
        except (TimeoutError, NoRespondersError, NatsTimeoutError) as exc:
            raise CyError(
                ErrorCode.INSUFFICIENT_RESOURCES, "the request queue is unavailable", retryable=True, retry_after=2
            ) from exc
