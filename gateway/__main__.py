"""`python -m gateway`: serve both HTTP APIs until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio

import structlog
from hypercorn.asyncio import serve as hypercorn_serve

from gateway.api_v1.app import create_api_app
from gateway.core import GatewayCore
from gateway.openai.app import create_lite_app
from gateway.server import hypercorn_config
from gateway.settings import GatewaySettings, load_gateway_settings
from services.runtime import configure_logging, run

log = structlog.get_logger()


async def serve(settings: GatewaySettings, stop: asyncio.Event) -> None:
    """Serve /api/v1 and /v1 until `stop` is set; then refuse new work and let open streams finish."""
    if not settings.api_key:
        raise SystemExit("CY_LLM_API_KEY is not set: the gateway never runs without authentication")
    core = GatewayCore(settings)
    await core.start()
    apps = [(create_api_app(core), settings.port), (create_lite_app(core), settings.lite_port)]

    async def drain_on_stop() -> None:
        await stop.wait()
        log.info("gateway_draining", open_requests=core.open_requests)
        await core.drain(settings.drain_timeout)

    # One drain for both servers: each awaits it as its shutdown trigger, then closes its connections.
    drained = asyncio.create_task(drain_on_stop(), name="drain")

    async def shutdown_trigger() -> None:
        await asyncio.shield(drained)

    log.info(
        "gateway_listening",
        api=f"http://{settings.host}:{settings.port}/api/v1",
        lite=f"http://{settings.host}:{settings.lite_port}/v1",
    )
    try:
        await asyncio.gather(
            *(
                hypercorn_serve(
                    app,
                    hypercorn_config(settings.host, port),  # type: ignore[arg-type]
                    shutdown_trigger=shutdown_trigger,
                )
                for app, port in apps
            )
        )
    finally:
        drained.cancel()
        await asyncio.gather(drained, return_exceptions=True)
        await core.close()
        log.info("gateway_stopped")


async def main(stop: asyncio.Event) -> None:
    await serve(load_gateway_settings(), stop)


if __name__ == "__main__":
    configure_logging("gateway")
    run(main)
