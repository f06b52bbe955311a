"""Publish a GenerateRequest on the work queue and iterate its replies; cancel when the caller leaves."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import structlog
from nats.aio.client import Client as NATS
from nats.aio.subscription import Subscription
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.errors import APIError

from gateway.workers import WorkersView
from schemas import codec, subjects
from schemas.errors import CyError, ErrorCode
from schemas.inference import Accepted, GenerateRequest, Reply, StreamEnd, StreamError, TokenChunk

log = structlog.get_logger()

_QUEUE_FULL = 10077  # JetStream: maximum messages exceeded (discard=new)


class _WorkerLost(Exception):
    pass


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
        requeue: Callable[[GenerateRequest], Awaitable[None]] | None = None,
        retries: int = 1,
    ) -> None:
        self._sub = sub
        self.request = request
        self._workers = workers
        self._queue_timeout = queue_timeout
        self._request_timeout = request_timeout
        self._accepted_at: float | None = None
        self._next_index = 0
        self._requeue = requeue
        self._retries = retries
        self.worker_id = ""
        self.finished = False
        self.started = self._queued_at = time.monotonic()

    async def next(self, wait: float = float("inf")) -> Reply | None:
        """The next reply, or None when nothing came within `wait` seconds (keep-alive time).

        Raises CyError when the queue wait, the worker's heartbeat or the request deadline runs out.
        """
        until = time.monotonic() + wait
        while True:
            now = time.monotonic()
            try:
                self._check_deadlines(now)
            except _WorkerLost:
                if self._next_index == 0 and self._retries > 0 and self._requeue is not None:
                    log.warning("worker_lost_retrying", worker_id=self.worker_id)
                    self._retries -= 1
                    self._accepted_at, self.worker_id = None, ""
                    self._queued_at = now
                    await self._requeue(self.request)
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

    def _accept(self, reply: Reply) -> Reply:
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
                self.finished = True
        return reply

    def _check_deadlines(self, now: float) -> None:
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
        if now - self.started > self._request_timeout:
            self.finished = True
            raise CyError(ErrorCode.INTERNAL_ERROR, f"request exceeded {self._request_timeout:g}s")


class InferenceClient:
    def __init__(
        self, nc: NATS, js: JetStreamContext, workers: WorkersView, *, queue_timeout: float, request_timeout: float
    ) -> None:
        self.nc = nc
        self.js = js
        self.workers = workers
        self.queue_timeout = queue_timeout
        self.request_timeout = request_timeout

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
        )
        try:
            await self._enqueue(request)
            yield stream
        finally:
            if not stream.finished:
                with contextlib.suppress(Exception):
                    await self.nc.publish(subjects.cancel_subject(request.trace_id), b"")
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _enqueue(self, request: GenerateRequest) -> None:
        try:
            await self.js.publish(self.subject_for(request), codec.encode(request), timeout=5)
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
