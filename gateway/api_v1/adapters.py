"""DELETE /api/v1/adapters/{name}: unregister a trained LoRA adapter everywhere.

Deletes its record in the adapters bucket (every worker following it unloads the adapter and removes its
cache folder) and its files in the object store. Adapters configured in the models registry are not
records: they are removed from the models file instead.

Refused (409 RESOURCE_IN_USE) while a queued, running or paused job trains into that name: cancel the job first.
Also refused while live workers serve the adapter, unless `?force=true`: a worker unloads a deleted adapter at
once, and a request generating with it at that moment fails, on the transformers engine together with the
requests batched beside it (peft refuses a batch naming an adapter it no longer has).
"""

from __future__ import annotations

import msgspec
from quart import Blueprint, Response, request

from gateway.api_v1.protocol import AdapterDeleted, DeletedAdapter
from gateway.core import GatewayCore
from gateway.http_json import json_response
from schemas.errors import CyError, ErrorCode, in_use
from services import adapter_store
from services.training import holders


def _serving(core: GatewayCore, name: str) -> list[str]:
    """Live workers that announce trained adapter `name` (a registry adapter of the same name is not this route's)."""
    found: set[str] = set()
    for worker in core.workers.workers():
        if not core.workers.is_healthy(worker):
            continue
        for model in worker.models:
            spec = core.registry.models.get(model.model_id)
            if name in model.adapters and not (spec is not None and name in spec.adapters):
                found.add(f"worker {worker.worker_id} serves it with {model.model_id}")
    return sorted(found)


async def _refuse_if_held(core: GatewayCore, name: str, *, force: bool) -> None:
    """Raises CyError(RESOURCE_IN_USE) while a job trains into `name`, or (without `force`) workers serve it."""
    await holders.refuse_if_trained_into(core.training.records, name)
    serving = [] if force else _serving(core, name)
    if serving:
        raise in_use(
            "name",
            f"Adapter '{name}' is loaded by {len(serving)} live worker(s); requests using it at that moment would "
            "fail: add ?force=true to delete it anyway",
            serving,
        )


def make_blueprint(core: GatewayCore) -> Blueprint:
    bp = Blueprint("adapters", __name__)

    @bp.delete("/adapters/<name>")
    async def delete_adapter(name: str) -> Response:
        force = request.args.get("force", "false").lower() in ("1", "true", "yes")
        await _refuse_if_held(core, name, force=force)
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
