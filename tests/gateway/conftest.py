"""What the gateway tests share: an HTTP client on the module's gateway `gw`, and the official OpenAI SDK pointed
at a gateway's `/v1` app."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from openai import AsyncOpenAI, OpenAI

from tests.helpers import Gateway


def sdk(url: str | None, api_key: str = "unused", timeout: float = 120) -> AsyncOpenAI:
    """An async SDK client for a `/v1` base URL: no retries (a test sees the first answer), a generous timeout."""
    assert url, "the Lite API app is not served"
    return AsyncOpenAI(base_url=url, api_key=api_key, max_retries=0, timeout=timeout)


@pytest.fixture
async def aclient(gateway: Gateway) -> AsyncIterator[AsyncOpenAI]:
    """The SDK on the session's gateway (the tiny model is the default; the real one when a test starts it)."""
    async with sdk(gateway.lite_url) as client:
        yield client


@pytest.fixture
async def client(gw: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    """An `/api/v1` client (with the API key) on the module's gateway `gw`."""
    async with gw.client() as c:
        yield c


@pytest.fixture
def sync_client(gateway: Gateway) -> Iterator[OpenAI]:
    """The sync SDK client; call it through `asyncio.to_thread` (the server shares this event loop)."""
    assert gateway.lite_url
    with OpenAI(base_url=gateway.lite_url, api_key="unused", max_retries=0, timeout=60) as c:
        yield c
