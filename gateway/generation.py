"""Shared by both HTTP APIs: build the wire request, run it to completion, or stream it."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import structlog

from gateway.core import GatewayCore
from gateway.inference_client import ReplyStream
from gateway.sse import CLIENT_CLOSED
from schemas.errors import CyError, ErrorCode
from schemas.inference import Accepted, GenerateRequest, StreamEnd, StreamError, TokenChunk, TokenLogprob

log = structlog.get_logger()

# How long a streaming request waits for its first reply before the SSE response starts anyway
# (errors found before that get a real HTTP status; later ones become an SSE error event).
FIRST_REPLY_GRACE_S = 2.0


def log_client_left(fields: dict[str, object]) -> None:
    """The canonical line of a request whose client left before its response was sent (its handler was
    cancelled; the generation has been cancelled on the way out)."""
    log.info("request", status=CLIENT_CLOSED, outcome="client_disconnected", **fields)


def new_trace_id(prefix: str = "gen") -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def resolve_model(core: GatewayCore, model_id: str, field: str = "modelId") -> str:
    """Registry id for `model_id` ("default" allowed). Raises CyError(MODEL_NOT_FOUND)."""
    from schemas.errors import ErrorDetail

    resolved = core.registry.resolve(model_id)
    if resolved is None:
        raise CyError(
            ErrorCode.MODEL_NOT_FOUND,
            f"Invalid model ID: {model_id}",
            details=[
                ErrorDetail(type="model_not_found", field=field, description=f"Model '{model_id}' is not configured")
            ],
        )
    return resolved[0]


async def admit(core: GatewayCore, request: GenerateRequest) -> GenerateRequest:
    """Refuse early (draining gateway, no ready worker) and stamp the queue deadline.

    Across a NATS outage a request waits instead of failing: up to `nats_wait` s for the link to come back,
    and, while the link was down within that time, for the workers' heartbeats to show the model ready again.
    Raises CyError (503) when that time runs out."""
    if core.draining:
        raise CyError(ErrorCode.INSUFFICIENT_RESOURCES, "the gateway is shutting down", retryable=True, retry_after=5)
    wait = core.settings.nats_wait
    until = time.monotonic() + wait
    if not core.link.up and not await core.link.wait_up(wait):
        raise CyError(
            ErrorCode.INSUFFICIENT_RESOURCES, f"NATS is unreachable (waited {wait:g}s)", retryable=True, retry_after=2
        )
    while True:
        try:
            core.inference.check_ready(request.model_id)
            break
        except CyError:
            recovering = time.monotonic() - core.link.dropped_at < wait + 5
            if not recovering or time.monotonic() >= until:
                raise
            await asyncio.sleep(0.05)
    if core.draining:  # it began while this request waited for NATS
        raise CyError(ErrorCode.INSUFFICIENT_RESOURCES, "the gateway is shutting down", retryable=True, retry_after=5)
    request.deadline_ms = int((time.time() + core.settings.queue_timeout) * 1000)
    return request


@dataclass
class Outcome:
    """What one request produced (for the response body and the canonical log line)."""

    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # of prompt_tokens, served from the engine's prefix cache
    worker_id: str = ""
    ttft_ms: float | None = None
    started: float = field(default_factory=time.monotonic)

    def observe(self, reply: Accepted | TokenChunk | StreamEnd | StreamError) -> None:
        """Fold one reply in. Raises CyError for StreamError."""
        match reply:
            case Accepted():
                self.prompt_tokens, self.worker_id = reply.prompt_tokens, reply.worker_id
            case TokenChunk():
                if self.ttft_ms is None:
                    self.ttft_ms = (time.monotonic() - self.started) * 1000
                self.text.append(reply.chunk)
                self.logprobs.extend(reply.logprobs)
                if reply.finish_reason:
                    self.finish_reason = reply.finish_reason
            case StreamEnd():
                self.finish_reason = reply.finish_reason
                self.prompt_tokens, self.completion_tokens = reply.prompt_tokens, reply.completion_tokens
                # A migrated stream's worker also had the continuation as prompt: count only the client's prompt.
                self.cached_tokens = min(reply.cached_tokens, reply.prompt_tokens)
            case StreamError():
                raise CyError(reply.code, reply.message, retryable=reply.retryable, retry_after=reply.retry_after)

    def log_fields(self) -> dict[str, object]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "completion_tokens": self.completion_tokens,
            "ttft_ms": None if self.ttft_ms is None else round(self.ttft_ms, 1),
            "duration_ms": round((time.monotonic() - self.started) * 1000, 1),
            "finish_reason": self.finish_reason,
            "worker_id": self.worker_id or None,
        }


@contextlib.asynccontextmanager
async def _opened(core: GatewayCore, request: GenerateRequest) -> AsyncIterator[ReplyStream]:
    """The request's stream, counted against its tenant's and player's limits (gateway/players.py) while open."""
    with core.players.holding(request) as held:
        async with core.inference.open(await admit(core, request)) as stream:
            core.players.opened(held, stream, core.inference)
            yield stream


async def complete(core: GatewayCore, request: GenerateRequest, outcome: Outcome) -> Outcome:
    """Run a request to its end. Raises CyError on any failure."""
    async with _opened(core, request) as stream, core.in_flight():
        while not stream.finished:
            reply = await stream.next()
            if reply is not None:
                outcome.observe(reply)
    return outcome


@contextlib.asynccontextmanager
async def streaming(core: GatewayCore, request: GenerateRequest) -> AsyncIterator[ReplyStream]:
    async with _opened(core, request) as stream, core.in_flight():
        yield stream
