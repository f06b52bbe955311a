"""Requests per minute counted across gateways (NATS KV): two gateways, one API key, one limit."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from gateway.ratelimit import WINDOW_S, RateLimiter
from schemas.errors import CyError, ErrorCode
from services.engine.worker import Worker
from services.models.registry import Registry
from tests.helpers import API_KEY, NatsServer, running_gateway, wait_until
from tests.trainer.helpers import unique

BODY = {"modelId": "tiny", "prompt": "hi", "generation": {"temperature": 0, "maxNewTokens": 1}}
LIMIT = 5


async def test_two_gateways_enforce_one_per_minute_limit_for_an_api_key(
    nats_server: NatsServer, registry: Registry, tiny_worker: Worker
) -> None:
    key = unique("shared-key")
    settings = {"rate_limit_per_minute": LIMIT, "api_key": f"{API_KEY},{key}"}
    async with (
        running_gateway(nats_server.url, registry, **settings) as a,
        running_gateway(nats_server.url, registry, **settings) as b,
    ):
        await wait_until(lambda: all(g.core.workers.model_state("tiny") == "ready" for g in (a, b)))
        async with a.client(api_key=key) as ca, b.client(api_key=key) as cb:
            first_window = int(time.time() // WINDOW_S)
            # Sequential, alternating, then a concurrent burst on both: every answer is 200 or 429.
            answers: list[httpx.Response] = []
            for i in range(6):
                answers.append(await (ca if i % 2 else cb).post("/api/v1/inference", json=BODY))
            answers += await asyncio.gather(*(c.post("/api/v1/inference", json=BODY) for c in [ca, cb] * 5))
            last_window = int(time.time() // WINDOW_S)
        assert a.core.limiter.shared_failures == b.core.limiter.shared_failures == 0
    accepted = [r for r in answers if r.status_code == 200]
    limited = [r for r in answers if r.status_code != 200]
    # One window: exactly the limit, whichever gateway answered; a window boundary crossed: one more window.
    windows = last_window - first_window + 1
    assert len(accepted) == LIMIT if windows == 1 else LIMIT <= len(accepted) <= LIMIT * windows
    assert len(accepted) + len(limited) == 16
    for r in limited:
        assert r.status_code == 429, r.text
        error = r.json()["error"]
        assert error["code"] == "RATE_LIMITED", error
        assert f"{LIMIT} requests per minute" in error["message"]
        assert 1 <= int(r.headers["Retry-After"]) <= WINDOW_S
    # The same key on each gateway alone would have admitted LIMIT each: both served some of the LIMIT.
    print(f"\naccepted {len(accepted)} of {len(answers)} across two gateways (limit {LIMIT}/min)")


class _BrokenKV:
    async def get(self, key: str) -> None:
        raise ConnectionError("NATS is gone")


async def test_without_nats_each_gateway_falls_back_to_its_own_per_minute_count() -> None:
    """Fail open to the per-process token bucket: the limit still holds per gateway."""
    for kv, connected in ((_BrokenKV(), True), (_BrokenKV(), False)):
        limiter = RateLimiter(2, 0)
        limiter.attach(kv, lambda connected=connected: connected)  # type: ignore[arg-type, misc]
        for _ in range(2):
            async with limiter.hold("client"):
                pass
        with pytest.raises(CyError) as err:
            async with limiter.hold("client"):
                pass
        assert err.value.code == ErrorCode.RATE_LIMITED
        assert limiter.shared_failures == (3 if connected else 0)


async def test_one_clients_simultaneous_requests_within_its_limits_are_all_admitted(
    nats_server: NatsServer, registry: Registry, tiny_worker: Worker
) -> None:
    # Before: concurrent requests of one key in one gateway collided on their own compare-and-set and 4 of 32
    # were refused with RATE_LIMITED, far below both limits.
    key = unique("burst-key")
    async with running_gateway(nats_server.url, registry, api_key=f"{API_KEY},{key}") as gw:
        await wait_until(lambda: gw.core.workers.model_state("tiny") == "ready")
        async with gw.client(api_key=key) as client:
            answers = await asyncio.gather(*(client.post("/api/v1/inference", json=BODY) for _ in range(32)))
    assert [r.status_code for r in answers] == [200] * 32, [r.text for r in answers if r.status_code != 200][:2]
    assert gw.core.limiter.shared_failures == 0
