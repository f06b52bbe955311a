"""Prometheus metrics of the engine workers and trainers, each served on a port of its own.

Every worker and trainer owns a `CollectorRegistry` (several run in one test process) and serves it with
prometheus-client's HTTP server on `CY_LLM_METRICS_HOST:CY_LLM_METRICS_PORT`. When that port is taken (`just
up` starts several services with the same default) the next free one in `PORT_SPAN` is used; the URL is
logged (`metrics_listening`) and announced in the service's NATS micro INFO metadata (`metrics_url`).

The numbers are the ones the services already compute for their log lines (the worker's `generation` line:
ttft_ms, prompt/completion tokens, duration; the trainer's progress events), and what the engine reports of its KV
cache and queue (`Engine.stats()`, read at scrape time): nothing is measured twice.
Names follow vLLM's habits: `cy_llm:` prefix, `_seconds` for durations, `_total` for counters.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from services.engine.base import EngineStats

log = structlog.get_logger()

# How many ports above CY_LLM_METRICS_PORT a service tries before it gives up serving metrics.
PORT_SPAN = 100

# vLLM's buckets for the same quantities (seconds).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
LATENCY_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 300.0)
STEP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 7.5, 10.0, 15.0, 30.0, 60.0, 120.0)


class MetricsServer:
    """prometheus-client's threaded HTTP server for one registry; `close()` is idempotent."""

    def __init__(self, server: Any, thread: Any, host: str, port: int) -> None:
        self._server, self._thread = server, thread
        self.port = port
        self.url = f"http://{host}:{port}/metrics"

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def serve(registry: CollectorRegistry, host: str, port: int) -> MetricsServer | None:
    """Serve `registry` on the first free port in [port, port + PORT_SPAN); None when `port` is 0 (off) or
    every port is taken (logged: metrics are never a reason for a service not to start)."""
    if port == 0:
        return None
    for candidate in range(port, min(port + PORT_SPAN, 65536)):
        try:
            server, thread = start_http_server(candidate, addr=host, registry=registry)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                continue
            log.warning("metrics_not_served", host=host, port=candidate, error=repr(exc))
            return None
        metrics = MetricsServer(server, thread, host, candidate)
        log.info("metrics_listening", url=metrics.url)
        return metrics
    log.warning("metrics_not_served", host=host, port=port, error=f"ports {port}-{port + PORT_SPAN - 1} are taken")
    return None


class _Callback(Collector):
    """Gauges read at scrape time from the live service (prometheus-client calls this from its own thread:
    the callback must only read plain attributes)."""

    def __init__(self, collect: Callable[[], Iterable[GaugeMetricFamily | CounterMetricFamily]]) -> None:
        self._collect = collect

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        return self._collect()


class WorkerMetrics:
    """An engine worker's series, labelled with its `worker` id and `model`.

    `engine_stats` (read at scrape time) gives the engine's prefix-cache counters, KV-cache usage and waiting
    requests (services/engine/base.py EngineStats); a figure the engine does not measure is left out.
    """

    def __init__(
        self,
        worker_id: str,
        model_id: str,
        slots: Callable[[], tuple[int, int]],
        engine_stats: Callable[[], EngineStats] | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        self._labels = {"worker": worker_id, "model": model_id}
        self._slots = slots
        self._engine_stats = engine_stats
        names = ["worker", "model"]
        r = self.registry
        self.requests = Counter(
            "cy_llm:generation_requests", "Generations finished, by outcome (finish reason or error code)",
            [*names, "adapter", "outcome"], registry=r,
        )  # fmt: skip
        self.prompt_tokens = Counter(
            "cy_llm:prompt_tokens", "Prompt tokens of the generations served", [*names, "adapter"], registry=r
        )
        self.completion_tokens = Counter(
            "cy_llm:generation_tokens", "Tokens generated", [*names, "adapter"], registry=r
        )
        self.ttft = Histogram(
            "cy_llm:time_to_first_token_seconds", "Pickup from the queue to the first token",
            names, buckets=TTFT_BUCKETS, registry=r,
        )  # fmt: skip
        self.itl = Histogram(
            "cy_llm:inter_token_latency_seconds",
            "Mean time between two output tokens of one request (observed once per request)",
            names, buckets=ITL_BUCKETS, registry=r,
        )  # fmt: skip
        self.e2e = Histogram(
            "cy_llm:e2e_request_latency_seconds", "Pickup from the queue to the end of the generation",
            names, buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_time = Histogram(
            "cy_llm:request_queue_time_seconds", "Time a request waited in the JetStream work queue",
            names, buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.registry.register(_Callback(self._slot_gauges))
        if engine_stats is not None:
            self.registry.register(_Callback(self._engine_series))

    def _engine_series(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        assert self._engine_stats is not None
        stats = self._engine_stats()
        labels, values = list(self._labels), list(self._labels.values())
        # vLLM's names: counters in tokens, usage as a fraction (1 = every block) despite the `_perc`.
        for name, doc, count in (
            ("cy_llm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache", stats.prefix_cache_queries),
            ("cy_llm:prefix_cache_hits", "Prompt tokens found in the prefix cache", stats.prefix_cache_hits),
        ):
            counter = CounterMetricFamily(name, doc, labels=labels)
            counter.add_metric(values, count)
            yield counter
        for name, doc, value in (
            ("cy_llm:kv_cache_usage_perc", "Fraction of the KV cache held by running sequences", stats.kv_cache_usage),
            ("cy_llm:num_requests_waiting", "Requests the engine holds but did not run its last step", stats.waiting),
        ):
            if value is not None:
                gauge = GaugeMetricFamily(name, doc, labels=labels)
                gauge.add_metric(values, value)
                yield gauge

    def _slot_gauges(self) -> Iterable[GaugeMetricFamily]:
        total, busy = self._slots()
        for name, doc, value in (
            ("cy_llm:num_requests_running", "Sequences the engine is generating now", busy),
            ("cy_llm:slots_free", "Free slots (requests this worker would pull now)", total - busy),
            ("cy_llm:slots_total", "Continuous-batching width of the engine", total),
        ):
            family = GaugeMetricFamily(name, doc, labels=list(self._labels))
            family.add_metric(list(self._labels.values()), value)
            yield family

    def observe_queue_wait(self, stored_at: float) -> None:
        """`stored_at`: unix time JetStream stored the request (its message metadata)."""
        self.queue_time.labels(**self._labels).observe(max(time.time() - stored_at, 0.0))

    def observe_generation(self, outcome: str, adapter: str, duration_s: float, stats: Mapping[str, Any]) -> None:
        """One finished generation, from the worker's `generation` log fields (`stats`)."""
        labels = {**self._labels, "adapter": adapter}
        self.requests.labels(**labels, outcome=outcome).inc()
        prompt, completion = int(stats.get("prompt_tokens") or 0), int(stats.get("completion_tokens") or 0)
        self.prompt_tokens.labels(**labels).inc(prompt)
        self.completion_tokens.labels(**labels).inc(completion)
        self.e2e.labels(**self._labels).observe(duration_s)
        ttft_ms = stats.get("ttft_ms")
        if ttft_ms is not None:
            self.ttft.labels(**self._labels).observe(ttft_ms / 1000)
            if completion > 1:
                self.itl.labels(**self._labels).observe(max(duration_s - ttft_ms / 1000, 0.0) / (completion - 1))


class TrainerMetrics:
    """A trainer's series, labelled with its `trainer` id; fed by the progress events it publishes."""

    def __init__(self, trainer_id: str, current_job: Callable[[], str | None]) -> None:
        self.registry = CollectorRegistry()
        self._trainer = trainer_id
        self._current_job = current_job
        r = self.registry
        self.step_time = Histogram(
            "cy_llm:training_step_seconds", "Wall time of one optimizer step", ["trainer"],
            buckets=STEP_BUCKETS, registry=r,
        )  # fmt: skip
        self.steps = Counter("cy_llm:training_steps", "Optimizer steps done", ["trainer"], registry=r)
        self.loss = Gauge("cy_llm:training_loss", "Latest training loss of a job", ["trainer", "job_id"], registry=r)
        self.events = Counter(
            "cy_llm:training_events", "Training progress events published, by kind", ["trainer", "kind"], registry=r
        )
        self.registry.register(_Callback(self._busy))
        # job id -> (step, elapsed_s) of its last step event
        self._last: dict[str, tuple[int, float]] = {}

    def _busy(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily("cy_llm:training_job_running", "1 while this trainer runs a job", labels=["trainer"])
        family.add_metric([self._trainer], 1 if self._current_job() else 0)
        yield family

    def observe_progress(self, job_id: str, kind: str, step: int, elapsed_s: float, loss: float | None) -> None:
        """One progress event (the same one that goes to the job's events stream)."""
        self.events.labels(trainer=self._trainer, kind=kind).inc()
        if loss is not None:
            self.loss.labels(trainer=self._trainer, job_id=job_id).set(loss)
        if kind == "step":
            last = self._last.get(job_id)
            if last is not None and step > last[0] and elapsed_s >= last[1]:
                steps = step - last[0]
                self.steps.labels(trainer=self._trainer).inc(steps)
                for _ in range(steps):
                    self.step_time.labels(trainer=self._trainer).observe((elapsed_s - last[1]) / steps)
            self._last[job_id] = (step, elapsed_s)
        elif kind in ("started", "resumed"):
            self._last[job_id] = (step, elapsed_s)

    def job_done(self, job_id: str) -> None:
        """The job left this trainer (finished, paused, requeued): its loss series ends with it, so there is
        one series per running job, not one per job ever run."""
        self._last.pop(job_id, None)
        try:
            self.loss.remove(self._trainer, job_id)
        except KeyError:
            pass
