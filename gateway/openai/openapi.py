"""The OpenAPI 3.1 document of the OpenAI-compatible app (port 8000): the paths table, written here; the schemas,
generated from protocol.py. Served at GET /openapi.json and /v1/openapi.json, rendered at GET /docs (no token)."""

from __future__ import annotations

import typing
from typing import Any

from gateway.openai import protocol as p
from gateway.openai import responses_protocol as rp
from gateway.openai.files import PURPOSE
from gateway.openai.fine_tuning import CreateJob
from gateway.openapi import (
    binary,
    document,
    errors,
    json_body,
    json_content,
    multipart_body,
    path_param,
    query_param,
    ref,
    sse_content,
)

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
_NOT_JSON = (
    "A Content-Type other than `application/json` (`code` `unsupported_media_type`, `param` `Content-Type`); "
    "a request without one is read as JSON."
)
_GENERATE_ERRORS = {
    400: "Malformed JSON, an unknown or unsupported parameter, a wrong type or value, an empty body, or a prompt "
    "longer than the model's context (`param` names the parameter, `code` says why).",
    404: "`model` is neither a model, `default`, nor an adapter (`code` `model_not_found`).",
    413: "Body over `CY_LLM_MAX_BODY_BYTES` (`code` `request_too_large`).",
    415: _NOT_JSON,
    429: "Per-client rate limit (`type` `rate_limit_error`, with `Retry-After`).",
    503: "Model still loading, no live worker, queue full, or the gateway is shutting down (`type` `server_error`).",
}

_FILE = path_param("file_id", "The file's id (`ds-...`; the same id as /api/v1/datasets).")
_NO_FILE = {404: "No file with that id (`code` `not_found`), or a `file_id` that names no route (`/` in it)."}
_JOB = path_param("fine_tuning_job_id", "The job's id (the same id as /api/v1/training).")
_NO_JOB = {404: "No job with that id (`code` `not_found`), or an id that names no route (`/` in it)."}
_FINISHED = {400: "The job already finished (`code` `job_finished`)."}


def _limit(high: int, default: int) -> Any:
    return query_param("limit", f"Page size (default {default}).", {"type": "integer", "minimum": 1, "maximum": high})


def _after(what: str) -> Any:
    return query_param(
        "after", f"The last {what} of the previous page (an unknown id: an empty page).", {"type": "string"}
    )


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


_RESPONSE = path_param("response_id", "The response's id (`resp_...`).")
_NO_RESPONSE = {
    404: "No stored response with that id (never stored, `store: false`, deleted or expired; `code` `not_found`), "
    "or an id that names no route (`/` in it)."
}
_STREAM_EVENTS = typing.get_args(rp.ResponseStreamEvent)


def _response_events() -> dict[str, Any]:
    """The SSE body of a streamed response: OpenAI's named events (`event: <type>`, `data: <JSON>`), numbered by
    `sequence_number`; no `[DONE]`. An error after the stream started is an `error` event then `response.failed`."""
    data = {"type": "string", "contentMediaType": "application/json"}
    schema = {
        "type": "object",
        "required": ["event", "data"],
        "properties": {
            "event": {"type": "string", "description": "The event's `type`."},
            "data": {**data, "contentSchema": {"anyOf": [ref(t) for t in _STREAM_EVENTS]}},
        },
    }
    return {"text/event-stream": {"schema": schema}}


def _responses() -> dict[str, Any]:
    answer = json_content(rp.ResponseObject, "The response (`stream` false or absent).")
    create_errors = {
        **_GENERATE_ERRORS,
        400: _GENERATE_ERRORS[400] + " Also: an input item other than a message, a content part other than text, "
        "or a conversation too long to store (`code` `conversation_too_large`).",
        404: _GENERATE_ERRORS[404] + " Or `previous_response_id` names no stored response (`param` "
        "`previous_response_id`, `code` `previous_response_not_found`).",
        503: _GENERATE_ERRORS[503] + " Or the response store (NATS KV) is unreachable.",
    }
    return {
        "/v1/responses": {
            "post": _op(
                "Create a response (a conversation turn, continued with `previous_response_id`)",
                "responses",
                "createResponse",
                {
                    "200": {
                        "description": answer["description"] + " With `stream: true`: server-sent events.",
                        "content": {**answer["content"], **_response_events()},
                    },
                    **errors(p.OpenAIError, create_errors, common=_AUTH),
                },
                requestBody=json_body(rp.ResponseCreateRequest),
                description=_response_events.__doc__,
            )
        },
        "/v1/responses/{response_id}": {
            "get": _op(
                "Retrieve a stored response",
                "responses",
                "retrieveResponse",
                {
                    "200": json_content(rp.ResponseObject, "The response."),
                    **errors(
                        p.OpenAIError,
                        {**_NO_RESPONSE, 400: "`stream=true` (only background responses stream again)."},
                        common=_AUTH,
                    ),
                },
                parameters=[
                    _RESPONSE,
                    query_param("stream", "Refused when true.", {"type": "boolean"}),
                    query_param("include", "Accepted; nothing more is stored.", {"type": "string"}),
                ],
            ),
            "delete": _op(
                "Delete a stored response",
                "responses",
                "deleteResponse",
                {
                    "200": json_content(rp.ResponseDeleted, "Deleted (a later `previous_response_id` to it is a 404)."),
                    **errors(p.OpenAIError, _NO_RESPONSE, common=_AUTH),
                },
                parameters=[_RESPONSE],
            ),
        },
        "/v1/responses/{response_id}/input_items": {
            "get": _op(
                "List a stored response's input items (the conversation it answered)",
                "responses",
                "listInputItems",
                {
                    "200": json_content(rp.InputItemList, "One page of items."),
                    **errors(
                        p.OpenAIError,
                        {**_NO_RESPONSE, 400: "Bad `limit` or `order` (`param` names it)."},
                        common=_AUTH,
                    ),
                },
                parameters=[
                    _RESPONSE,
                    query_param("order", "`desc` (default): newest first; `asc`: oldest first.", {"type": "string"}),
                    query_param(
                        "after",
                        "The last item id of the previous page (an unknown id: an empty page).",
                        {"type": "string"},
                    ),
                    _limit(100, 20),
                    query_param("include", "Accepted; nothing more is stored.", {"type": "string"}),
                ],
            )
        },
    }


def _job_verb(verb: str, summary: str, extra: dict[int, str]) -> dict[str, Any]:
    return {
        "post": _op(
            summary,
            "fine-tuning",
            f"{verb}FineTuningJob",
            {
                "200": json_content(p.FineTuningJob, "The job after the change."),
                **errors(p.OpenAIError, {**_NO_JOB, **extra}, common=_AUTH),
            },
            parameters=[_JOB],
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
        **_responses(),
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
        "/v1/files": {
            "post": _op(
                "Upload a fine-tuning file",
                "files",
                "createFile",
                {
                    "200": json_content(p.FileObject, "Validated (every row) and stored."),
                    **errors(
                        p.OpenAIError,
                        {
                            400: "`purpose` missing or not `fine-tune`, no `file` part, another Content-Type, or a "
                            "row that is not a chat or Alpaca row, not valid JSON, or no rows at all (`param` "
                            "names the row and field: `file[row 3].messages`).",
                            413: "Body over `CY_LLM_MAX_DATASET_BYTES` (`code` `request_too_large`).",
                        },
                        common=_AUTH,
                    ),
                },
                requestBody=multipart_body(
                    {
                        "file": binary(
                            "JSONL (one row per line) or JSON (an array of rows): chat `messages` rows or Alpaca "
                            "rows. The format comes from the file name's extension, else from the content."
                        ),
                        "purpose": {"type": "string", "enum": [PURPOSE]},
                    },
                    ["file", "purpose"],
                    "OpenAI's upload form.",
                ),
            ),
            "get": _op(
                "List files, newest first",
                "files",
                "listFiles",
                {
                    "200": json_content(p.FileList, "One page of files."),
                    **errors(p.OpenAIError, {400: "Bad `limit` (`param` `limit`)."}, common=_AUTH),
                },
                parameters=[
                    query_param(
                        "purpose", "Only files of this purpose (any other than `fine-tune`: none).", {"type": "string"}
                    ),
                    query_param("order", "`asc`: oldest first; anything else newest first.", {"type": "string"}),
                    _after("file id"),
                    _limit(10_000, 10_000),
                ],
            ),
        },
        "/v1/files/{file_id}": {
            "get": _op(
                "Retrieve a file",
                "files",
                "retrieveFile",
                {
                    "200": json_content(p.FileObject, "The file."),
                    **errors(p.OpenAIError, _NO_FILE, common=_AUTH),
                },
                parameters=[_FILE],
            ),
            "delete": _op(
                "Delete a file",
                "files",
                "deleteFile",
                {
                    "200": json_content(p.FileDeleted, "Deleted."),
                    **errors(
                        p.OpenAIError,
                        {
                            **_NO_FILE,
                            409: "A queued, running or paused fine-tuning job trains from it (`code` "
                            "`resource_in_use`; the message names the jobs).",
                        },
                        common=_AUTH,
                    ),
                },
                parameters=[_FILE],
            ),
        },
        "/v1/files/{file_id}/content": {
            "get": _op(
                "Retrieve a file's content",
                "files",
                "downloadFile",
                {
                    "200": {
                        "description": "The bytes as uploaded (checked against their digest): "
                        "`application/jsonl` or `application/json` by the file's format.",
                        "content": {
                            "application/jsonl": {"schema": {"type": "string"}},
                            "application/json": {},
                        },
                    },
                    **errors(p.OpenAIError, _NO_FILE, common=_AUTH),
                },
                parameters=[_FILE],
            )
        },
        "/v1/fine_tuning/jobs": {
            "post": _op(
                "Create a fine-tuning job (a LoRA adapter)",
                "fine-tuning",
                "createFineTuningJob",
                {
                    "200": json_content(p.FineTuningJob, "The job, queued."),
                    **errors(
                        p.OpenAIError,
                        {
                            400: "Malformed JSON, an unknown parameter, a wrong type or value, an empty body, an "
                            "unknown `training_file` (`code` `invalid_training_file`), or an adapter name taken "
                            "(`param` names the parameter).",
                            404: "`model` not in the registry (`code` `model_not_found`).",
                            413: "Body over `CY_LLM_MAX_BODY_BYTES` (`code` `request_too_large`).",
                            415: _NOT_JSON,
                            503: "The training queue is full (`type` `server_error`).",
                        },
                        common=_AUTH,
                    ),
                },
                requestBody=json_body(CreateJob),
            ),
            "get": _op(
                "List fine-tuning jobs, newest first",
                "fine-tuning",
                "listFineTuningJobs",
                {
                    "200": json_content(p.FineTuningJobList, "One page of jobs."),
                    **errors(p.OpenAIError, {400: "Bad `limit` (`param` `limit`)."}, common=_AUTH),
                },
                parameters=[_after("job id"), _limit(1000, 20)],
            ),
        },
        "/v1/fine_tuning/jobs/{fine_tuning_job_id}": {
            "get": _op(
                "Retrieve a fine-tuning job",
                "fine-tuning",
                "retrieveFineTuningJob",
                {
                    "200": json_content(p.FineTuningJob, "The job."),
                    **errors(p.OpenAIError, _NO_JOB, common=_AUTH),
                },
                parameters=[_JOB],
            )
        },
        "/v1/fine_tuning/jobs/{fine_tuning_job_id}/cancel": _job_verb("cancel", "Cancel a fine-tuning job", _FINISHED),
        "/v1/fine_tuning/jobs/{fine_tuning_job_id}/pause": _job_verb(
            "pause", "Pause a fine-tuning job (at its next step; a queued job at once)", _FINISHED
        ),
        "/v1/fine_tuning/jobs/{fine_tuning_job_id}/resume": _job_verb(
            "resume",
            "Resume a paused fine-tuning job",
            {400: "The job is not paused (`code` `job_finished` when it finished), or is still running."},
        ),
        "/v1/fine_tuning/jobs/{fine_tuning_job_id}/events": {
            "get": _op(
                "A fine-tuning job's events, newest first",
                "fine-tuning",
                "listFineTuningEvents",
                {
                    "200": json_content(p.FineTuningEventList, "One page of the stored events."),
                    **errors(p.OpenAIError, {**_NO_JOB, 400: "Bad `limit` (`param` `limit`)."}, common=_AUTH),
                },
                parameters=[_JOB, _after("event id"), _limit(10_000, 20)],
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
        description="OpenAI's chat completions, completions, responses, models, files and fine-tuning jobs under "
        "/v1, plus /health and /ready. Every error body is `OpenAIError`. /v1 needs `Authorization: Bearer` only when "
        "GATEWAY_API_TOKEN is set.",
        paths=_paths(),
        types=[
            p.ChatCompletionRequest,
            p.CompletionRequest,
            p.OpenAIError,
            p.ChatCompletion,
            p.ChatCompletionChunk,
            p.Completion,
            rp.ResponseCreateRequest,
            rp.ResponseObject,
            rp.ResponseDeleted,
            rp.InputItemList,
            *_STREAM_EVENTS,
            p.ModelCardList,
            p.ModelCard,
            p.Liveness,
            p.Readiness,
            CreateJob,
            p.FileObject,
            p.FileList,
            p.FileDeleted,
            p.FineTuningJob,
            p.FineTuningJobList,
            p.FineTuningEventList,
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
