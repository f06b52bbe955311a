"""`python -m gateway`: serve both HTTP APIs until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio

from gateway.app import serve
from gateway.settings import load_gateway_settings
from services.runtime import configure_logging, run


async def main(stop: asyncio.Event) -> None:
    await serve(load_gateway_settings(), stop)


if __name__ == "__main__":
    configure_logging("gateway")
    run(main)
