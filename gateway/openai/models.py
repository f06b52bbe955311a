"""GET /v1/models and /v1/models/{model}: `default`, the registry's models and their LoRA adapters (with
`parent`)."""

from __future__ import annotations

from typing import Any

from quart import Blueprint, Response

from gateway.core import GatewayCore
from gateway.http_json import json_response
from gateway.openai.translate import resolve_target


def model_card(core: GatewayCore, name: str, model_id: str, adapter: str = "") -> dict[str, Any]:
    """OpenAI's model object plus vLLM's `root`/`parent`/`max_model_len` (an adapter's parent is its base)."""
    spec = core.registry.models[model_id]
    return {
        "id": name,
        "object": "model",
        "created": int(core.started_at.timestamp()),
        "owned_by": "cy-llm",
        "root": model_id,
        "parent": model_id if adapter else None,
        "max_model_len": spec.max_model_len,
        "status": core.workers.model_state(model_id),
    }


def make_blueprint(core: GatewayCore) -> Blueprint:
    bp = Blueprint("openai_models", __name__)

    @bp.get("/models")
    async def list_models() -> Response:
        # The alias every request may name (`model="default"`) is listed too, with its model as `root`.
        data = [model_card(core, "default", core.registry.default)]
        for model_id in core.registry.models:
            data.append(model_card(core, model_id, model_id))
            data.extend(model_card(core, name, model_id, name) for name in core.adapters(model_id))
        return json_response({"object": "list", "data": data})

    @bp.get("/models/<path:name>")
    async def retrieve_model(name: str) -> Response:
        model_id, adapter = resolve_target(core, name)  # 404 model_not_found
        return json_response(model_card(core, name, model_id, adapter))

    return bp
