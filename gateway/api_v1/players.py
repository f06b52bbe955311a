"""POST /api/v1/inference/cancel: end every in-flight request of a player, or of a whole tenant, at once."""

from __future__ import annotations

import msgspec
import structlog
from quart import Blueprint, Response

from gateway.api_v1.errors import decode_body
from gateway.api_v1.protocol import PlayerCancelBody, PlayersCancelled
from gateway.core import GatewayCore
from gateway.http_json import json_body, json_response
from schemas.errors import CyError, ErrorCode, ErrorDetail

log = structlog.get_logger()


def make_blueprint(core: GatewayCore) -> Blueprint:
    bp = Blueprint("players", __name__)

    @bp.post("/inference/cancel")
    async def cancel() -> Response:
        body = decode_body(await json_body(), PlayerCancelBody)
        player_id = body.player_id or body.player_id_snake
        if not body.tenant and not player_id:
            raise CyError(
                ErrorCode.INVALID_REQUEST,
                "Invalid request: give a tenant, a playerId, or both",
                details=[ErrorDetail(type="missing_field", field="tenant", description="tenant or playerId")],
            )
        structlog.contextvars.bind_contextvars(tenant=body.tenant or None, player_id=player_id or None)
        cancelled = await core.cancel_player(body.tenant, player_id)
        log.info("request", route="inference/cancel", status=200, cancelled=cancelled)
        answer = PlayersCancelled(tenant=body.tenant, player_id=player_id or None, cancelled=cancelled)
        return json_response(msgspec.to_builtins(answer))

    return bp
