"""Inference events: the request a client publishes and the reply stream a worker sends back.

Field names follow the spec's gRPC `StreamPredict` messages. Every field added after v1 must have a
default so older payloads keep decoding (see tests/schemas/test_evolution.py).
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Any, Literal

import msgspec

from schemas.errors import ErrorCode

FinishReason = Literal["stop", "length", "cancelled", "error"]


class GenerationParams(msgspec.Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """Sampling parameters. `temperature == 0` means greedy decoding."""

    max_new_tokens: Annotated[int, msgspec.Meta(ge=1, le=32768)] = 256
    temperature: Annotated[float, msgspec.Meta(ge=0.0, le=2.0)] = 0.7
    top_p: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 0.95
    top_k: Annotated[int, msgspec.Meta(ge=0)] = 0
    repetition_penalty: Annotated[float, msgspec.Meta(gt=0.0, le=10.0)] = 1.0
    presence_penalty: Annotated[float, msgspec.Meta(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[float, msgspec.Meta(ge=-2.0, le=2.0)] = 0.0
    seed: int | None = None
    # Generation stops before any of these strings; the stop text is not returned.
    stop: list[str] = []
    # Constrained decoding: the output is JSON valid against this JSON Schema (its text; "" = unconstrained).
    # Omitted when empty, so requests without it still decode on workers that predate it; a worker that
    # predates it refuses a request that sets it (unknown field) instead of generating free text.
    json_schema: str = ""
    # Log probabilities of the sampled tokens (from the model's raw distribution, before temperature and
    # penalties), with the `top_logprobs` most likely alternatives of each position.
    logprobs: bool = False
    top_logprobs: Annotated[int, msgspec.Meta(ge=0, le=20)] = 0


class Metadata(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Caller metadata (game servers: player and locale). Travels to the worker and into its logs."""

    trace_id: str = ""
    tenant: str = ""
    player_id: str = ""
    locale: str = ""
    # The conversation this request continues (OpenAI's `prompt_cache_key`): requests of one session go to the
    # worker whose prefix cache holds it. Without it, `tenant` + `player_id` name the session.
    session_id: str = ""


class ToolFunction(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A function the model may call: OpenAI's `tools[].function` (`parameters` is a JSON Schema)."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = {}


class Tool(msgspec.Struct, kw_only=True):
    type: Literal["function"] = "function"
    function: ToolFunction


class ToolCallFunction(msgspec.Struct, kw_only=True):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(msgspec.Struct, kw_only=True):
    """A call an assistant turn made (sent back in the conversation that follows)."""

    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One turn. `tool_calls` on assistant turns; role "tool" turns answer the call `tool_call_id`."""

    role: str
    content: str
    tool_calls: list[ToolCall] = []
    tool_call_id: str = ""
    name: str = ""


class GenerateRequest(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Published on `subjects.generate_subject(model_id, tier)`.

    Either `prompt` (raw text, used as is) or `messages` (the model's chat template is applied).
    `trace_id` names the reply subject `subjects.stream_subject(trace_id)`; subscribe to it first.
    """

    trace_id: str
    model_id: str
    prompt: str = ""
    messages: list[ChatMessage] | None = None
    # Functions the chat template presents to the model (OpenAI `tools`); the reply is the raw text, in the
    # template's tool-call format (`<tool_call>{...}</tool_call>` for templates without one).
    tools: list[Tool] = []
    adapter: str = ""
    priority: int = 0
    generation: GenerationParams = msgspec.field(default_factory=GenerationParams)
    metadata: Metadata = msgspec.field(default_factory=Metadata)
    worker_hint: str = ""
    # Unix epoch milliseconds after which nobody should start this request (0 = no deadline).
    deadline_ms: int = 0
    # Tokens per TokenChunk message (0 = the worker's default, 4).
    stream_chunk_size: Annotated[int, msgspec.Meta(ge=0, le=256)] = 0
    # Set by workers: how many times a worker whose engine went down before any text handed this request back
    # to the queue (another worker then sends its own `accepted`). Publishers leave it 0.
    handbacks: Annotated[int, msgspec.Meta(ge=0)] = 0
    # Text already generated for this request by a worker that died mid-stream: the worker appends it to the
    # prompt (after the chat template's assistant turn opener) and generates what follows, within what is left
    # of `max_new_tokens`. Set by the gateway when it migrates a stream; a publisher may do the same.
    continuation: str = ""

    def affinity_key(self) -> str:
        """The session this request belongs to, as workers advertise it ("" = none): a digest of the model, the
        adapter and `metadata.session_id` (else tenant + player_id). Requests with one key are routed to the
        worker that served the last one, whose prefix cache holds the conversation (gateway/session_router.py)."""
        meta = self.metadata
        who = f"s\0{meta.tenant}\0{meta.session_id}" if meta.session_id else ""
        if not who and meta.player_id:
            who = f"p\0{meta.tenant}\0{meta.player_id}"
        if not who:
            return ""
        return hashlib.blake2b(f"{self.model_id}\0{self.adapter}\0{who}".encode(), digest_size=8).hexdigest()

    def log_context(self) -> dict[str, str | None]:
        """What every log line about this request carries (bound as structlog contextvars by the gateway's
        two APIs and the worker); empty values are None so that they drop out of the rendered line."""
        meta = self.metadata
        return {
            "trace_id": self.trace_id,
            "model_id": self.model_id,
            "adapter": self.adapter or None,
            "client_trace_id": meta.trace_id or None,
            "tenant": meta.tenant or None,
            "player_id": meta.player_id or None,
            "session_id": meta.session_id or None,
            "locale": meta.locale or None,
        }


class Accepted(msgspec.Struct, tag="accepted", kw_only=True):
    """First reply: names the worker (so the requester can watch its heartbeat) and the prompt size."""

    trace_id: str
    worker_id: str
    prompt_tokens: int


class TopLogprob(msgspec.Struct, array_like=True):
    """One alternative at a position: [token_id, token text, logprob]."""

    token_id: int
    token: str
    logprob: float


class TokenLogprob(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The log probability of one generated token and the most likely alternatives at its position."""

    token_id: int
    logprob: float
    token: str = ""
    top: list[TopLogprob] = []


class TokenChunk(msgspec.Struct, tag="chunk", kw_only=True, omit_defaults=True):
    """`stream_chunk_size` tokens of generated text. `index` counts chunks from 0 so gaps show.

    `logprobs` (when the request asked for them): one entry per token counted in `token_count`.
    """

    trace_id: str
    chunk: str
    index: int
    token_count: int = 0
    end_of_stream: bool = False
    finish_reason: FinishReason | None = None
    logprobs: list[TokenLogprob] = []
    # The worker that generated it (a stream can move to another worker: late chunks of the old one are dropped).
    worker_id: str = ""


class StreamEnd(msgspec.Struct, tag="end", kw_only=True):
    """Last reply of a successful stream: totals and timings."""

    trace_id: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    chunks: int
    worker_id: str = ""
    ttft_ms: float = 0.0
    duration_ms: float = 0.0
    # Of `prompt_tokens`, how many the engine took from its prefix cache instead of computing them (0 for an
    # engine without one). The `cpu-openvino` engine's count is its mirror of the pipeline's cache
    # (services/engine/prefix_cache.py); vLLM's is its own `num_cached_tokens`.
    cached_tokens: int = 0


class StreamError(msgspec.Struct, tag="error", kw_only=True):
    """Last reply of a failed stream (may follow some chunks)."""

    trace_id: str
    code: ErrorCode
    message: str
    retryable: bool = False
    retry_after: float = 0.0
    worker_id: str = ""


Reply = Accepted | TokenChunk | StreamEnd | StreamError
