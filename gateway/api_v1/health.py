"""GET /api/v1/health, /health/details (the spec's, plus which models can be served), /health/live and
/health/ready (probes for orchestrators). The spec's `redis` component is `nats` here.

`/health` is not UP before a model can be served: a worker announces itself while it still loads its model, so
"a worker is alive" came ~2 s before any request could succeed (issue 19 item 8). UP now needs a model that a
live worker has ready; until then the status is STARTING with a 503.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime

from quart import Blueprint, Response

from gateway.api_v1 import protocol as p
from gateway.core import GatewayCore
from gateway.http_json import json_response

# Statuses answered with 503 (a load balancer takes the gateway out): nothing can be served through it.
_UNAVAILABLE = ("STARTING", "DOWN")

_NOT_READY = {
    "draining": "the gateway is shutting down",
    "disconnected": "NATS is unreachable",
    "loading": "model '{model}' is still loading on its workers",
    "failed": "model '{model}' failed to load on every live worker",
    "unavailable": "no live worker serves model '{model}'",
}


def _iso(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _uptime(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60}m{s % 60}s"


async def snapshot(core: GatewayCore) -> p.HealthDetails:
    """Every component's state and every registry model's, measured now."""
    now = datetime.now(UTC)
    try:
        # Whole milliseconds as in the spec's example (`"latencyMs": 1`), rounded up: 0.3 ms reads 1.
        latency: int | None = math.ceil(await core.nats_latency_ms())
        pending, max_size = await core.queue_state()
        nats_up = core.nc.is_connected
    except Exception:
        latency, pending, max_size, nats_up = None, None, core.settings.queue_max_size, False
    total, healthy, unhealthy = core.workers.counts()
    models = {model_id: core.workers.model_state(model_id) for model_id in core.registry.models}
    gateway_up = not core.draining
    status: p.HealthStatus
    if not nats_up:
        status = "DOWN"
    elif not gateway_up:
        status = "DEGRADED"
    elif "ready" not in models.values():
        status = "STARTING"
    else:
        status = "UP"
    return p.HealthDetails(
        status=status,
        components=p.HealthComponents(
            gateway=p.GatewayComponent(
                status="UP" if gateway_up else "DRAINING",
                details=p.GatewayDetails(
                    start_time=_iso(core.started_at), uptime=_uptime((now - core.started_at).total_seconds())
                ),
            ),
            coordinator=p.CoordinatorComponent(
                status="UP" if nats_up and healthy > 0 else "DOWN",
                details=p.CoordinatorDetails(
                    workers=p.WorkerCounts(total=total, healthy=healthy, unhealthy=unhealthy),
                    queue=p.QueueState(pending_tasks=pending, max_size=max_size),
                ),
            ),
            nats=p.NatsComponent(
                status="UP" if nats_up else "DOWN", details=p.NatsDetails(latency_ms=latency, connected=nats_up)
            ),
        ),
        models=models,
        timestamp=_iso(now),
    )


def readiness(core: GatewayCore) -> p.Readiness:
    """READY when a live worker has the registry's default model ready and the gateway takes work."""
    model_id = core.registry.default
    state = core.serving_state(model_id)
    if state == "ready":
        return p.Readiness(status="READY", model_id=model_id, model_status=state)
    reason = _NOT_READY[state].format(model=model_id)
    return p.Readiness(status="NOT_READY", model_id=model_id, model_status=state, reason=reason)


def make_blueprint(core: GatewayCore) -> Blueprint:
    bp = Blueprint("health", __name__)

    @bp.get("/health")
    async def health() -> Response:
        snap = await snapshot(core)
        components = snap.components
        body = p.Health(
            status=snap.status,
            components={
                "gateway": components.gateway.status,
                "coordinator": components.coordinator.status,
                "nats": components.nats.status,
            },
            models=snap.models,
            timestamp=snap.timestamp,
        )
        return json_response(body, status=503 if snap.status in _UNAVAILABLE else 200)

    @bp.get("/health/details")
    async def health_details() -> Response:
        snap = await snapshot(core)
        return json_response(snap, status=503 if snap.status in _UNAVAILABLE else 200)

    @bp.get("/health/live")
    async def live() -> Response:
        # The process answers: nothing else is checked, so a restart is never asked for while workers load.
        return json_response(p.Liveness(status="UP"))

    @bp.get("/health/ready")
    async def ready() -> Response:
        body = readiness(core)
        return json_response(body, status=200 if body.status == "READY" else 503)

    return bp
