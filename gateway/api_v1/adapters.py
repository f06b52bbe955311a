"""DELETE /api/v1/adapters/{name}: unregister a trained LoRA adapter everywhere.

Deletes its record in the adapters bucket (every worker following it unloads the adapter and removes its
cache folder) and its files in the object store. Adapters configured in the models registry are not
records: they are removed from the models file instead.
"""

from __future__ import annotations

import msgspec
from quart import Blueprint, Response

from gateway.api_v1.protocol import AdapterDeleted, DeletedAdapter
from gateway.core import GatewayCore
from gateway.http_json import json_response
from schemas.errors import CyError, ErrorCode
from services import adapter_store


def make_blueprint(core: GatewayCore) -> Blueprint:
    bp = Blueprint("adapters", __name__)

    @bp.delete("/adapters/<name>")
    async def delete_adapter(name: str) -> Response:
        deleted: list[DeletedAdapter] = []
        for model_id in core.registry.models:
            record = await adapter_store.delete_adapter(core.js, model_id, name)
            if record is not None:
                deleted.append(DeletedAdapter(model_id=model_id, job_id=record.job_id, object=record.object))
        if not deleted:
            static = [m for m, spec in core.registry.models.items() if name in spec.adapters]
            where = f" (it is configured in the models registry for {', '.join(static)})" if static else ""
            raise CyError(ErrorCode.MODEL_NOT_FOUND, f"no trained adapter named {name!r}{where}")
        return json_response(msgspec.to_builtins(AdapterDeleted(name=name, deleted=deleted)))

    return bp
