"""A minimal streaming SSE client over httpx, shared by the gateway and the peer load generators."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx


def make_client(concurrency: int) -> httpx.AsyncClient:
    """One connection per concurrent stream; no read timeout beyond a generous bound per event."""
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    return httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(600.0, connect=10.0))


async def sse_events(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], headers: dict[str, str]
) -> AsyncIterator[dict[str, Any]]:
    """The JSON `data:` payloads of one streamed POST, until `[DONE]`. Raises httpx.HTTPStatusError."""
    async with client.stream("POST", url, json=body, headers=headers) as resp:
        if resp.status_code != 200:
            await resp.aread()
            resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue  # blank separators and `: keep-alive` comments
            data = line[5:].strip()
            if data == "[DONE]":
                return
            yield json.loads(data)
