"""Fixtures of the engine contract suites (tests/engine/contract.py): its adapters and a NATS client."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS

from tests.engine.contract import make_adapter_dir
from tests.helpers import NatsServer
from tests.nats_client import connect


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_adapter_dir(tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="module")
async def nc(nats_server: NatsServer) -> AsyncIterator[NATS]:
    client = await connect(nats_server.url)
    yield client
    await client.drain()
