"""The spec's error codes and the one error envelope that travels on NATS."""

from __future__ import annotations

import enum

import msgspec


class ErrorCode(enum.StrEnum):
    INVALID_REQUEST = "INVALID_REQUEST"
    MODEL_NOT_FOUND = "MODEL_NOT_FOUND"
    MODEL_NOT_READY = "MODEL_NOT_READY"
    INSUFFICIENT_RESOURCES = "INSUFFICIENT_RESOURCES"
    TRAINING_JOB_NOT_FOUND = "TRAINING_JOB_NOT_FOUND"
    TRAINING_JOB_RUNNING = "TRAINING_JOB_RUNNING"
    RATE_LIMITED = "RATE_LIMITED"
    INTERNAL_ERROR = "INTERNAL_ERROR"
    # Added for auth at the HTTP edge (the spec lists 401/403 statuses without codes).
    UNAUTHORIZED = "UNAUTHORIZED"
    FORBIDDEN = "FORBIDDEN"
    # Added for the datasets API (/api/v1/datasets, /v1/files): an unknown dataset id.
    DATASET_NOT_FOUND = "DATASET_NOT_FOUND"
    # Added for deletes refused while something still needs the resource (a dataset or an adapter that an
    # active training job uses, an adapter that workers serve): 409 Conflict, on both HTTP faces.
    RESOURCE_IN_USE = "RESOURCE_IN_USE"


HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.INVALID_REQUEST: 400,
    ErrorCode.MODEL_NOT_FOUND: 404,
    ErrorCode.MODEL_NOT_READY: 503,
    ErrorCode.INSUFFICIENT_RESOURCES: 503,
    ErrorCode.TRAINING_JOB_NOT_FOUND: 404,
    ErrorCode.TRAINING_JOB_RUNNING: 400,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.INTERNAL_ERROR: 500,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.DATASET_NOT_FOUND: 404,
    ErrorCode.RESOURCE_IN_USE: 409,
}


class ErrorDetail(msgspec.Struct, kw_only=True, omit_defaults=True):
    type: str
    field: str = ""
    description: str = ""


class ErrorBody(msgspec.Struct, kw_only=True):
    """The wire error: what a service says went wrong, independent of HTTP."""

    code: ErrorCode
    message: str
    retryable: bool = False
    details: list[ErrorDetail] = []
    # Seconds a client should wait before retrying (queue full, rate limited); 0 = unspecified.
    retry_after: float = 0.0


class CyError(Exception):
    """Root of every error a CY-LLM component raises on purpose; carries the wire body."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        retryable: bool = False,
        details: list[ErrorDetail] | None = None,
        retry_after: float = 0.0,
    ) -> None:
        super().__init__(message)
        self.body = ErrorBody(
            code=code, message=message, retryable=retryable, details=details or [], retry_after=retry_after
        )

    @property
    def code(self) -> ErrorCode:
        return self.body.code

    @property
    def status(self) -> int:
        return HTTP_STATUS[self.body.code]


def invalid(field: str, description: str, *, type_: str = "invalid_value") -> CyError:
    """A 400 naming the offending field."""
    return CyError(
        ErrorCode.INVALID_REQUEST,
        f"Invalid {field}: {description}",
        details=[ErrorDetail(type=type_, field=field, description=description)],
    )


def in_use(field: str, message: str, holders: list[str]) -> CyError:
    """A 409: the resource that `field` names is still needed; one detail per holder (a job, a worker)."""
    return CyError(
        ErrorCode.RESOURCE_IN_USE,
        message,
        details=[ErrorDetail(type="resource_in_use", field=field, description=holder) for holder in holders],
    )
