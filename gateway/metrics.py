"""The gateway's Prometheus metrics, served at GET /metrics on the /api/v1 port (no API key: docs/operations.md).

- HTTP requests, counted and timed by an ASGI wrapper around each app when the response is fully sent (an
  SSE stream counts when it ends), labelled with the route template, status, and the model and adapter the
  request bound for its canonical `request` log line (adapter only on success: a client-chosen name must not
  create series).
- Cluster state read at scrape time from what the gateway already watches: the work queue's depth
  (`pendingTasks`), every worker's heartbeat (slots total/busy), and the training jobs bucket (jobs by state).

Per-request engine numbers (TTFT, inter-token latency, tokens, queue wait) come from the workers' own
/metrics (services/metrics.py), where they are measured.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import TYPE_CHECKING, Any

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from quart import Quart, Response, request

from services.metrics import LATENCY_BUCKETS

if TYPE_CHECKING:
    from gateway.core import GatewayCore

log = structlog.get_logger()

METRICS_PATH = "/metrics"
# Scrape-time reads of NATS (queue depth, training jobs) give up after this long; the rest still renders.
SCRAPE_NATS_TIMEOUT_S = 2.0
_LABELS = "cy_llm.metrics"  # key in the ASGI scope where after_request leaves the request's labels

Scope = MutableMapping[str, Any]
ASGIApp = Callable[..., Awaitable[None]]
JOB_STATES = ("queued", "running", "paused", "completed", "failed", "cancelled")


class GatewayMetrics:
    def __init__(self, core: GatewayCore) -> None:
        self._core = core
        self.registry = CollectorRegistry()
        self.http_requests = Counter(
            "cy_llm:http_requests",
            "HTTP requests answered, by app, route template, method, status, model and adapter",
            ["app", "route", "method", "status", "model", "adapter"],
            registry=self.registry,
        )
        self.http_duration = Histogram(
            "cy_llm:http_request_duration_seconds",
            "Request start to the last byte of the response (the end of an SSE stream included)",
            ["app", "route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._snapshot: list[GaugeMetricFamily] = []
        self.registry.register(_Snapshot(self))

    # --- HTTP ----------------------------------------------------------------------------------
    def install(self, app: Quart, name: str, *, serve: bool = False) -> None:
        """Count and time `app`'s requests under app=`name`; `serve`: also answer GET /metrics on it."""
        app.after_request(self._remember_labels)
        app.asgi_app = self._wrap(name, app.asgi_app, serve)  # type: ignore[method-assign,assignment]

    def _wrap(self, name: str, asgi: ASGIApp, serve: bool) -> ASGIApp:
        async def counted(scope: Scope, receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                await asgi(scope, receive, send)
                return
            if serve and scope.get("path") == METRICS_PATH and scope.get("method") in ("GET", "HEAD"):
                # Answered here, outside the app: an operations endpoint, not part of the API (its routes,
                # auth and OpenAPI document stay the API's own).
                await self._serve(scope, send)
                return
            started = time.perf_counter()
            status = 0

            async def watch(message: Any) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                await send(message)

            try:
                await asgi(scope, receive, watch)
            finally:
                labels = scope.get(_LABELS) or {}
                route = labels.get("route", "unmatched")
                self.http_requests.labels(
                    app=name,
                    route=route,
                    method=scope.get("method", ""),
                    status=str(status or 499),  # no response started: the client left first
                    model=labels.get("model", ""),
                    adapter=labels.get("adapter", ""),
                ).inc()
                self.http_duration.labels(app=name, route=route).observe(time.perf_counter() - started)

        return counted

    async def _remember_labels(self, response: Response) -> Response:
        """after_request: leave the labels for the ASGI wrapper, which counts once the body is sent. Only
        registry model ids and (on success) served adapters become label values: never free client text."""
        bound = structlog.contextvars.get_contextvars()
        rule = request.url_rule
        model = str(bound.get("model_id") or "")
        scope: Scope = request.scope  # type: ignore[assignment]
        scope[_LABELS] = {
            "route": rule.rule if rule is not None else "unmatched",
            "model": model if model in self._core.registry.models else "",
            "adapter": str(bound.get("adapter") or "") if response.status_code < 400 else "",
        }
        return response

    async def _serve(self, scope: Scope, send: Any) -> None:
        await self.refresh()
        body = generate_latest(self.registry)
        headers = [(b"content-type", CONTENT_TYPE_LATEST.encode()), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})

    # --- scrape-time state ---------------------------------------------------------------------
    async def refresh(self) -> None:
        """Read the cluster state the gauges show; a NATS read that fails or stalls leaves its gauges out."""
        core = self._core
        families: list[GaugeMetricFamily] = []
        families.extend(self._workers())
        open_requests = GaugeMetricFamily("cy_llm:gateway_open_requests", "Generations this gateway serves now")
        open_requests.add_metric([], core.open_requests)
        families.append(open_requests)
        try:
            pending, max_size = await asyncio.wait_for(core.queue_state(), SCRAPE_NATS_TIMEOUT_S)
        except Exception as exc:
            log.debug("metrics_queue_state_failed", error=repr(exc))
        else:
            for name, doc, value in (
                ("cy_llm:queue_pending_requests", "Requests waiting in the work queue (pendingTasks)", pending),
                ("cy_llm:queue_max_requests", "Work-queue capacity (maxSize)", max_size),
            ):
                family = GaugeMetricFamily(name, doc)
                family.add_metric([], value)
                families.append(family)
        try:
            families.append(await asyncio.wait_for(self._training_jobs(), SCRAPE_NATS_TIMEOUT_S))
        except Exception as exc:
            log.debug("metrics_training_jobs_failed", error=repr(exc))
        self._snapshot = families

    def _workers(self) -> Iterable[GaugeMetricFamily]:
        view = self._core.workers
        labels = ["worker", "model", "engine"]
        total = GaugeMetricFamily("cy_llm:worker_slots_total", "Slots a worker announced (heartbeat)", labels=labels)
        busy = GaugeMetricFamily("cy_llm:worker_slots_busy", "Slots in use, per heartbeat", labels=labels)
        free = GaugeMetricFamily("cy_llm:worker_slots_free", "Free slots, per heartbeat", labels=labels)
        healthy = GaugeMetricFamily(
            "cy_llm:worker_healthy", "1 while the worker's heartbeat is fresh and it is not draining", labels=labels
        )
        for info in view.workers():
            model = ",".join(m.model_id for m in info.models)
            values = [info.worker_id, model, info.engine]
            total.add_metric(values, info.slots_total)
            busy.add_metric(values, info.slots_busy)
            free.add_metric(values, max(info.slots_total - info.slots_busy, 0))
            healthy.add_metric(values, 1 if view.is_healthy(info) and not info.draining else 0)
        return total, busy, free, healthy

    async def _training_jobs(self) -> GaugeMetricFamily:
        counts = dict.fromkeys(JOB_STATES, 0)
        for job in await self._core.training.records.all_jobs():
            counts[job.status] = counts.get(job.status, 0) + 1
        family = GaugeMetricFamily(
            "cy_llm:training_jobs", "Training jobs in the jobs bucket, by state", labels=["state"]
        )
        for state, count in counts.items():
            family.add_metric([state], count)
        return family


class _Snapshot(Collector):
    def __init__(self, metrics: GatewayMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[GaugeMetricFamily]:
        return list(self._metrics._snapshot)
