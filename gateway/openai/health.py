"""GET /health (liveness, the spec's `{"status":"ok"}`) and GET /ready (a worker serves the default model).

Both stay outside /v1 and its bearer token, so load balancers and orchestrators can probe them.
"""

from __future__ import annotations

from quart import Blueprint, Response

from gateway.core import GatewayCore
from gateway.http_json import json_response


def make_blueprint(core: GatewayCore) -> Blueprint:
    bp = Blueprint("openai_health", __name__)

    @bp.get("/health")
    async def health() -> Response:
        return json_response({"status": "ok"})

    @bp.get("/ready")
    async def ready() -> Response:
        model_id = core.registry.default
        state = "draining" if core.draining else core.workers.model_state(model_id)
        ok = state == "ready"
        body = {"status": "ready" if ok else "not_ready", "model": model_id, "model_status": state}
        return json_response(body, status=200 if ok else 503)

    return bp
