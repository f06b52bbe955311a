"""Clients of our gateway: POST /api/v1/inference/stream (HTTP/SSE -> NATS -> worker)."""

from __future__ import annotations

import time

import httpx

from infra.bench._sse import sse_events
from infra.bench.workloads import OneRequest, Sample, TokenCounter


def gateway_request(client: httpx.AsyncClient, base_url: str, api_key: str, counter: TokenCounter) -> OneRequest:
    """One streamed request per call; the prompt goes through the chat template like everyone else's."""
    url = f"{base_url}/api/v1/inference/stream"
    headers = {"X-API-Key": api_key}

    async def one(prompt: str, max_new_tokens: int) -> Sample:
        body = {
            "modelId": "default",
            "prompt": prompt,
            "generation": {"temperature": 0, "maxNewTokens": max_new_tokens},
        }
        sent = time.monotonic()
        ttft: float | None = None
        text: list[str] = []
        finish: str | None = None
        async for event in sse_events(client, url, body, headers):
            if "error" in event:
                raise RuntimeError(f"stream error: {event['error']}")
            choice = event["choices"][0]
            if choice.get("text"):
                if ttft is None:
                    ttft = time.monotonic() - sent
                text.append(choice["text"])
            finish = choice.get("finish_reason") or finish
        return Sample(ttft, time.monotonic() - sent, counter.count("".join(text)), finish)

    return one
