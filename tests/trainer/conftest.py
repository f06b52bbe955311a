"""Training fixtures: the datasets/outputs roots of the session, the JobService, a trainer per test."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.models.registry import Registry
from services.trainer.worker import Trainer
from services.training.jobs import JobService
from services.training.paths import Roots
from tests.helpers import NatsServer
from tests.trainer.helpers import job_service, roots_for, running_trainer


@pytest.fixture(scope="session")
def roots(session_dir: Path) -> Roots:
    return roots_for(session_dir)


@pytest.fixture(scope="session")
async def jobs(nats_server: NatsServer, registry: Registry, roots: Roots) -> AsyncIterator[JobService]:
    async with job_service(nats_server.url, registry, roots) as service:
        yield service


@pytest.fixture
async def trainer(nats_server: NatsServer, registry: Registry, roots: Roots) -> AsyncIterator[Trainer]:
    async with running_trainer(nats_server.url, registry, roots) as t:
        yield t
