"""Fixtures of the engine tests: the tiny model on a transformers engine of the module's own, and for the contract
suites (tests/engine/contract.py) their adapters and a NATS client."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS

from services.engine.transformers_engine import TransformersEngine
from services.models.registry import Registry
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


@pytest.fixture(scope="module")
async def engine(registry: Registry) -> AsyncIterator[TransformersEngine]:
    """The tiny model on a transformers engine with 16 slots, one per test module."""
    spec = registry.models["tiny"]
    eng = TransformersEngine(spec.model_path, max_model_len=spec.max_model_len, slots=16)
    await eng.start()
    yield eng
    await eng.close()
