"""GET /health (liveness, the spec's `{"status":"ok"}`) and GET /ready (a worker serves the default model).

Both stay outside /v1 and its bearer token, so load balancers and orchestrators can probe them. /health stays
200 while no model can be served yet (unlike /api/v1/health, which says STARTING with a 503): it is this port's
liveness probe, and an orchestrator that restarts a gateway whose workers are still loading gains nothing;
whether requests can be served is /ready's answer (docs/operations.md).
"""

from __future__ import annotations

from quart import Blueprint, Response

from gateway.core import GatewayCore
from gateway.http_json import json_response
from gateway.openai.protocol import Liveness, Readiness


def make_blueprint(core: GatewayCore) -> Blueprint:
    bp = Blueprint("openai_health", __name__)

    @bp.get("/health")
    async def health() -> Response:
        return json_response(Liveness(status="ok"))

    @bp.get("/ready")
    async def ready() -> Response:
        model_id = core.registry.default
        state = core.serving_state(model_id)
        ok = state == "ready"
        body = Readiness(status="ready" if ok else "not_ready", model=model_id, model_status=state)
        return json_response(body, status=200 if ok else 503)

    return bp
