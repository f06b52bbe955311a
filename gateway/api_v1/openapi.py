"""The OpenAPI 3.1 document of /api/v1: the paths table, written here; the schemas, generated from protocol.py.
Served at GET /api/v1/openapi.json, rendered at GET /api/v1/docs (no X-API-Key)."""

from __future__ import annotations

from typing import Any

from gateway.api_v1 import protocol as p
from gateway.openapi import (
    binary,
    document,
    errors,
    json_body,
    json_content,
    path_param,
    query_param,
    ref,
    sse_content,
)
from schemas.training import JOB_STATUSES

PREFIX = "/api/v1"
JSON_PATH = f"{PREFIX}/openapi.json"
DOCS_PATH = f"{PREFIX}/docs"

# Any route can answer these: the request head refused by the HTTP parser (400, 431) and the catch-all (500).
_ANY = {
    400: "Malformed request line or headers (`details[0].type` `malformed_http_request`).",
    431: "Request line and headers over 16 KiB.",
    500: "Anything unexpected (`INTERNAL_ERROR`; logged with the trace id).",
}
_AUTH = {**_ANY, 401: "`X-API-Key` missing or wrong (`UNAUTHORIZED`)."}
_BODY = {
    400: "Malformed JSON, wrong types, out-of-range values or an empty body (`INVALID_REQUEST`; "
    "`details` names the field).",
    413: "Body over `CY_LLM_MAX_BODY_BYTES` (`INVALID_REQUEST`).",
    415: "A Content-Type other than `application/json` (`INVALID_REQUEST`, `details[0].type` "
    "`unsupported_media_type`, `field` `Content-Type`); a request without one is read as JSON.",
}
_HEALTH_503 = (
    "STARTING (no model can be served yet: `models` says which are loading, failed or have no worker) or DOWN "
    "(NATS unreachable): the same body."
)
_JOB = path_param("jobId", "The training job's id (from /training/start or /training/list).")
_NO_JOB = {404: "No job with that id (`TRAINING_JOB_NOT_FOUND`), or a `jobId` that names no route (`/` in it)."}

_DATASET = path_param("datasetId", "The dataset's id (`ds-...`, from POST /datasets).")
_NO_DATASET = {404: "No dataset with that id (`DATASET_NOT_FOUND`), or a `datasetId` that names no route (`/` in it)."}
_DATASET_IN_USE = {
    409: "A queued, running or paused training job trains from it (`RESOURCE_IN_USE`; `details` name the jobs)."
}
_ROW = {"anyOf": [ref(p.AlpacaRow), ref(p.ChatRow)]}

_INFERENCE_ERRORS = {
    **_BODY,
    400: _BODY[400] + " Also a prompt longer than the model's context.",
    404: "`modelId` not in the registry, or unknown `adapter` (`MODEL_NOT_FOUND`).",
    429: "Per-key rate limit, or the tenant's or player's concurrent requests at `CY_LLM_TENANT_MAX_CONCURRENT` / "
    "`CY_LLM_PLAYER_MAX_CONCURRENT` (`RATE_LIMITED`, with `Retry-After`).",
    503: "Model still loading (`MODEL_NOT_READY`); no live worker, queue full, nobody picked the request up, "
    "or the gateway is shutting down (`INSUFFICIENT_RESOURCES`, with `Retry-After`).",
}


def _op(summary: str, tag: str, op_id: str, responses: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"summary": summary, "tags": [tag], "operationId": op_id, "responses": responses, **extra}


def _inference(op_id: str, summary: str, ok: dict[str, Any]) -> dict[str, Any]:
    return {
        "post": _op(
            summary,
            "inference",
            op_id,
            {"200": ok, **errors(p.ErrorEnvelope, _INFERENCE_ERRORS, common=_AUTH)},
            requestBody=json_body(p.InferenceBody),
        )
    }


def _job_verb(verb: str, summary: str, extra: dict[int, str], ok: dict[str, Any]) -> dict[str, Any]:
    return {
        "post": _op(
            summary,
            "training",
            f"training{verb.capitalize()}",
            {**ok, **errors(p.ErrorEnvelope, {**_NO_JOB, **extra}, common=_AUTH)},
            parameters=[_JOB],
        )
    }


def _paths() -> dict[str, Any]:
    stream = sse_content(p.InferenceChunk, p.ErrorEnvelope, "Server-sent events, one per generated chunk.")
    job_change = json_content(p.JobChange, "The job after the change.")
    return {
        f"{PREFIX}/inference": _inference(
            "inference", "Generate a completion", json_content(p.InferenceResponse, "The completion.")
        ),
        f"{PREFIX}/inference/stream": _inference("inferenceStream", "Generate a completion as SSE", stream),
        f"{PREFIX}/inference/streamWithMetadata": _inference(
            "inferenceStreamWithMetadata", "Generate a completion as SSE (with game-server metadata)", stream
        ),
        f"{PREFIX}/inference/cancel": {
            "post": _op(
                "Cancel every in-flight request of a player or a tenant",
                "inference",
                "inferenceCancel",
                {
                    "200": json_content(
                        p.PlayersCancelled,
                        "Sent to every worker and gateway: each stream ends as cancelled (`finish_reason` "
                        "`cancelled`); `cancelled` counts those this gateway had open.",
                    ),
                    **errors(
                        p.ErrorEnvelope,
                        {
                            **_BODY,
                            400: _BODY[400] + " Also neither `tenant` nor `playerId` given.",
                            503: "NATS is unreachable (`INSUFFICIENT_RESOURCES`, with `Retry-After`).",
                        },
                        common=_AUTH,
                    ),
                },
                requestBody=json_body(p.PlayerCancelBody),
            )
        },
        f"{PREFIX}/models": {
            "get": _op(
                "List the models",
                "models",
                "listModels",
                {
                    "200": json_content(p.ModelList, "The registry joined with live workers."),
                    **errors(p.ErrorEnvelope, {}, common=_AUTH),
                },
            )
        },
        f"{PREFIX}/models/{{modelId}}": {
            "get": _op(
                "Describe a model",
                "models",
                "getModel",
                {
                    "200": json_content(p.ModelDetail, "The model, its path and configuration."),
                    **errors(p.ErrorEnvelope, {404: "No such model (`MODEL_NOT_FOUND`)."}, common=_AUTH),
                },
                parameters=[path_param("modelId", 'A registry model id or `"default"` (may contain `/`).')],
            )
        },
        f"{PREFIX}/adapters/{{name}}": {
            "delete": _op(
                "Delete a trained LoRA adapter",
                "models",
                "deleteAdapter",
                {
                    "200": json_content(p.AdapterDeleted, "The records deleted (every worker unloads the adapter)."),
                    **errors(
                        p.ErrorEnvelope,
                        {
                            404: "No trained adapter of that name (`MODEL_NOT_FOUND`); registry adapters included.",
                            409: "A queued, running or paused job trains into that name, or (without `force`) live "
                            "workers serve it (`RESOURCE_IN_USE`; `details` name the jobs or workers).",
                        },
                        common=_AUTH,
                    ),
                },
                parameters=[
                    path_param("name", "The adapter's name (`adapterName` of its training job)."),
                    query_param(
                        "force",
                        "`true`: delete it even while workers serve it (requests using it at that moment fail).",
                        {"type": "boolean", "default": False},
                    ),
                ],
            )
        },
        f"{PREFIX}/health": {
            "get": _op(
                "Health summary",
                "health",
                "health",
                {
                    "200": json_content(p.Health, "UP (a model can be served) or DEGRADED (draining)."),
                    "503": json_content(p.Health, _HEALTH_503),
                    **errors(p.ErrorEnvelope, {}, common=_AUTH),
                },
            )
        },
        f"{PREFIX}/health/details": {
            "get": _op(
                "Health of every component",
                "health",
                "healthDetails",
                {
                    "200": json_content(p.HealthDetails, "UP (a model can be served) or DEGRADED (draining)."),
                    "503": json_content(p.HealthDetails, _HEALTH_503),
                    **errors(p.ErrorEnvelope, {}, common=_AUTH),
                },
            )
        },
        f"{PREFIX}/health/live": {
            "get": _op(
                "Liveness: the gateway process answers",
                "health",
                "healthLive",
                {
                    "200": json_content(p.Liveness, "Always, while the process runs (workers are not checked)."),
                    **errors(p.ErrorEnvelope, {}, common=_AUTH),
                },
            )
        },
        f"{PREFIX}/health/ready": {
            "get": _op(
                "Readiness: the default model can be served now",
                "health",
                "healthReady",
                {
                    "200": json_content(p.Readiness, "READY: a live worker has the default model loaded."),
                    "503": json_content(
                        p.Readiness,
                        "NOT_READY (the same body, with `reason`): the model is loading, failed or has no live "
                        "worker, NATS is unreachable, or the gateway is draining.",
                    ),
                    **errors(p.ErrorEnvelope, {}, common=_AUTH),
                },
            )
        },
        f"{PREFIX}/training/start": {
            "post": _op(
                "Start a LoRA fine-tuning job",
                "training",
                "trainingStart",
                {
                    "200": json_content(p.TrainingStarted, "The job was queued."),
                    **errors(
                        p.ErrorEnvelope,
                        {
                            **_BODY,
                            400: _BODY[400] + " Also both or neither of `datasetPath` and `datasetId`, a dataset "
                            "or output path outside its root, a bad row in the `datasetPath` file, or an adapter "
                            "name already taken (`INVALID_REQUEST`, `TRAINING_JOB_RUNNING`).",
                            404: "`baseModel` not in the registry (`MODEL_NOT_FOUND`), or no uploaded dataset "
                            "`datasetId` (`DATASET_NOT_FOUND`).",
                            503: "The training queue is full (`INSUFFICIENT_RESOURCES`).",
                        },
                        common=_AUTH,
                    ),
                },
                requestBody=json_body(p.StartBody),
            )
        },
        f"{PREFIX}/datasets": {
            "post": _op(
                "Upload a training dataset",
                "datasets",
                "uploadDataset",
                {
                    "201": json_content(p.Dataset, "Validated (every row) and stored."),
                    **errors(
                        p.ErrorEnvelope,
                        {
                            400: "A row that is not an Alpaca or chat row, not valid JSON, no rows at all "
                            "(`details[0].field` names the row and field: `file[row 3].output`), a multipart body "
                            "without a `file` part, or another Content-Type (`INVALID_REQUEST`).",
                            413: "Body over `CY_LLM_MAX_DATASET_BYTES` (`INVALID_REQUEST`).",
                        },
                        common=_AUTH,
                    ),
                },
                requestBody={
                    "required": True,
                    "description": "The file as a multipart `file` part (its file name is the dataset's name), or "
                    "the file itself as the body (`?name=`; also `application/x-ndjson`, `application/x-jsonlines`, "
                    "`text/plain`). JSONL has one row per line; JSON is an array of rows. The format comes from "
                    "the name's extension (`.jsonl`, `.json`), else from the content (`[` first: JSON).",
                    "content": {
                        "multipart/form-data": {
                            "schema": {
                                "type": "object",
                                "required": ["file"],
                                "properties": {"file": binary("The dataset file (`.jsonl` or `.json`).")},
                            }
                        },
                        "application/jsonl": {
                            "schema": {"type": "string", "description": "One row (AlpacaRow or ChatRow) per line."}
                        },
                        "application/json": {"schema": {"type": "array", "items": _ROW}},
                    },
                },
                parameters=[
                    query_param(
                        "name",
                        "The dataset's name for a raw body (a label; any folder part is dropped).",
                        {"type": "string"},
                    )
                ],
            ),
            "get": _op(
                "List the uploaded datasets, newest first",
                "datasets",
                "listDatasets",
                {
                    "200": json_content(p.DatasetList, "Every dataset."),
                    **errors(p.ErrorEnvelope, {}, common=_AUTH),
                },
            ),
        },
        f"{PREFIX}/datasets/{{datasetId}}": {
            "get": _op(
                "Describe an uploaded dataset",
                "datasets",
                "getDataset",
                {
                    "200": json_content(p.Dataset, "The dataset."),
                    **errors(p.ErrorEnvelope, _NO_DATASET, common=_AUTH),
                },
                parameters=[_DATASET],
            ),
            "delete": _op(
                "Delete an uploaded dataset",
                "datasets",
                "deleteDataset",
                {
                    "200": json_content(p.DatasetDeleted, "Deleted."),
                    **errors(p.ErrorEnvelope, {**_NO_DATASET, **_DATASET_IN_USE}, common=_AUTH),
                },
                parameters=[_DATASET],
            ),
        },
        f"{PREFIX}/training/status/{{jobId}}": {
            "get": _op(
                "A job's status and progress",
                "training",
                "trainingStatus",
                {
                    "200": json_content(p.TrainingStatus, "The job."),
                    **errors(p.ErrorEnvelope, _NO_JOB, common=_AUTH),
                },
                parameters=[_JOB],
            )
        },
        f"{PREFIX}/training/cancel/{{jobId}}": _job_verb(
            "cancel", "Cancel a job", {400: "The job already finished (`INVALID_REQUEST`)."}, {"200": job_change}
        ),
        f"{PREFIX}/training/pause/{{jobId}}": _job_verb(
            "pause",
            "Pause a running job at its next step",
            {400: "The job already finished (`INVALID_REQUEST`)."},
            {
                "200": json_content(p.JobChange, "Paused (a queued job pauses at once)."),
                "202": json_content(p.JobChange, "Pause asked for; the trainer has not checkpointed yet."),
            },
        ),
        f"{PREFIX}/training/resume/{{jobId}}": _job_verb(
            "resume",
            "Resume a paused job",
            {400: "The job is not paused, or is still running (`INVALID_REQUEST`, `TRAINING_JOB_RUNNING`)."},
            {"200": job_change},
        ),
        f"{PREFIX}/training/list": {
            "get": _op(
                "List jobs, newest first",
                "training",
                "trainingList",
                {
                    "200": json_content(p.TrainingJobList, "One page of jobs."),
                    **errors(p.ErrorEnvelope, {400: "Bad `status`, `limit` or `offset`."}, common=_AUTH),
                },
                parameters=[
                    query_param("status", "Only jobs in this state.", {"type": "string", "enum": list(JOB_STATUSES)}),
                    query_param("limit", "Page size.", {"type": "integer", "minimum": 1, "maximum": 1000}),
                    query_param("offset", "Jobs to skip.", {"type": "integer", "minimum": 0, "maximum": 10**9}),
                ],
            )
        },
        f"{PREFIX}/training/events/{{jobId}}": {
            "get": _op(
                "A job's progress events (SSE)",
                "training",
                "trainingEvents",
                {
                    "200": sse_content(
                        p.TrainingEventView,
                        p.ErrorEnvelope,
                        "The stored events (after `Last-Event-ID` / `after`), then, with `follow`, new ones until "
                        "the job finishes; each event's `id:` is its stream sequence.",
                    ),
                    **errors(p.ErrorEnvelope, _NO_JOB, common=_AUTH),
                },
                parameters=[
                    _JOB,
                    query_param(
                        "follow",
                        "Keep streaming until the job finishes (default true; `0`, `false`, `no` turn it off).",
                        {"type": "string"},
                    ),
                    query_param("after", "Replay only events after this stream sequence.", {"type": "string"}),
                    {
                        "name": "Last-Event-ID",
                        "in": "header",
                        "required": False,
                        "description": "As `after` (sent by EventSource on reconnect).",
                        "schema": {"type": "string"},
                    },
                ],
            )
        },
        JSON_PATH: {
            "get": _op(
                "This document",
                "meta",
                "openapi",
                {
                    "200": {"description": "The OpenAPI 3.1 document.", "content": {"application/json": {}}},
                    **errors(p.ErrorEnvelope, {}, common=_ANY),
                },
                security=[],
            )
        },
        DOCS_PATH: {
            "get": _op(
                "A page that renders this document",
                "meta",
                "docs",
                {
                    "200": {"description": "HTML (no external assets).", "content": {"text/html": {}}},
                    **errors(p.ErrorEnvelope, {}, common=_ANY),
                },
                security=[],
            )
        },
    }


def build_document() -> dict[str, Any]:
    paths = _paths()
    return document(
        title="CY-LLM REST API",
        description="Inference, models, health, training datasets and LoRA training under /api/v1. Every error body is "
        "`ErrorEnvelope`; every route but this document and its docs page needs `X-API-Key`.",
        paths=paths,
        types=[
            p.InferenceBody,
            p.StartBody,
            p.ErrorEnvelope,
            p.InferenceResponse,
            p.InferenceChunk,
            p.ModelList,
            p.ModelDetail,
            p.AdapterDeleted,
            p.PlayerCancelBody,
            p.PlayersCancelled,
            p.Health,
            p.HealthDetails,
            p.Liveness,
            p.Readiness,
            p.TrainingStarted,
            p.TrainingStatus,
            p.TrainingJobList,
            p.JobChange,
            p.TrainingEventView,
            p.Dataset,
            p.DatasetList,
            p.DatasetDeleted,
            p.AlpacaRow,
            p.ChatRow,
        ],
        security_schemes={
            "ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key", "description": "X-API-Key header"}
        },
        security=[{"ApiKey": []}],
    )
