"""Session-wide real parts: one nats-server (JetStream, temp store), the models, one tiny-model worker
and one gateway; per module a training gateway and its folders, per test a trainer. Tests that break things
(kill, restart) start their own."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from services.engine.worker import Worker
from services.models.registry import Registry
from services.trainer.worker import Trainer
from services.training.paths import Roots
from tests.helpers import (
    Gateway,
    NatsServer,
    build_tiny_model,
    make_registry,
    real_model_dir,
    running_gateway,
    running_worker,
)
from tests.trainer.helpers import roots_for, running_trainer


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cy")


@pytest.fixture(scope="session")
def nats_server(session_dir: Path) -> Iterator[NatsServer]:
    server = NatsServer(session_dir / "nats").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def registry(session_dir: Path) -> Registry:
    real = real_model_dir()
    tiny = build_tiny_model(real.parent / "tiny-llama-test")
    return make_registry(session_dir, tiny, real)


@pytest.fixture(scope="session")
def registry_file(registry: Registry, session_dir: Path) -> Path:
    return session_dir / "models.json"


@pytest.fixture(scope="session")
async def tiny_worker(nats_server: NatsServer, registry: Registry) -> AsyncIterator[Worker]:
    async with running_worker(nats_server.url, registry, "tiny", worker_id="tiny-w1", slots=8) as worker:
        yield worker


@pytest.fixture(scope="session")
async def gateway(nats_server: NatsServer, registry: Registry, tiny_worker: Worker) -> AsyncIterator[Gateway]:
    async with running_gateway(nats_server.url, registry) as gw:
        # Wait until the gateway has seen the worker's heartbeat.
        from tests.helpers import wait_until

        await wait_until(lambda: gw.core.workers.model_state("tiny") == "ready")
        yield gw


@pytest.fixture(scope="session")
async def real_worker(nats_server: NatsServer, registry: Registry) -> AsyncIterator[Worker]:
    async with running_worker(
        nats_server.url, registry, "smollm2-135m-instruct", worker_id="smol-w1", slots=8
    ) as worker:
        yield worker


@pytest.fixture(scope="module")
def roots(session_dir: Path) -> Roots:
    """The training folders (datasets, outputs) that a module's gateway and trainers share."""
    return roots_for(session_dir)


@pytest.fixture(scope="module")
async def gw(nats_server: NatsServer, registry: Registry, roots: Roots, tiny_worker: Worker) -> AsyncIterator[Gateway]:
    """A gateway of the module's own that knows the training folders, once the tiny worker is ready."""
    from tests.helpers import wait_until

    async with running_gateway(
        nats_server.url, registry, datasets_dir=str(roots.datasets), outputs_dir=str(roots.outputs)
    ) as gateway:
        await wait_until(lambda: gateway.core.workers.model_state("tiny") == "ready")
        yield gateway


@pytest.fixture
async def trainer(nats_server: NatsServer, registry: Registry, roots: Roots) -> AsyncIterator[Trainer]:
    """A trainer for one test, on the training folders of its module (or of the session, in tests/trainer/)."""
    async with running_trainer(nats_server.url, registry, roots) as t:
        yield t
