"""What both HTTP apps share in one process: the NATS connection, the workers view, the registry, the inference
client, the training jobs service and the datasets store."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Any

import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from gateway.inference_client import InferenceClient, LinkWatch
from gateway.metrics import GatewayMetrics
from gateway.players import Players
from gateway.published import UnservedRequests
from gateway.ratelimit import RateLimiter
from gateway.registered_adapters import RegisteredAdapters
from gateway.session_router import SessionRouter
from gateway.settings import GatewaySettings
from gateway.workers import WorkersView
from schemas import subjects
from schemas.errors import CyError, ErrorCode
from services import jetstream
from services.models.registry import Registry, load_registry
from services.runtime import Tasks, close_nats, connect_nats
from services.training.dataset_store import DatasetStore
from services.training.jobs import JobService
from services.training.paths import Roots
from services.training.records import JobRecords

log = structlog.get_logger()

# How often a gateway looks for requests queued for a hinted worker that is gone.
HINT_SWEEP_INTERVAL_S = 5.0
# Seconds the requests a drain ends get to send their error and cancel their generations.
ENDING_GRACE_S = 2.0


class GatewayCore:
    def __init__(self, settings: GatewaySettings, registry: Registry | None = None) -> None:
        self.settings = settings
        self.registry = registry or load_registry()
        self.workers = WorkersView()
        self.registered = RegisteredAdapters()
        self.started_at = datetime.now(UTC)
        self.draining = False
        self.open_requests = 0
        self._idle = asyncio.Event()
        self._idle.set()
        # Tasks inside `in_flight` and `watching` (how many times each), and those a drain is ending.
        self._open: dict[asyncio.Task[Any], int] = {}
        self._watchers: dict[asyncio.Task[Any], int] = {}
        self._ending: set[asyncio.Task[Any]] = set()
        self.limiter = RateLimiter(settings.rate_limit_per_minute, settings.rate_limit_concurrent)
        self.players = Players(settings.tenant_max_concurrent, settings.player_max_concurrent)
        self.link = LinkWatch()
        self._tasks = Tasks()
        self.metrics = GatewayMetrics(self)
        self.nc: NATS
        self.js: JetStreamContext
        self.inference: InferenceClient
        self.training: JobService
        self.datasets: DatasetStore
        self.unserved: UnservedRequests

    async def start(self) -> None:
        self.nc = await connect_nats(
            self.settings, name="cy-gateway", role="gateway", reconnected=self._reensure, disconnected=self.link.dropped
        )
        self.js = self.nc.jetstream()
        await self._ensure_request_streams()
        kv = await jetstream.ensure_workers_bucket(self.js)
        await self.workers.start(self.nc, kv)
        await self.registered.start(self.nc, self.js)
        await self._share_rate_limits()
        self.inference = InferenceClient(
            self.nc,
            self.js,
            self.workers,
            queue_timeout=self.settings.queue_timeout,
            request_timeout=self.settings.request_timeout,
            link=self.link,
            router=SessionRouter(self.workers) if self.settings.session_routing else None,
            affinity_wait=self.settings.affinity_wait,
        )
        roots = Roots.from_settings(self.settings.datasets_dir, self.settings.outputs_dir)
        self.datasets = DatasetStore(self.js)
        self.training = JobService(JobRecords(self.nc), self.registry, roots, self.datasets)
        self.unserved = UnservedRequests(self.nc, self.js, self.workers, self.registry, self.link)
        await self.unserved.start()
        await self.nc.subscribe(subjects.player_cancels(subjects.SERVICES_SCOPE), cb=self._on_player_cancel)
        self._tasks.spawn(self._sweep_loop(), name="hint-sweep")

    async def _on_player_cancel(self, msg: Msg) -> None:
        self.players.heard(self.inference, msg.subject)

    async def cancel_player(self, tenant: str, player_id: str = "") -> int:
        """Cancel every in-flight request of `player_id` in `tenant` (the whole tenant when empty) on every worker
        and gateway; how many of them this gateway had open. Raises CyError (503) when NATS is unreachable."""
        cancelled = self.players.cancel_player(self.inference, tenant, player_id)
        try:
            await self.nc.publish(subjects.player_cancel_subject(tenant, player_id))
            await self.nc.flush(timeout=2)
        except Exception as exc:
            raise CyError(
                ErrorCode.INSUFFICIENT_RESOURCES,
                "NATS is unreachable: the cancel did not reach the workers",
                retryable=True,
                retry_after=2,
            ) from exc
        return cancelled

    async def _ensure_request_streams(self) -> None:
        s = self.settings
        await jetstream.ensure_request_streams(self.js, s.queue_max_size, s.publisher_max_pending)

    async def _reensure(self) -> None:
        """After a reconnect the server may lack what we use (the memory-backed workers bucket always, the
        rest when its store was lost): re-create it all and reload the workers view."""
        self.link.restored()
        if hasattr(self, "inference"):
            self._tasks.spawn(self.inference.resend_cancels(), name="resend-cancels")
        await self._ensure_request_streams()
        kv = await jetstream.ensure_workers_bucket(self.js)
        await self.workers.reload(self.js, kv)
        await self.registered.reload(self.js)
        await jetstream.ensure_training_after_reconnect(self.js)
        await self._share_rate_limits()

    async def _share_rate_limits(self) -> None:
        """Count requests per minute in the KV bucket every gateway shares (else per process, logged)."""
        if not (self.settings.rate_limit_shared and self.settings.rate_limit_per_minute):
            return
        try:
            kv = await jetstream.ensure_ratelimits_bucket(self.js, self.limiter.window_s)
        except Exception as exc:
            log.warning("rate_limit_shared_unavailable", error=repr(exc))
            return
        self.limiter.attach(kv, lambda: self.nc.is_connected)

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(HINT_SWEEP_INTERVAL_S)
            try:
                await self.inference.sweep_orphaned_hints()
                await self.unserved.sweep()
            except Exception as exc:  # NATS down or JetStream electing: try again next round
                log.debug("hint_sweep_failed", error=repr(exc))

    async def close(self) -> None:
        if hasattr(self, "unserved"):
            await self.unserved.close()
        self._tasks.cancel_all()
        await self._tasks.close(timeout=1)
        await close_nats(getattr(self, "nc", None))

    @contextlib.asynccontextmanager
    async def in_flight(self) -> AsyncIterator[None]:
        """Count an open request (its stream to a worker) while the block runs, in the task that serves it.
        Raises CyError (INSUFFICIENT_RESOURCES, retryable) in the block when a drain ends it (`drain`)."""
        self.open_requests += 1
        self._idle.clear()
        try:
            with self._registered(self._open), self.ended_by_drain():
                yield
        finally:
            self.open_requests -= 1
            if self.open_requests == 0:
                self._idle.set()

    @contextlib.asynccontextmanager
    async def watching(self) -> AsyncIterator[None]:
        """A response that only watches (a training job's events, followed until the job ends): nothing to
        finish, so a drain ends it at once. Raises CyError (INSUFFICIENT_RESOURCES, retryable) in the block
        then, or at entry on a draining gateway; the client resumes elsewhere (`Last-Event-ID`)."""
        if self.draining:
            raise _shutting_down()
        with self._registered(self._watchers), self.ended_by_drain():
            yield

    @contextlib.contextmanager
    def ended_by_drain(self) -> Iterator[None]:
        """In the block, a drain's cancel of this task (one that `in_flight` or `watching` registered) arrives
        as CyError (INSUFFICIENT_RESOURCES, retryable), as asyncio.timeout() turns its own cancel into
        TimeoutError; any other cancel (the client left) stays a cancel. For code of the task that waits on a
        stream outside the `in_flight` block (the OpenAI choices read their streams through a queue)."""
        task = asyncio.current_task()
        try:
            yield
        except asyncio.CancelledError:
            if task is not None and task in self._ending:
                self._ending.discard(task)
                if task.uncancel() == 0:
                    raise _shutting_down() from None
            raise

    @staticmethod
    @contextlib.contextmanager
    def _registered(registry: dict[asyncio.Task[Any], int]) -> Iterator[None]:
        task = asyncio.current_task()
        assert task is not None
        registry[task] = registry.get(task, 0) + 1
        try:
            yield
        finally:
            registry[task] -= 1
            if not registry[task]:
                del registry[task]

    def _end(self, registry: dict[asyncio.Task[Any], int]) -> None:
        for task in registry:
            if task not in self._ending:
                self._ending.add(task)
                task.cancel()

    async def drain(self, timeout: float) -> None:
        """Refuse new work (503), end the watching responses (`watching`), and wait up to `timeout` s for open
        requests to finish; then end those still open with a retryable INSUFFICIENT_RESOURCES error (an error
        event in a stream) and give them ENDING_GRACE_S to send it and cancel their generations.

        Ending them here, instead of leaving them to the HTTP server's graceful timeout, keeps the shutdown
        within `timeout` and gives each client an error it can retry on, not a cut connection (hypercorn
        cancels the connections it waited for, and Python 3.11's asyncio prints a CancelledError traceback
        for each: see services/runtime.py `run`)."""
        self.draining = True
        self._end(self._watchers)
        if await self._wait_idle(timeout):
            return
        log.warning("gateway_drain_timeout", open_requests=self.open_requests, drain_timeout=timeout)
        self._end(self._open)
        await self._wait_idle(ENDING_GRACE_S)

    async def _wait_idle(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def serving_state(self, model_id: str) -> str:
        """Whether this gateway can serve `model_id` now: the model's state among the live workers
        (`WorkersView.model_state`: "ready", "loading", "failed", "unavailable"), or "draining" (shutting down)
        and "disconnected" (NATS unreachable) when the gateway itself cannot take the request."""
        if self.draining:
            return "draining"
        if not self.nc.is_connected:
            return "disconnected"
        return self.workers.model_state(model_id)

    def adapters(self, model_id: str) -> list[str]:
        """LoRA adapters usable with `model_id`: configured in the registry, announced by live workers, or
        registered by a finished training job (workers load those on their first request if not yet)."""
        spec = self.registry.models.get(model_id)
        static = set(spec.adapters) if spec else set()
        return sorted(static | set(self.workers.adapters(model_id)) | self.registered.of(model_id))

    def resolve_adapter(self, name: str) -> tuple[str, str] | None:
        """(base model id, adapter) for an adapter name used as a model name (as vLLM users do)."""
        for model_id in self.registry.models:
            if name in self.adapters(model_id):
                return model_id, name
        return None

    async def queue_state(self) -> tuple[int, int]:
        """(pendingTasks, maxSize) straight from the work-queue streams: pendingTasks counts both the services'
        queue and the direct publishers' (each bounded apart); maxSize is the services' (HTTP clients') one."""
        info = await self.js.stream_info(subjects.GENERATE_STREAM)
        published = await self.js.stream_info(subjects.PUBLISHED_STREAM)
        pending = int(info.state.messages) + int(published.state.messages)
        return pending, int(info.config.max_msgs or self.settings.queue_max_size)

    async def nats_latency_ms(self) -> float:
        started = time.perf_counter()
        await self.nc.flush(timeout=2)
        return (time.perf_counter() - started) * 1000


def _shutting_down() -> CyError:
    return CyError(
        ErrorCode.INSUFFICIENT_RESOURCES,
        "the gateway is shutting down; retry on another gateway",
        retryable=True,
        retry_after=5,
    )
