"""The OpenAPI 3.1 document of the OpenAI-compatible app (port 8000): the paths table, written here; the schemas,
generated from protocol.py. Served at GET /openapi.json and /v1/openapi.json, rendered at GET /docs (no token)."""

from __future__ import annotations

from typing import Any

from gateway.openai import protocol as p
from gateway.openapi import document, errors, json_body, json_content, path_param, sse_content

JSON_PATHS = ("/openapi.json", "/v1/openapi.json")
DOCS_PATH = "/docs"

# Any route can answer these: the request head refused by the HTTP parser (400, 431) and the catch-all (500).
_ANY = {
    400: "Malformed request line or headers (`code` `malformed_http_request`).",
    431: "Request line and headers over 16 KiB.",
    500: "Anything unexpected (`type` `server_error`; logged with the trace id).",
}
_AUTH = {
    **_ANY,
    401: "`Authorization: Bearer` missing or wrong while GATEWAY_API_TOKEN is set (`code` `invalid_api_key`).",
}
_GENERATE_ERRORS = {
    400: "Malformed JSON, an unknown or unsupported parameter, a wrong type or value, an empty body, or a prompt "
    "longer than the model's context (`param` names the parameter, `code` says why).",
    404: "`model` is neither a model, `default`, nor an adapter (`code` `model_not_found`).",
    413: "Body over `CY_LLM_MAX_BODY_BYTES` (`code` `request_too_large`).",
    429: "Per-client rate limit (`type` `rate_limit_error`, with `Retry-After`).",
    503: "Model still loading, no live worker, queue full, or the gateway is shutting down (`type` `server_error`).",
}


def _op(summary: str, tag: str, op_id: str, responses: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"summary": summary, "tags": [tag], "operationId": op_id, "responses": responses, **extra}


def _generate(op_id: str, summary: str, body: type, ok: type, chunk: type) -> dict[str, Any]:
    answer = json_content(ok, "The completion (`stream` false or absent).")
    stream = sse_content(chunk, p.OpenAIError, "With `stream: true`: server-sent events.")
    return {
        "post": _op(
            summary,
            "completions",
            op_id,
            {
                "200": {"description": answer["description"], "content": {**answer["content"], **stream["content"]}},
                **errors(p.OpenAIError, _GENERATE_ERRORS, common=_AUTH),
            },
            requestBody=json_body(body),
            description=stream["description"],
        )
    }


def _meta(summary: str, op_id: str, ok: dict[str, Any]) -> dict[str, Any]:
    return {"get": _op(summary, "meta", op_id, {"200": ok, **errors(p.OpenAIError, {}, common=_ANY)}, security=[])}


def _paths() -> dict[str, Any]:
    spec_ok = {"description": "The OpenAPI 3.1 document.", "content": {"application/json": {}}}
    paths: dict[str, Any] = {
        "/v1/chat/completions": _generate(
            "createChatCompletion", "Chat completion", p.ChatCompletionRequest, p.ChatCompletion, p.ChatCompletionChunk
        ),
        "/v1/completions": _generate(
            "createCompletion", "Text completion", p.CompletionRequest, p.Completion, p.Completion
        ),
        "/v1/models": {
            "get": _op(
                "List models and adapters",
                "models",
                "listModels",
                {
                    "200": json_content(p.ModelCardList, "Every model and its LoRA adapters."),
                    **errors(p.OpenAIError, {}, common=_AUTH),
                },
            )
        },
        "/v1/models/{model}": {
            "get": _op(
                "Retrieve a model or adapter",
                "models",
                "retrieveModel",
                {
                    "200": json_content(p.ModelCard, "The model (an adapter has `parent`)."),
                    **errors(
                        p.OpenAIError, {404: "No such model or adapter (`code` `model_not_found`)."}, common=_AUTH
                    ),
                },
                parameters=[path_param("model", 'A model id, `"default"`, or an adapter name (may contain `/`).')],
            )
        },
        "/health": {
            "get": _op(
                "Liveness",
                "health",
                "health",
                {"200": json_content(p.Liveness, "The process answers."), **errors(p.OpenAIError, {}, common=_ANY)},
                security=[],
            )
        },
        "/ready": {
            "get": _op(
                "Readiness: a worker serves the default model",
                "health",
                "ready",
                {
                    "200": json_content(p.Readiness, "Ready."),
                    "503": json_content(p.Readiness, "Not ready (the same body), or draining."),
                    **errors(p.OpenAIError, {}, common=_ANY),
                },
                security=[],
            )
        },
        DOCS_PATH: _meta(
            "A page that renders this document",
            "docs",
            {"description": "HTML (no external assets).", "content": {"text/html": {}}},
        ),
    }
    for i, path in enumerate(JSON_PATHS):
        paths[path] = _meta("This document", f"openapi{i or ''}", spec_ok)
    return paths


def build_document() -> dict[str, Any]:
    return document(
        title="CY-LLM OpenAI-compatible API",
        description="OpenAI's chat completions, completions and models under /v1, plus /health and /ready. Every "
        "error body is `OpenAIError`. /v1 needs `Authorization: Bearer` only when GATEWAY_API_TOKEN is set.",
        paths=_paths(),
        types=[
            p.ChatCompletionRequest,
            p.CompletionRequest,
            p.OpenAIError,
            p.ChatCompletion,
            p.ChatCompletionChunk,
            p.Completion,
            p.ModelCardList,
            p.ModelCard,
            p.Liveness,
            p.Readiness,
        ],
        security_schemes={
            "Bearer": {
                "type": "http",
                "scheme": "bearer",
                "description": "Authorization: Bearer <GATEWAY_API_TOKEN>, when that token is set",
            }
        },
        # `{}`: no credentials is also accepted (when GATEWAY_API_TOKEN is not set).
        security=[{"Bearer": []}, {}],
    )
