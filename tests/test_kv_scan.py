"""Listing a KV bucket sees every live key, even when many listings run at once (nats-py's own watcher-based
listing can read a full bucket as empty: see services/kv_scan.py)."""

from __future__ import annotations

import asyncio

from nats.js.api import KeyValueConfig

from services import kv_scan
from tests.helpers import NatsServer
from tests.nats_client import connect


async def test_concurrent_listings_each_see_every_live_key_and_no_deleted_one(nats_server: NatsServer) -> None:
    nc = await connect(nats_server.url)
    try:
        js = nc.jetstream()
        kv = await js.create_key_value(KeyValueConfig(bucket="scan_test", history=1))
        for i in range(60):
            await kv.put(f"m.k{i}", f"v{i}".encode())
        await kv.delete("m.k0")
        await kv.put("other.k", b"x")

        listings = await asyncio.gather(*(kv_scan.entries(js, kv, "scan_test", "m.*") for _ in range(40)))

        expected = {f"m.k{i}": f"v{i}".encode() for i in range(1, 60)}
        for found in listings:
            assert found == expected
    finally:
        await nc.close()


async def test_a_bucket_that_does_not_exist_lists_as_empty(nats_server: NatsServer) -> None:
    nc = await connect(nats_server.url)
    try:
        assert await kv_scan.keys(nc.jetstream(), "no_such_bucket") == []
    finally:
        await nc.close()
