"""`python -m services.engine`: run one engine worker until SIGINT/SIGTERM (then drain)."""

from __future__ import annotations

import asyncio
import sys

import structlog

from schemas.errors import CyError
from services.engine.settings import WorkerSettings
from services.engine.worker import Worker
from services.runtime import configure_logging, load_settings, run


async def main(stop: asyncio.Event) -> None:
    settings = load_settings(WorkerSettings)
    worker = Worker(settings)
    try:
        await worker.start()
    except CyError as exc:
        structlog.get_logger().error("worker_start_failed", code=exc.code.value, error=exc.body.message)
        await worker.stop()
        sys.exit(3)
    await stop.wait()
    await worker.stop()


if __name__ == "__main__":
    configure_logging("engine-worker")
    run(main)
