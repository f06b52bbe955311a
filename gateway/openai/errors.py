"""CyError -> OpenAI's error shape `{"error": {"message", "type", "param", "code"}}` with the status the SDKs map
to their typed exceptions (400 BadRequestError, 401 AuthenticationError, 404 NotFoundError, 409 ConflictError,
415 APIStatusError, 429 RateLimitError, 5xx InternalServerError); request-body decoding that names the offending
parameter."""

from __future__ import annotations

import re
from typing import Any, TypeVar

import msgspec
from quart import Response

from gateway.http_json import json_response, unreadable_json
from schemas.errors import CyError, ErrorCode, ErrorDetail

T = TypeVar("T")

# (OpenAI `type`, default OpenAI `code`) per internal code; the status is the error's own (`CyError.status`:
# the code's, or an HTTP-edge refusal's such as 415).
_SHAPES: dict[ErrorCode, tuple[str, str | None]] = {
    ErrorCode.INVALID_REQUEST: ("invalid_request_error", None),
    ErrorCode.UNAUTHORIZED: ("invalid_request_error", "invalid_api_key"),
    ErrorCode.FORBIDDEN: ("invalid_request_error", "forbidden"),
    ErrorCode.MODEL_NOT_FOUND: ("invalid_request_error", "model_not_found"),
    ErrorCode.TRAINING_JOB_NOT_FOUND: ("invalid_request_error", "not_found"),
    ErrorCode.DATASET_NOT_FOUND: ("invalid_request_error", "not_found"),
    ErrorCode.TRAINING_JOB_RUNNING: ("invalid_request_error", None),
    ErrorCode.RESOURCE_IN_USE: ("invalid_request_error", "resource_in_use"),
    ErrorCode.RATE_LIMITED: ("rate_limit_error", "rate_limit_exceeded"),
    ErrorCode.MODEL_NOT_READY: ("server_error", "model_not_ready"),
    ErrorCode.INSUFFICIENT_RESOURCES: ("server_error", "service_unavailable"),
    ErrorCode.INTERNAL_ERROR: ("server_error", "internal_error"),
}

_PATH = re.compile(r"at `\$\.?([^`]*)`")
_MISSING = re.compile(r"missing required field `([^`]+)`")
_UNKNOWN = re.compile(r"unknown field `([^`]+)`")


def bad_request(param: str | None, message: str, *, code: str = "invalid_value") -> CyError:
    """A 400 naming the parameter (OpenAI's `param`) and a machine-readable `code`."""
    return CyError(ErrorCode.INVALID_REQUEST, message, details=[ErrorDetail(type=code, field=param or "")])


def openai_error(error: CyError) -> tuple[int, dict[str, Any]]:
    """(HTTP status, body) for `error` in OpenAI's shape."""
    status = error.status
    type_, code = _SHAPES.get(error.code, ("server_error", "internal_error"))
    detail = error.body.details[0] if error.body.details else None
    if detail is not None and error.code is ErrorCode.INVALID_REQUEST:
        code = detail.type
    param = detail.field if detail is not None and detail.field else None
    if param is None and error.code is ErrorCode.MODEL_NOT_FOUND:
        param = "model"
    if code is None and error.code is ErrorCode.INVALID_REQUEST and "context" in error.body.message:
        code = "context_length_exceeded"
    return status, {"error": {"message": error.body.message, "type": type_, "param": param, "code": code}}


def error_body(error: CyError) -> dict[str, Any]:
    return openai_error(error)[1]


def error_response(error: CyError) -> Response:
    status, body = openai_error(error)
    # The SDKs retry 408/409/429/5xx unless told otherwise; say it, so a failed model is not retried for nothing.
    headers = {"x-should-retry": "true" if error.body.retryable else "false"}
    if error.body.retry_after:
        headers["Retry-After"] = str(max(1, round(error.body.retry_after)))
    return json_response(body, status=status, headers=headers)


def decode_request(data: bytes, type_: type[T]) -> T:
    """Decode a JSON body into `type_`. Raises CyError(INVALID_REQUEST) naming the bad parameter."""
    if not data.strip():
        raise bad_request(None, "the request body is empty; send a JSON object", code="missing_body")
    try:
        return msgspec.json.decode(data, type=type_)
    except msgspec.ValidationError as exc:
        text = str(exc)
        where = _PATH.search(text)
        path = where.group(1) if where else ""
        reason = text.split(" - at ")[0]
        if unknown := _UNKNOWN.search(text):
            name = f"{path}.{unknown.group(1)}" if path else unknown.group(1)
            raise bad_request(
                name, f"Unrecognized request argument supplied: {name}", code="unknown_parameter"
            ) from exc
        if missing := _MISSING.search(text):
            name = f"{path}.{missing.group(1)}" if path else missing.group(1)
            raise bad_request(
                name, f"Missing required parameter: '{name}'.", code="missing_required_parameter"
            ) from exc
        raise bad_request(path or None, f"Invalid value for '{path or 'body'}': {reason}") from exc
    except msgspec.DecodeError as exc:
        raise bad_request(
            None, f"We could not parse the JSON body of your request: {exc}", code="invalid_json"
        ) from exc
    except (UnicodeDecodeError, RecursionError) as exc:
        raise bad_request(
            None, f"We could not parse the JSON body of your request: {unreadable_json(exc)}", code="invalid_json"
        ) from None
