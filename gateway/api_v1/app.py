"""create_api_app(): the spec's REST API under /api/v1 (port 8080), its OpenAPI document and docs page, /metrics
and the web console."""

from __future__ import annotations

import msgspec
import structlog
from quart import Quart, Response, request
from werkzeug.exceptions import HTTPException

from gateway import console
from gateway.api_v1 import adapters, datasets, health, inference, models, openapi, players, training
from gateway.api_v1.auth import require_api_key
from gateway.api_v1.errors import envelope, error_response
from gateway.core import GatewayCore
from gateway.openapi import docs_blueprint
from gateway.server import harden, refuse_empty_segments, sent_path
from gateway.uploads import upload_request_class
from schemas.errors import CyError, ErrorCode

log = structlog.get_logger()

_HTTP_CODES = {
    400: ErrorCode.INVALID_REQUEST,
    401: ErrorCode.UNAUTHORIZED,
    403: ErrorCode.FORBIDDEN,
    404: ErrorCode.MODEL_NOT_FOUND,
    413: ErrorCode.INVALID_REQUEST,
    429: ErrorCode.RATE_LIMITED,
}


def create_api_app(core: GatewayCore) -> Quart:
    """The spec's REST API under /api/v1, every route behind X-API-Key but its OpenAPI document and docs page."""
    app = Quart("cy-llm-api")
    app.config["MAX_CONTENT_LENGTH"] = core.settings.max_body_bytes
    app.request_class = upload_request_class(frozenset({"/api/v1/datasets"}), core.settings.max_dataset_bytes)
    harden(app, lambda error: (msgspec.json.encode(envelope(error)), {}))
    for module in (inference, players, models, health, training, datasets, adapters):
        app.register_blueprint(module.make_blueprint(core), url_prefix="/api/v1")
    public = (openapi.JSON_PATH, openapi.DOCS_PATH)
    # Counts every request; GET /metrics is answered before the app (no API key: docs/operations.md).
    core.metrics.install(app, "api", serve=True)
    app.register_blueprint(
        docs_blueprint("openapi", openapi.build_document(), json_paths=public[:1], docs_path=openapi.DOCS_PATH)
    )

    @app.before_request
    async def authenticate() -> None:
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(service="gateway", path=request.path)
        if request.path not in public:
            require_api_key(core.settings.api_key)
        refuse_empty_segments()

    @app.errorhandler(CyError)
    async def on_cy_error(exc: CyError) -> Response:
        return error_response(exc)

    @app.errorhandler(HTTPException)
    async def on_http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        if status == 404:
            error = CyError(ErrorCode.INVALID_REQUEST, f"no route {request.method} {sent_path()}")
            response = error_response(error)
            response.status_code = 404
            return response
        code = _HTTP_CODES.get(status, ErrorCode.INVALID_REQUEST if status < 500 else ErrorCode.INTERNAL_ERROR)
        message = (
            f"request body exceeds {request.max_content_length} bytes"
            if status == 413
            else (exc.description or exc.name)
        )
        response = error_response(CyError(code, message))
        response.status_code = status
        return response

    @app.errorhandler(Exception)
    async def on_unexpected(exc: Exception) -> Response:
        log.exception("unhandled_error")
        return error_response(CyError(ErrorCode.INTERNAL_ERROR, "internal error"))

    console.mount(app)  # the web console's static files at /console/ (no key to load; its API calls send one)
    return app
