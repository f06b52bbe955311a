"""The wire shapes of /v1/responses (OpenAI's Responses API): the create body, the Response object, its input
items, and the server-sent events of a streamed response.

The routes encode these Structs and the OpenAPI document describes them (gateway/openai/openapi.py). As in
protocol.py, every documented create parameter is declared: an unknown one is a typo or a feature this server
lacks (400); those the engine cannot honour are typed loosely (`Any`) and refused by `conversation.refuse` unless
they hold their "off" value.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from gateway.openai.protocol import MaxTokens, ModelName, Temperature, TopP

Text = Annotated[str, msgspec.Meta(max_length=1_048_576)]
SchemaName = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern="^[A-Za-z0-9_-]+$")]

# --- the create body -------------------------------------------------------------------------------------


class InputPart(msgspec.Struct, kw_only=True):
    """One content part of an input message: `input_text` (or `output_text`, in an assistant message sent back).
    Other parts (`input_image`, `input_file`, `input_audio`) are refused: the served models read text only."""

    type: str
    text: str | None = None


class InputItem(msgspec.Struct, kw_only=True):
    """An input item. Messages (`type` "message" or absent: OpenAI's easy input message) are read; other
    item types (function calls and their outputs, reasoning, item references) are refused with a 400.
    Unknown fields are ignored here, since assistant messages sent back carry `annotations`, `logprobs`..."""

    type: str = "message"
    role: str | None = None
    content: str | list[InputPart] | None = None
    id: str | None = None
    status: str | None = None


class TextFormatText(msgspec.Struct, tag="text", tag_field="type", forbid_unknown_fields=True):
    """Free text (the default)."""


class TextFormatJsonObject(msgspec.Struct, tag="json_object", tag_field="type", forbid_unknown_fields=True):
    """Any JSON object (constrained decoding); the input must mention JSON."""


class TextFormatJsonSchema(
    msgspec.Struct, kw_only=True, tag="json_schema", tag_field="type", forbid_unknown_fields=True
):
    """JSON valid against `schema` (constrained decoding)."""

    name: SchemaName
    schema: dict[str, Any]
    description: str | None = None
    strict: bool | None = None


TextFormat = TextFormatText | TextFormatJsonObject | TextFormatJsonSchema


class TextConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    format: TextFormat | None = None
    # Recognised; only OpenAI's default ("medium") is served.
    verbosity: Any = None


class ResponseStreamOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    # OpenAI pads deltas against length side channels; there is nothing to pad here (accepted, no effect).
    include_obfuscation: bool | None = None


class ResponseCreateRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """POST /v1/responses. `input` is a string (one user message) or a list of input messages; with
    `previous_response_id` the stored conversation of that response comes before it."""

    input: str | Annotated[list[InputItem], msgspec.Meta(min_length=1, max_length=2048)]
    model: ModelName = "default"
    instructions: Text | None = None
    previous_response_id: Annotated[str, msgspec.Meta(max_length=256)] | None = None
    store: bool | None = None
    stream: bool | None = None
    stream_options: ResponseStreamOptions | None = None
    max_output_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    user: Annotated[str, msgspec.Meta(max_length=256)] | None = None
    # Caller tags; tenant/playerId/locale/traceId travel to the worker like /api/v1 metadata.
    metadata: dict[str, str] | None = None
    text: TextConfig | None = None
    # Routes the requests that share it to the worker holding their cached prefix (the conversation's first
    # response id when absent).
    prompt_cache_key: Annotated[str, msgspec.Meta(max_length=256)] | None = None
    # Bookkeeping that does not change what is generated: accepted, echoed, no effect.
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    prompt_cache_options: Any = None
    safety_identifier: Annotated[str, msgspec.Meta(max_length=256)] | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None
    max_tool_calls: Annotated[int, msgspec.Meta(ge=0)] | None = None
    # Recognised, refused unless "off" (conversation.refuse).
    tools: Any = None
    tool_choice: Any = None
    include: Any = None
    truncation: Any = None
    top_logprobs: Any = None
    reasoning: Any = None
    background: Any = None
    background_options: Any = None
    conversation: Any = None
    context_management: Any = None
    prompt: Any = None
    moderation: Any = None
    image: Any = None
    access_programs: Any = None


# --- the Response object ---------------------------------------------------------------------------------


class OutputText(msgspec.Struct, kw_only=True, tag="output_text", tag_field="type"):
    annotations: list[Any] = []
    logprobs: list[Any] = []
    text: str


class OutputMessage(msgspec.Struct, kw_only=True, tag="message", tag_field="type"):
    """The assistant's answer (`output[0]`), also how an assistant message of the input is listed."""

    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    content: list[OutputText]
    role: Literal["assistant"] = "assistant"


class InputText(msgspec.Struct, kw_only=True, tag="input_text", tag_field="type"):
    text: str


class ListedMessage(msgspec.Struct, kw_only=True, tag="message", tag_field="type"):
    """A message of a response's input (GET .../input_items): `input_text` parts, or `output_text` parts for an
    assistant message (an earlier answer)."""

    id: str
    role: Literal["user", "system", "developer", "assistant"]
    content: list[InputText | OutputText]
    status: Literal["completed"] = "completed"


class InputTokensDetails(msgspec.Struct, kw_only=True):
    cached_tokens: int = 0
    cache_write_tokens: int = 0


class OutputTokensDetails(msgspec.Struct, kw_only=True):
    reasoning_tokens: int = 0


class ResponseUsage(msgspec.Struct, kw_only=True):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class ResponseErrorInfo(msgspec.Struct, kw_only=True):
    """Why a response failed (`code`: OpenAI's `server_error`, `rate_limit_exceeded` or `invalid_prompt`)."""

    code: str
    message: str


class IncompleteDetails(msgspec.Struct, kw_only=True):
    reason: Literal["max_output_tokens"]


class ReasoningConfig(msgspec.Struct, kw_only=True):
    """Always null: the served models are not reasoning models."""

    effort: None = None
    summary: None = None


class TextConfigEcho(msgspec.Struct, kw_only=True):
    format: TextFormat
    verbosity: Literal["medium"] = "medium"


class ResponseObject(msgspec.Struct, kw_only=True):
    """OpenAI's Response object. `status` is `in_progress` in a stream's opening events, `completed`, or
    `incomplete` (with `incomplete_details`) when `max_output_tokens` or the context ran out; `failed` (with
    `error`) only in a stream's `response.failed` event."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["in_progress", "completed", "incomplete", "failed"]
    background: bool = False
    completed_at: int | None
    error: ResponseErrorInfo | None
    incomplete_details: IncompleteDetails | None
    instructions: str | None
    max_output_tokens: int | None
    max_tool_calls: int | None
    model: str
    output: list[OutputMessage]
    parallel_tool_calls: bool
    previous_response_id: str | None
    prompt_cache_key: str | None
    prompt_cache_retention: str | None
    reasoning: ReasoningConfig
    safety_identifier: str | None
    service_tier: Literal["default"] = "default"
    store: bool
    temperature: float
    text: TextConfigEcho
    tool_choice: Literal["auto", "none"]
    tools: list[Any] = []
    top_logprobs: int = 0
    top_p: float
    truncation: Literal["disabled"] = "disabled"
    usage: ResponseUsage | None
    user: str | None
    metadata: dict[str, str]


class ResponseDeleted(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["response"] = "response"
    deleted: bool


class InputItemList(msgspec.Struct, kw_only=True):
    """GET /v1/responses/{id}/input_items: the conversation the response answered (earlier turns included,
    instructions not), newest first unless `order=asc`."""

    object: Literal["list"] = "list"
    data: list[ListedMessage]
    first_id: str | None
    last_id: str | None
    has_more: bool


# --- server-sent events (`event: <type>` + `data: <the event>`), numbered by sequence_number ---------------


class ResponseCreated(msgspec.Struct, kw_only=True, tag="response.created", tag_field="type"):
    response: ResponseObject
    sequence_number: int


class ResponseInProgress(msgspec.Struct, kw_only=True, tag="response.in_progress", tag_field="type"):
    response: ResponseObject
    sequence_number: int


class ResponseCompleted(msgspec.Struct, kw_only=True, tag="response.completed", tag_field="type"):
    response: ResponseObject
    sequence_number: int


class ResponseIncomplete(msgspec.Struct, kw_only=True, tag="response.incomplete", tag_field="type"):
    response: ResponseObject
    sequence_number: int


class ResponseFailed(msgspec.Struct, kw_only=True, tag="response.failed", tag_field="type"):
    response: ResponseObject
    sequence_number: int


class OutputItemAdded(msgspec.Struct, kw_only=True, tag="response.output_item.added", tag_field="type"):
    output_index: int
    item: OutputMessage
    sequence_number: int


class OutputItemDone(msgspec.Struct, kw_only=True, tag="response.output_item.done", tag_field="type"):
    output_index: int
    item: OutputMessage
    sequence_number: int


class ContentPartAdded(msgspec.Struct, kw_only=True, tag="response.content_part.added", tag_field="type"):
    item_id: str
    output_index: int
    content_index: int
    part: OutputText
    sequence_number: int


class ContentPartDone(msgspec.Struct, kw_only=True, tag="response.content_part.done", tag_field="type"):
    item_id: str
    output_index: int
    content_index: int
    part: OutputText
    sequence_number: int


class OutputTextDelta(msgspec.Struct, kw_only=True, tag="response.output_text.delta", tag_field="type"):
    item_id: str
    output_index: int
    content_index: int
    delta: str
    logprobs: list[Any] = []
    sequence_number: int


class OutputTextDone(msgspec.Struct, kw_only=True, tag="response.output_text.done", tag_field="type"):
    item_id: str
    output_index: int
    content_index: int
    text: str
    logprobs: list[Any] = []
    sequence_number: int


class ResponseError(msgspec.Struct, kw_only=True, tag="error", tag_field="type"):
    """An error after the stream started (OpenAI's `error` event; a `response.failed` event follows)."""

    code: str | None
    message: str
    param: str | None
    sequence_number: int


ResponseStreamEvent = (
    ResponseCreated
    | ResponseInProgress
    | OutputItemAdded
    | ContentPartAdded
    | OutputTextDelta
    | OutputTextDone
    | ContentPartDone
    | OutputItemDone
    | ResponseCompleted
    | ResponseIncomplete
    | ResponseFailed
    | ResponseError
)
