"""Training fixtures: the datasets/outputs roots of the session and the JobService (the trainer per test is
tests/conftest.py's, on these roots)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.models.registry import Registry
from services.training.jobs import JobService
from services.training.paths import Roots
from tests.helpers import NatsServer
from tests.trainer.helpers import job_service, roots_for


@pytest.fixture(scope="session")
def roots(session_dir: Path) -> Roots:
    return roots_for(session_dir)


@pytest.fixture(scope="session")
async def jobs(nats_server: NatsServer, registry: Registry, roots: Roots) -> AsyncIterator[JobService]:
    async with job_service(nats_server.url, registry, roots) as service:
        yield service
