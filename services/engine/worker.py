"""The engine worker service: pulls GenerateRequests from JetStream when a slot is free, streams replies.

Per request: Accepted (names this worker), TokenChunk x N (the first as soon as there is text, then
every `stream_chunk_size` tokens), then StreamEnd, or StreamError at any point. A message on
`cancel.<trace_id>` aborts the generation and frees the slot.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections import OrderedDict
from functools import partial
from pathlib import Path
from typing import Any

import msgspec
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError

from schemas import codec, subjects
from schemas.errors import CyError, ErrorCode
from schemas.inference import Accepted, GenerateRequest, Reply, StreamEnd, StreamError
from schemas.workers import ServedModel, WorkerInfo
from services import discovery, jetstream, metrics
from services.engine.adapters import AdapterSync
from services.engine.base import Engine, EngineDown
from services.engine.chunker import Chunker
from services.engine.engines import build_engine, select_engine
from services.engine.player_cancels import PlayerCancels
from services.engine.settings import WorkerSettings
from services.models.files import ensure_model
from services.models.registry import ModelSpec, load_registry
from services.runtime import Tasks, close_nats, connect_nats, data_dir

log = structlog.get_logger()

_PULL_NOW = msgspec.json.encode({"batch": 1, "no_wait": True})

# A request whose engine went down before it produced any text goes back to the queue (for a healthy worker)
# at most this many times; then its client gets the retryable error.
MAX_HANDBACKS = 3

# A cancel can arrive before its request is picked up: the requester left while its publish was in flight
# (so it could not take the message back), or while this worker was pulling or acking it. Such cancels are
# remembered for this long (longer than any queue wait) so the request ends at once when it arrives.
EARLY_CANCEL_TTL_S = 600.0
EARLY_CANCEL_MAX = 100_000
# How many recently served sessions a worker advertises in its heartbeat (~17 bytes each on the wire).
ADVERTISED_SESSIONS = 512


def _ensure_model_files(spec: ModelSpec) -> None:
    try:
        ensure_model(spec)
    except FileNotFoundError as exc:
        raise CyError(ErrorCode.MODEL_NOT_READY, str(exc)) from exc


def now_ms() -> int:
    return int(time.time() * 1000)


class Worker:
    """`async with Worker(settings) as w: await w.stopped()`; `stop()` drains and is idempotent."""

    def __init__(
        self, settings: WorkerSettings, *, engine: Engine | None = None, spec: tuple[str, ModelSpec] | None = None
    ) -> None:
        self.settings = settings
        self.worker_id = settings.worker_id or f"{socket.gethostname()}-{os.getpid()}"
        if spec is None:
            registry = load_registry()
            resolved = registry.resolve(settings.model)
            if resolved is None:
                raise CyError(ErrorCode.MODEL_NOT_FOUND, f"model {settings.model!r} is not in the registry")
            spec = resolved
        self.model_id, self.spec = spec
        self.engine_name = engine.name if engine else select_engine(self.spec, settings.engine)
        self.engine = engine or build_engine(
            self.engine_name, self.spec, slots=settings.slots, device=settings.device, options=settings.engine_options()
        )
        self.nc: NATS | None = None
        self._status: str = "loading"
        self._error = ""
        self._slots = asyncio.Semaphore(self.engine.slots)
        self._busy = 0
        self._active: dict[str, asyncio.Task[Any]] = {}
        self._cancel_requested: set[str] = set()
        self._early_cancels: dict[str, float] = {}  # trace id -> when its cancel came (before its request)
        self._player_cancels = PlayerCancels()  # a player's or a tenant's requests cancelled at once
        self._sessions: OrderedDict[str, None] = OrderedDict()  # affinity keys served, oldest first
        self._tasks = Tasks()
        self._streams = Tasks()
        self._doorbell = asyncio.Event()
        self._stopping = False
        self._stopped = asyncio.Event()
        self._started_ms = now_ms()
        self._consumers: list[tuple[str, str]] = []  # (stream, consumer) in pull order
        self._round = 0
        self._adapters: AdapterSync | None = None
        self._reensuring: asyncio.Task[Any] | None = None
        self._reensured_at = 0.0
        self.metrics = metrics.WorkerMetrics(
            self.worker_id, self.model_id, lambda: (self.engine.slots, self._busy), lambda: self.engine.stats()
        )
        self._metrics_server: metrics.MetricsServer | None = None
        self._service: Any = None  # the NATS micro service (services/discovery.py)

    # --- lifecycle -----------------------------------------------------------------------------
    async def __aenter__(self) -> Worker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        structlog.contextvars.bind_contextvars(worker_id=self.worker_id)
        self.nc = await connect_nats(
            self.settings, name=f"cy-worker-{self.worker_id}", role="worker", reconnected=self._reensure
        )
        js = self.nc.jetstream()
        await jetstream.ensure_request_streams(js, self.settings.queue_max_size, self.settings.publisher_max_pending)
        self._kv = await jetstream.ensure_workers_bucket(js)
        await self._ensure_consumers(js)
        self._pull_inbox = self.nc.new_inbox()
        self._pull_sub = await self.nc.subscribe(self._pull_inbox)
        await self.nc.subscribe(subjects.CANCEL_ALL, cb=self._on_cancel)
        await self.nc.subscribe(subjects.PLAYER_CANCELS_ALL, cb=self._on_player_cancel)
        await self.nc.subscribe(subjects.model_requests_filter(self.model_id), cb=self._on_doorbell)
        await self.nc.subscribe(subjects.published_model_filter(self.model_id), cb=self._on_doorbell)
        self._tasks.spawn(self._heartbeat_loop(), name="heartbeat")
        await self._announce()
        self._metrics_server = metrics.serve(
            self.metrics.registry, self.settings.metrics_host, self.settings.metrics_port
        )
        metrics_url = self._metrics_server.url if self._metrics_server else ""
        self._service = await discovery.add_worker_service(
            self.nc, self.info, model_id=self.model_id, metrics_url=metrics_url
        )
        try:
            if self.engine_name == "transformers":
                await asyncio.to_thread(_ensure_model_files, self.spec)
            await self.engine.start()
            # vLLM's auto-tuning may have settled on fewer sequences than asked for.
            self._slots = asyncio.Semaphore(self.engine.slots)
            # Registry and trained adapters load before "ready"; later ones as they are registered.
            self._adapters = AdapterSync(self.nc, self.engine, self.model_id, self.spec.adapters, self._announce)
            await self._adapters.start()
        except CyError as exc:
            self._status, self._error = "failed", exc.body.message
            await self._announce()
            raise
        self._status = "ready"
        await self._announce()
        log.info("worker_ready", model_id=self.model_id, engine=self.engine_name, slots=self.engine.slots)
        self._tasks.spawn(self._pull_loop(), name="pull")

    async def _ensure_consumers(self, js: Any) -> None:
        """Pull consumers on both work queues, in the order they are asked: the hint ones first, then per tier
        the services' queue and the publishers' (which of the two goes first alternates, see _next_request)."""
        from nats.js.api import AckPolicy, ConsumerConfig

        m, w = self.model_id, self.worker_id
        gen, pub = subjects.GENERATE_STREAM, subjects.PUBLISHED_STREAM
        wanted: list[tuple[str, str, str, float | None]] = [
            (gen, subjects.hint_consumer(m, w), subjects.hinted_subject(m, w), 60.0),
            (pub, subjects.published_hint_consumer(m, w), subjects.published_hint_filter(m, w), 60.0),
        ]
        for t in subjects.TIERS:
            wanted.append((gen, subjects.tier_consumer(m, t), subjects.generate_subject(m, t), None))
            wanted.append((pub, subjects.published_tier_consumer(m, t), subjects.published_tier_filter(m, t), None))
        for stream, name, filter_subject, inactive in wanted:
            config = ConsumerConfig(
                durable_name=name,
                filter_subject=filter_subject,
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=30,
                max_ack_pending=-1,
                inactive_threshold=inactive,
            )
            await jetstream.admin(partial(js.add_consumer, stream, config), f"consumer {name}")
        self._consumers = [(stream, name) for stream, name, _, _ in wanted]

    async def _reensure(self) -> None:
        """After a reconnect (or a pull that finds no consumer): the server may have lost the memory-backed
        workers bucket or its whole store; re-create the queue, the bucket and our consumers, re-announce."""
        assert self.nc is not None
        js = self.nc.jetstream()
        await jetstream.ensure_request_streams(js, self.settings.queue_max_size, self.settings.publisher_max_pending)
        self._kv = await jetstream.ensure_workers_bucket(js)
        await self._ensure_consumers(js)
        await self._announce()
        self._doorbell.set()

    async def stopped(self) -> None:
        await self._stopped.wait()

    async def stop(self) -> None:
        """Stop pulling, let open streams finish (bounded by drain_timeout), then exit."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        self._doorbell.set()
        log.info("worker_draining", open_streams=len(self._active))
        if self._service is not None:  # leave discovery first: nobody should look for us any more
            try:
                await asyncio.wait_for(self._service.stop(), 2.0)
            except Exception:
                pass
        try:  # NATS may be gone: every NATS step of the shutdown is bounded, so SIGTERM always ends the worker
            await asyncio.wait_for(self._announce(), 2.0)
        except Exception:
            pass
        await self._streams.close(timeout=self.settings.drain_timeout)
        self._tasks.cancel_all()
        await self._tasks.close(timeout=1)
        if self._adapters is not None:
            await self._adapters.stop()
        await self.engine.close()
        if self.nc is not None and self.nc.is_connected:
            try:
                await asyncio.wait_for(self._kv.delete(subjects.worker_key(self.worker_id)), 2.0)
            except Exception:
                pass
        await close_nats(self.nc)
        if self._metrics_server is not None:
            await asyncio.to_thread(self._metrics_server.close)
        self._stopped.set()
        log.info("worker_stopped")

    def _outputs_root(self) -> Path:
        return Path(self.settings.outputs_dir) if self.settings.outputs_dir else data_dir() / "outputs"

    # --- registry ------------------------------------------------------------------------------
    def info(self) -> WorkerInfo:
        return WorkerInfo(
            worker_id=self.worker_id,
            engine=self.engine_name,
            device=self.engine.device,
            models=[
                ServedModel(
                    model_id=self.model_id,
                    status=self._status,  # type: ignore[arg-type]
                    engine=self.engine_name,
                    max_model_len=self.engine.max_model_len,
                    adapters=self.engine.adapters(),
                    error=self._error,
                )
            ],
            slots_total=self.engine.slots,
            slots_busy=self._busy,
            host=socket.gethostname(),
            pid=os.getpid(),
            started_ms=self._started_ms,
            heartbeat_ms=now_ms(),
            heartbeat_interval=self.settings.heartbeat_interval,
            draining=self._stopping,
            sessions=list(reversed(self._sessions)),
        )

    def _held(self, session: str) -> None:
        """Advertise `session` (an affinity key) as held here: its conversation is in this engine's cache."""
        if session:
            self._sessions[session] = None
            self._sessions.move_to_end(session)
            while len(self._sessions) > ADVERTISED_SESSIONS:
                self._sessions.popitem(last=False)

    async def _announce(self) -> None:
        await self._kv.put(subjects.worker_key(self.worker_id), codec.encode(self.info()))

    async def _heartbeat_loop(self) -> None:
        assert self.nc is not None
        while True:
            await asyncio.sleep(self.settings.heartbeat_interval)
            try:
                # Fire-and-forget on the bucket's subject: the KV stream stores it and watchers see it at once,
                # and a slow JetStream ack (leader election in a cluster) never delays the next beat.
                await self.nc.publish(subjects.worker_kv_subject(self.worker_id), codec.encode(self.info()))
            except Exception as exc:  # disconnected: keep beating, the client reconnects
                log.warning("heartbeat_failed", error=repr(exc))

    # --- dispatch ------------------------------------------------------------------------------
    async def _on_doorbell(self, _msg: Msg) -> None:
        self._doorbell.set()

    async def _on_cancel(self, msg: Msg) -> None:
        only = (msg.headers or {}).get(subjects.CANCEL_WORKER_HEADER)
        if only is not None and only != self.worker_id:
            return  # a cancel for another worker's part of the stream (the gateway moved it off that worker)
        trace_id = subjects.trace_of_cancel(msg.subject)
        if not self._cancel_active(trace_id) and trace_id not in self._active and only is None:
            self._remember_early_cancel(trace_id)  # a targeted cancel is for a part that ran: nothing comes later

    async def _on_player_cancel(self, msg: Msg) -> None:
        for trace_id in self._player_cancels.heard(msg.subject):
            self._cancel_active(trace_id)

    def _cancel_active(self, trace_id: str) -> bool:
        """Cancel the running request `trace_id`, once (a second cancel() would read as a shutdown in `_run`)."""
        task = self._active.get(trace_id)
        if task is None or task.done():
            return False
        if trace_id not in self._cancel_requested:
            self._cancel_requested.add(trace_id)
            task.cancel()
        return True

    def _remember_early_cancel(self, trace_id: str) -> None:
        """Every worker hears every cancel; most are for requests served elsewhere. Bounded by age and count,
        oldest first (O(1) per cancel: a flood of cancels cannot stall the event loop)."""
        now = time.monotonic()
        self._early_cancels.pop(trace_id, None)
        self._early_cancels[trace_id] = now
        while self._early_cancels:
            oldest, at = next(iter(self._early_cancels.items()))
            if len(self._early_cancels) <= EARLY_CANCEL_MAX and now - at < EARLY_CANCEL_TTL_S:
                break
            del self._early_cancels[oldest]

    def _cancelled_before_pickup(self, trace_id: str) -> bool:
        at = self._early_cancels.pop(trace_id, None)
        return at is not None and time.monotonic() - at < EARLY_CANCEL_TTL_S

    async def _pull_loop(self) -> None:
        while not self._stopping:
            if not self.engine.available:  # restarting: leave the queue to healthy workers meanwhile
                await asyncio.sleep(0.1)
                continue
            await self._slots.acquire()
            try:
                msg = await self._next_request()
            except Exception as exc:
                self._slots.release()
                log.warning("pull_failed", error=repr(exc))
                await asyncio.sleep(0.5)
                continue
            if msg is None or self._stopping:
                self._slots.release()
                if msg is not None:
                    await msg.nak()
                continue
            self._busy += 1
            self._streams.spawn(self._serve(msg), name="serve")

    async def _next_request(self) -> Msg | None:
        """The next queued request, hint first then by priority tier; waits ~1 s for the doorbell."""
        self._doorbell.clear()
        assert self.nc is not None
        self._round += 1
        for stream, consumer in self._pull_order():
            # A JetStream delivery keeps its original subject, so nc.request() cannot match it to the
            # request: ask on our own inbox instead. A late answer to an earlier ask is still a valid
            # message (or a status) and is handled like any other.
            await self.nc.publish(subjects.consumer_next_subject(stream, consumer), _PULL_NOW, reply=self._pull_inbox)
            try:
                msg = await self._pull_sub.next_msg(timeout=2)
            except (TimeoutError, NatsTimeoutError):
                continue
            status = msg.headers.get("Status") if msg.headers else None
            if status == "503" and not self._stopping:  # no responders: the consumer or the stream is gone
                self._maybe_reensure()
            if status:
                continue  # 404 no messages / 408: nothing for this tier
            return msg
        try:
            await asyncio.wait_for(self._doorbell.wait(), timeout=1.0)
        except TimeoutError:
            pass
        return None

    def _pull_order(self) -> list[tuple[str, str]]:
        """The consumers in pull order. Within each pair (one hint or tier, the services' queue and the
        publishers') the first alternates every round: neither kind of client can starve the other."""
        order = list(self._consumers)
        if self._round % 2:
            for i in range(0, len(order) - 1, 2):
                order[i], order[i + 1] = order[i + 1], order[i]
        return order

    def _maybe_reensure(self) -> None:
        if (self._reensuring is None or self._reensuring.done()) and time.monotonic() - self._reensured_at > 5.0:
            self._reensured_at = time.monotonic()
            log.warning("consumer_missing_reensuring")
            self._reensuring = self._tasks.spawn(self._reensure(), name="reensure")

    async def _serve(self, msg: Msg) -> None:
        try:
            try:
                request = codec.request_decoder.decode(msg.data)
            except (codec.DecodeError, codec.ValidationError) as exc:
                await msg.ack()
                await self._reject_undecodable(msg.data, str(exc), subjects.owner_of_request_subject(msg.subject))
                return
            await msg.ack()
            queued_at: float | None = None
            try:
                queued_at = msg.metadata.timestamp.timestamp()
                self.metrics.observe_queue_wait(queued_at)
            except Exception:  # not a JetStream delivery: no queue time to tell
                pass
            owner = subjects.owner_of_request_subject(msg.subject)
            if owner is not None and subjects.owner_of_trace(request.trace_id) != owner:
                await self._refuse_foreign_trace(owner, request.trace_id)
                return
            await self._run(request, msg.subject, queued_at)
        finally:
            self._busy -= 1
            self._slots.release()

    async def _reject_undecodable(self, data: bytes, problem: str, owner: str | None) -> None:
        """Tell the requester its request is unreadable, on its own reply subject only: a publisher's trace id
        is taken as under its name (`owner`), whatever the payload claims."""
        try:
            trace_id = msgspec.msgpack.decode(data).get("trace_id", "")
        except Exception:
            trace_id = ""
        log.warning("request_undecodable", problem=problem, trace_id=trace_id)
        valid = isinstance(trace_id, str) and subjects.is_valid_trace_id(trace_id)
        if valid and owner is not None and subjects.owner_of_trace(trace_id) != owner:
            trace_id = subjects.rehomed_trace_id(owner, trace_id)
        if valid and subjects.is_valid_trace_id(trace_id):
            await self._publish(
                trace_id,
                StreamError(
                    trace_id=trace_id, code=ErrorCode.INVALID_REQUEST, message=f"invalid GenerateRequest: {problem}"
                ),
            )

    async def _refuse_foreign_trace(self, owner: str, trace_id: str) -> None:
        """A publisher named a trace id it does not own (another publisher's, or the gateway's): nothing goes
        to that trace's subjects; the refusal goes to the same id under the publisher's own name."""
        home = subjects.rehomed_trace_id(owner, trace_id) if subjects.is_valid_trace_id(trace_id) else ""
        log.warning("request_foreign_trace_id", owner=owner, trace_id=trace_id)
        if home and subjects.is_valid_trace_id(home):
            message = f"trace_id {trace_id!r} is not yours: publisher {owner!r} must use '{owner}.<id>'"
            await self._publish(home, StreamError(trace_id=home, code=ErrorCode.FORBIDDEN, message=message))

    async def _publish(self, trace_id: str, reply: Reply) -> None:
        assert self.nc is not None
        await self.nc.publish(subjects.stream_subject(trace_id), codec.encode(reply))

    # --- one request ---------------------------------------------------------------------------
    async def _run(self, req: GenerateRequest, subject: str = "", queued_at: float | None = None) -> None:
        trace_id = req.trace_id
        structlog.contextvars.bind_contextvars(**req.log_context())
        task = asyncio.current_task()
        assert task is not None
        self._active[trace_id] = task
        started = time.monotonic()
        stats: dict[str, Any] = {"prompt_tokens": 0, "cached_tokens": 0, "completion_tokens": 0, "ttft_ms": None}
        outcome = "ok"
        try:
            if not subjects.is_valid_trace_id(trace_id):
                log.warning("request_bad_trace_id")
                outcome = "bad_trace_id"
                return
            if self._cancelled_before_pickup(trace_id) or self._player_cancels.cancelled_before(req, queued_at):
                outcome = "cancelled"
                await self._publish(trace_id, self._cancelled_end(trace_id, stats))
                return
            self._player_cancels.started(req)  # after the check above: no await between them
            end = await self._generate(req, started, stats)
            outcome = end.finish_reason
        except asyncio.CancelledError:
            if trace_id in self._cancel_requested and task.uncancel() == 0:
                outcome = "cancelled"
                await self._publish(trace_id, self._cancelled_end(trace_id, stats))
            else:
                outcome = "aborted"
                await asyncio.shield(
                    self._publish(
                        trace_id,
                        StreamError(
                            trace_id=trace_id,
                            code=ErrorCode.INTERNAL_ERROR,
                            message="the worker shut down mid-stream",
                            retryable=True,
                            worker_id=self.worker_id,
                        ),
                    )
                )
                raise
        except EngineDown as exc:
            if (
                subject
                and not stats.get("chunks")
                and req.handbacks < MAX_HANDBACKS
                and await self._hand_back(req, subject)
            ):
                outcome = "handed_back"
            else:
                outcome = exc.code.value
                await self._publish(trace_id, self._stream_error(trace_id, exc))
        except CyError as exc:
            outcome = exc.code.value
            await self._publish(trace_id, self._stream_error(trace_id, exc))
        except Exception:
            outcome = ErrorCode.INTERNAL_ERROR.value
            log.exception("request_failed")
            await self._publish(
                trace_id,
                StreamError(
                    trace_id=trace_id,
                    code=ErrorCode.INTERNAL_ERROR,
                    message="internal error in the engine worker",
                    worker_id=self.worker_id,
                ),
            )
        finally:
            self._active.pop(trace_id, None)
            self._player_cancels.ended(trace_id)
            self._cancel_requested.discard(trace_id)
            duration_s = time.monotonic() - started
            log.info("generation", outcome=outcome, duration_ms=round(duration_s * 1000, 1), **stats)
            # Adapter label only for one this engine serves: a request's free text never becomes a series.
            served = req.adapter if req.adapter and self.engine.has_adapter(req.adapter) else ""
            self.metrics.observe_generation(outcome, served, duration_s, stats)

    async def _hand_back(self, req: GenerateRequest, subject: str) -> bool:
        """Queue `req` again for another worker (its tier subject, never this worker's hint). False when the
        queue refuses it (full, unavailable): the client then gets the error."""
        assert self.nc is not None
        if subjects.is_any_hinted_subject(subject):
            subject = subjects.unhinted_subject(subject, req.priority)
        again = msgspec.structs.replace(req, handbacks=req.handbacks + 1, worker_hint="")
        try:
            await self.nc.jetstream().publish(subject, codec.encode(again), timeout=5)
        except Exception as exc:
            log.warning("hand_back_failed", error=repr(exc))
            return False
        log.warning("request_handed_back", reason="engine_down", handbacks=again.handbacks)
        return True

    def _stream_error(self, trace_id: str, exc: CyError) -> StreamError:
        return StreamError(
            trace_id=trace_id,
            code=exc.code,
            message=exc.body.message,
            retryable=exc.body.retryable,
            worker_id=self.worker_id,
        )

    def _cancelled_end(self, trace_id: str, stats: dict[str, Any]) -> StreamEnd:
        return StreamEnd(
            trace_id=trace_id,
            finish_reason="cancelled",
            prompt_tokens=stats["prompt_tokens"],
            completion_tokens=stats["completion_tokens"],
            chunks=stats.get("chunks", 0),
            worker_id=self.worker_id,
            cached_tokens=stats["cached_tokens"],
        )

    async def _generate(self, req: GenerateRequest, started: float, stats: dict[str, Any]) -> StreamEnd:
        trace_id = req.trace_id
        if req.deadline_ms and now_ms() > req.deadline_ms:
            raise CyError(ErrorCode.INSUFFICIENT_RESOURCES, "the request expired while queued", retryable=True)
        adapter = req.adapter
        if adapter and not self.engine.has_adapter(adapter):
            named = self._adapters.by_path(adapter, self._outputs_root()) if self._adapters else None
            if named is None and self._adapters is not None and await self._adapters.ensure(adapter):
                named = adapter
            if named is None:
                raise CyError(
                    ErrorCode.MODEL_NOT_FOUND, f"adapter {adapter!r} is not available for model {self.model_id!r}"
                )
            adapter = named
        prompt_ids = self.engine.encode(req)
        if req.continuation:  # a migrated stream: go on after the text its client already has
            prompt_ids = prompt_ids + list(
                self.engine.tokenizer(req.continuation, add_special_tokens=False)["input_ids"]
            )
            if len(prompt_ids) >= self.engine.max_model_len:
                raise CyError(ErrorCode.INVALID_REQUEST, "the continued stream fills the model's context")
        stats["prompt_tokens"] = len(prompt_ids)
        self._held(req.affinity_key())
        await self._publish(
            trace_id, Accepted(trace_id=trace_id, worker_id=self.worker_id, prompt_tokens=len(prompt_ids))
        )
        chunker = Chunker(
            trace_id,
            self.engine.tokenizer,
            req.generation.stop,
            req.stream_chunk_size or self.settings.stream_chunk_size,
            self.worker_id,
        )
        steps = self.engine.generate(prompt_ids, req.generation, adapter)
        try:
            async for step in steps:
                if stats["ttft_ms"] is None:
                    stats["ttft_ms"] = round((time.monotonic() - started) * 1000, 1)
                if step.cached_tokens:
                    stats["cached_tokens"] = step.cached_tokens
                chunk = chunker.feed(step)
                stats["completion_tokens"] = chunker.completion_tokens
                if chunk is not None:
                    await self._publish(trace_id, chunk)
                    stats["chunks"] = chunker.chunks
                if chunker.finish is not None:
                    break
        finally:
            await steps.aclose()  # type: ignore[attr-defined]
        end = StreamEnd(
            trace_id=trace_id,
            finish_reason=chunker.finish or "stop",
            prompt_tokens=len(prompt_ids),
            completion_tokens=stats["completion_tokens"],
            chunks=chunker.chunks,
            worker_id=self.worker_id,
            ttft_ms=stats["ttft_ms"] or 0.0,
            duration_ms=round((time.monotonic() - started) * 1000, 1),
            cached_tokens=stats["cached_tokens"],
        )
        await self._publish(trace_id, end)
        return end
