"""create_lite_app(): the OpenAI-compatible API under /v1 (port 8000), plus /health, /ready, /openapi.json and /docs."""

from __future__ import annotations

import msgspec
import structlog
from quart import Quart, Response, request
from werkzeug.exceptions import HTTPException

from gateway.core import GatewayCore
from gateway.http_json import json_response
from gateway.openai import completions, files, fine_tuning, health, models, openapi, responses
from gateway.openai.auth import require_bearer
from gateway.openai.errors import error_response, openai_error
from gateway.openapi import docs_blueprint
from gateway.server import harden, refuse_empty_segments, sent_path
from gateway.uploads import upload_request_class
from schemas.errors import CyError, ErrorCode

log = structlog.get_logger()

_HTTP_CODES = {404: "unknown_url", 405: "method_not_allowed", 413: "request_too_large"}


def create_lite_app(core: GatewayCore) -> Quart:
    """The Lite API. /v1 needs `Authorization: Bearer <GATEWAY_API_TOKEN>` when that token is set."""
    app = Quart("cy-llm-lite")
    app.config["MAX_CONTENT_LENGTH"] = core.settings.max_body_bytes
    app.request_class = upload_request_class(frozenset({"/v1/files"}), core.settings.max_dataset_bytes)
    harden(app, lambda error: (msgspec.json.encode(openai_error(error)[1]), {"x-should-retry": "false"}))
    core.metrics.install(app, "openai")
    app.register_blueprint(completions.make_blueprint(core), url_prefix="/v1")
    app.register_blueprint(responses.make_blueprint(core), url_prefix="/v1")
    app.register_blueprint(models.make_blueprint(core), url_prefix="/v1")
    app.register_blueprint(files.make_blueprint(core), url_prefix="/v1")
    app.register_blueprint(fine_tuning.make_blueprint(core), url_prefix="/v1")
    app.register_blueprint(health.make_blueprint(core))
    app.register_blueprint(
        docs_blueprint("openapi", openapi.build_document(), json_paths=openapi.JSON_PATHS, docs_path=openapi.DOCS_PATH)
    )

    @app.before_request
    async def authenticate() -> None:
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(service="gateway-lite", path=request.path)
        # The OpenAPI document is public (gateway/openapi.py says why), /v1/openapi.json included.
        if (request.path == "/v1" or request.path.startswith("/v1/")) and request.path not in openapi.JSON_PATHS:
            require_bearer(core.settings.gateway_api_token)
        refuse_empty_segments()

    @app.errorhandler(CyError)
    async def on_cy_error(exc: CyError) -> Response:
        return error_response(exc)

    @app.errorhandler(HTTPException)
    async def on_http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        if status == 404:
            message = f"Invalid URL ({request.method} {sent_path()})"
        elif status == 413:
            message = f"The request body exceeds {request.max_content_length} bytes."
        else:
            message = exc.description or exc.name
        kind = "invalid_request_error" if status < 500 else "server_error"
        body = {"error": {"message": message, "type": kind, "param": None, "code": _HTTP_CODES.get(status)}}
        headers = {"x-should-retry": "false"}
        if status == 405 and exc.valid_methods:  # type: ignore[attr-defined]
            headers["Allow"] = ", ".join(exc.valid_methods)  # type: ignore[attr-defined]
        return json_response(body, status=status, headers=headers)

    @app.errorhandler(Exception)
    async def on_unexpected(exc: Exception) -> Response:
        log.exception("unhandled_error")
        return error_response(CyError(ErrorCode.INTERNAL_ERROR, "internal error"))

    return app
