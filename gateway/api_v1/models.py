"""GET /api/v1/models and /api/v1/models/{modelId}: the registry joined with the live workers."""

from __future__ import annotations

from typing import Any

from quart import Blueprint, Response

from gateway.core import GatewayCore
from gateway.generation import resolve_model
from gateway.http_json import json_response
from services.models.registry import ModelSpec


def model_summary(core: GatewayCore, model_id: str, spec: ModelSpec) -> dict[str, Any]:
    engines = core.workers.engines(model_id)
    adapters = core.adapters(model_id)
    out: dict[str, Any] = {
        "id": model_id,
        "name": spec.name,
        "engine": engines[0] if engines else spec.engine,
        "status": core.workers.model_state(model_id),
        "capabilities": spec.capabilities,
        "maxModelLen": spec.max_model_len,
    }
    if adapters:
        out["loraAdapters"] = adapters
    return out


def make_blueprint(core: GatewayCore) -> Blueprint:
    bp = Blueprint("models", __name__)

    @bp.get("/models")
    async def list_models() -> Response:
        return json_response({"models": [model_summary(core, mid, spec) for mid, spec in core.registry.models.items()]})

    @bp.get("/models/<path:model_id>")
    async def get_model(model_id: str) -> Response:
        real = resolve_model(core, model_id)
        spec = core.registry.models[real]
        out = model_summary(core, real, spec)
        out["modelPath"] = spec.model_path
        out["config"] = {
            "maxModelLen": spec.max_model_len,
            "gpuMemoryUtilization": spec.gpu_memory_utilization,
            "tensorParallelSize": spec.tensor_parallel_size,
            "dtype": spec.dtype,
        }
        return json_response(out)

    return bp
