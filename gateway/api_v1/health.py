"""GET /api/v1/health and /health/details. The spec's `redis` component is `nats` here."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

from quart import Blueprint, Response

from gateway.core import GatewayCore
from gateway.http_json import json_response


def _iso(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _uptime(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60}m{s % 60}s"


async def snapshot(core: GatewayCore) -> dict[str, Any]:
    """Every component's state, measured now."""
    now = datetime.now(UTC)
    try:
        # Whole milliseconds as in the spec's example (`"latencyMs": 1`), rounded up: 0.3 ms reads 1.
        latency = math.ceil(await core.nats_latency_ms())
        pending, max_size = await core.queue_state()
        nats_up = core.nc.is_connected
    except Exception:
        latency, pending, max_size, nats_up = None, None, core.settings.queue_max_size, False
    total, healthy, unhealthy = core.workers.counts()
    gateway_up = not core.draining
    coordinator_up = nats_up and healthy > 0
    status = "UP" if gateway_up and coordinator_up else "DOWN" if not nats_up else "DEGRADED"
    return {
        "status": status,
        "components": {
            "gateway": {
                "status": "UP" if gateway_up else "DRAINING",
                "details": {
                    "startTime": _iso(core.started_at),
                    "uptime": _uptime((now - core.started_at).total_seconds()),
                },
            },
            "coordinator": {
                "status": "UP" if coordinator_up else "DOWN",
                "details": {
                    "workers": {"total": total, "healthy": healthy, "unhealthy": unhealthy},
                    "queue": {"pendingTasks": pending, "maxSize": max_size},
                },
            },
            "nats": {"status": "UP" if nats_up else "DOWN", "details": {"latencyMs": latency, "connected": nats_up}},
        },
        "timestamp": _iso(now),
    }


def make_blueprint(core: GatewayCore) -> Blueprint:
    bp = Blueprint("health", __name__)

    @bp.get("/health")
    async def health() -> Response:
        snap = await snapshot(core)
        body = {
            "status": snap["status"],
            "components": {name: c["status"] for name, c in snap["components"].items()},
            "timestamp": snap["timestamp"],
        }
        return json_response(body, status=503 if snap["status"] == "DOWN" else 200)

    @bp.get("/health/details")
    async def health_details() -> Response:
        snap = await snapshot(core)
        return json_response(snap, status=503 if snap["status"] == "DOWN" else 200)

    return bp
