"""`python -m services.trainer`: run one trainer until SIGINT/SIGTERM (then checkpoint, requeue, drain)."""

from __future__ import annotations

import asyncio

from services.runtime import configure_logging, load_settings, run
from services.trainer.worker import Trainer, TrainerSettings


async def main(stop: asyncio.Event) -> None:
    trainer = Trainer(load_settings(TrainerSettings))
    await trainer.start()
    await stop.wait()
    await trainer.stop()


if __name__ == "__main__":
    configure_logging("trainer")
    run(main)
