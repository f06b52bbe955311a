"""Prometheus metrics: the gateway's /metrics and a worker's own, scraped around a real streamed request."""

from __future__ import annotations

import asyncio

import httpx
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from services.engine.worker import Worker
from services.metrics import TrainerMetrics
from tests.helpers import Gateway


def sample(text: str, name: str, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels` (0 when none)."""
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and labels.items() <= s.labels.items()
    )


async def scrape(url: str) -> str:
    async with httpx.AsyncClient(timeout=10) as client:
        r = await client.get(url)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("text/plain")
        return r.text


def worker_url(worker: Worker) -> str:
    assert worker._metrics_server is not None
    return worker._metrics_server.url


async def test_a_streamed_request_moves_ttft_token_counters_and_the_gateway_request_count(
    gateway: Gateway, tiny_worker: Worker
) -> None:
    route = "/api/v1/inference/stream"
    before_w = await scrape(worker_url(tiny_worker))
    before_g = await scrape(f"{gateway.api_url}/metrics")  # no API key needed
    body = {"modelId": "tiny", "prompt": "Hello there", "generation": {"maxNewTokens": 12, "temperature": 0}}
    during = ""
    async with gateway.client() as client, client.stream("POST", route, json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: {") and not during:
                during = await scrape(f"{gateway.api_url}/metrics")
    # While it streamed the gateway counted it open and saw the worker's slots in its heartbeats.
    assert sample(during, "cy_llm:gateway_open_requests") >= 1
    assert sample(during, "cy_llm:worker_slots_total", worker="tiny-w1", model="tiny") == 8

    after_w = await scrape(worker_url(tiny_worker))
    labels = {"worker": "tiny-w1", "model": "tiny"}
    assert sample(after_w, "cy_llm:time_to_first_token_seconds_count", **labels) == (
        sample(before_w, "cy_llm:time_to_first_token_seconds_count", **labels) + 1
    )
    generated = sample(after_w, "cy_llm:generation_tokens_total", **labels) - sample(
        before_w, "cy_llm:generation_tokens_total", **labels
    )
    assert 1 <= generated <= 12
    assert sample(after_w, "cy_llm:prompt_tokens_total", **labels) > sample(before_w, "cy_llm:prompt_tokens_total")
    for name in ("cy_llm:e2e_request_latency_seconds_count", "cy_llm:request_queue_time_seconds_count"):
        assert sample(after_w, name, **labels) == sample(before_w, name, **labels) + 1, name
    # The worker's own gauges: its slots.
    assert sample(after_w, "cy_llm:slots_total", **labels) == 8
    assert sample(after_w, "cy_llm:slots_free", **labels) + sample(after_w, "cy_llm:num_requests_running") == 8

    # The gateway counts a stream when its last byte is sent.
    count = {"app": "api", "route": route, "status": "200", "model": "tiny", "method": "POST"}
    start = sample(before_g, "cy_llm:http_requests_total", **count)

    after_g = ""
    for _ in range(100):
        after_g = await scrape(f"{gateway.api_url}/metrics")
        if sample(after_g, "cy_llm:http_requests_total", **count) == start + 1:
            break
        await asyncio.sleep(0.05)
    assert sample(after_g, "cy_llm:http_requests_total", **count) == start + 1, after_g
    assert sample(after_g, "cy_llm:http_request_duration_seconds_count", app="api", route=route) >= 1
    names = {s.name for f in text_string_to_metric_families(after_g) for s in f.samples}
    assert {"cy_llm:queue_pending_requests", "cy_llm:queue_max_requests", "cy_llm:training_jobs"} <= names


async def test_openai_requests_are_counted_with_the_lite_app_label(gateway: Gateway) -> None:
    assert gateway.lite_url is not None
    async with httpx.AsyncClient(timeout=60) as client:
        r = await client.get(f"{gateway.lite_url}/models")
        assert r.status_code == 200
    text = await scrape(f"{gateway.api_url}/metrics")
    assert sample(text, "cy_llm:http_requests_total", app="openai", route="/v1/models", status="200") >= 1
    # A client-chosen path is not a label value.
    async with httpx.AsyncClient(timeout=60) as client:
        await client.get(f"{gateway.api_url}/no-such-route-abc")
    text = await scrape(f"{gateway.api_url}/metrics")
    assert "no-such-route-abc" not in text


def test_trainer_step_time_and_loss_come_from_progress_events() -> None:
    metrics = TrainerMetrics("t1", lambda: "job-1")
    metrics.observe_progress("job-1", "started", 0, 0.0, None)
    metrics.observe_progress("job-1", "step", 1, 2.0, 1.5)
    metrics.observe_progress("job-1", "step", 3, 5.0, 1.25)
    text = generate_latest(metrics.registry).decode()
    assert sample(text, "cy_llm:training_step_seconds_count") == 3
    assert sample(text, "cy_llm:training_step_seconds_sum") == 5.0
    assert sample(text, "cy_llm:training_loss", job_id="job-1") == 1.25
    assert sample(text, "cy_llm:training_job_running", trainer="t1") == 1
    metrics.job_done("job-1")
    assert "job-1" not in generate_latest(metrics.registry).decode()
