"""Request bodies of the Lite API, in OpenAI's field names (snake_case), decoded and range-checked by msgspec.

Every field OpenAI documents for these endpoints is declared, so an unknown field is a typo or a feature
this server does not have: the decoder refuses it (400) instead of ignoring it. Fields the engine cannot
honour are declared loosely (`Any`) and refused with a clear 400 by `translate.refuse_unsupported` unless
they hold their "off" value (clients such as LangChain send `logit_bias: {}`, `functions: []` ...).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

MAX_CHOICES = 16  # n (x prompts for /v1/completions): each is a separate generation on the workers
MAX_STOPS = 16

ModelName = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
Temperature = Annotated[float, msgspec.Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
Penalty = Annotated[float, msgspec.Meta(ge=-2.0, le=2.0)]
MaxTokens = Annotated[int, msgspec.Meta(ge=1, le=32768)]
Choices = Annotated[int, msgspec.Meta(ge=1, le=MAX_CHOICES)]
Stop = str | Annotated[list[str], msgspec.Meta(max_length=MAX_STOPS)] | None


class StreamOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    include_usage: bool = False
    # OpenAI pads deltas against length side channels; there is nothing to pad here (accepted, no effect).
    include_obfuscation: bool | None = None


class ContentPart(msgspec.Struct, kw_only=True):
    """One part of a message's content. Only "text" parts are usable; others are refused in translate."""

    type: str
    text: str | None = None


Role = Literal["system", "developer", "user", "assistant", "tool", "function"]
FunctionName = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern="^[A-Za-z0-9_-]+$")]


class MessageToolCallFunction(msgspec.Struct, kw_only=True):
    name: str
    arguments: str  # JSON text


class MessageToolCall(msgspec.Struct, kw_only=True):
    """A tool call of an earlier assistant turn, sent back with the conversation."""

    id: str
    type: Literal["function"] = "function"
    function: MessageToolCallFunction


class Message(msgspec.Struct, kw_only=True):
    role: Role
    content: str | list[ContentPart] | None = None
    # Accepted (LangChain, AutoGen send it); passed to the chat template for "tool" turns.
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None
    function_call: Any = None
    tool_call_id: str | None = None
    refusal: str | None = None


class FunctionDefinition(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: FunctionName
    description: str | None = None
    # The arguments' JSON Schema (none: a function without arguments).
    parameters: dict[str, Any] | None = None
    # Accepted; forced calls (tool_choice "required" or named) follow the schema either way.
    strict: bool | None = None


class ToolDefinition(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: str


class NamedToolChoice(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """`{"type": "function", "function": {"name": ...}}`: call this function (constrained decoding)."""

    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class JsonSchemaFormat(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern="^[A-Za-z0-9_-]+$")]
    description: str | None = None
    # The JSON Schema the output must follow (none: any JSON object).
    schema: dict[str, Any] | None = None
    # Accepted; the output is constrained by the schema either way (decoding follows its grammar).
    strict: bool | None = None


class ResponseFormatText(msgspec.Struct, tag="text", tag_field="type", forbid_unknown_fields=True):
    """Free text (the default)."""


class ResponseFormatJsonObject(msgspec.Struct, tag="json_object", tag_field="type", forbid_unknown_fields=True):
    """Any JSON object (constrained decoding)."""


class ResponseFormatJsonSchema(msgspec.Struct, tag="json_schema", tag_field="type", forbid_unknown_fields=True):
    """JSON valid against `json_schema.schema` (constrained decoding)."""

    json_schema: JsonSchemaFormat


ResponseFormat = ResponseFormatText | ResponseFormatJsonObject | ResponseFormatJsonSchema


class _Sampling(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """What both POST routes share: model, sampling, stop, streaming, and OpenAI's bookkeeping fields."""

    model: ModelName = "default"
    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: Choices | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: Stop = None
    seed: int | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    user: Annotated[str, msgspec.Meta(max_length=256)] | None = None
    # Extensions sent by vLLM-style clients (`extra_body`); repetition_penalty is in the spec.
    repetition_penalty: Annotated[float, msgspec.Meta(gt=0.0, le=10.0)] | None = None
    top_k: Annotated[int, msgspec.Meta(ge=-1)] | None = None
    # Structured output (OpenAI's chat field; vLLM accepts it on /v1/completions too).
    response_format: ResponseFormat | None = None
    # Recognised, refused unless "off" (see translate.refuse_unsupported).
    logit_bias: Any = None


class ChatCompletionRequest(_Sampling, kw_only=True, forbid_unknown_fields=True):
    messages: list[Message]
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    # Caller tags; tenant/playerId/locale/traceId travel to the worker like /api/v1 metadata.
    metadata: dict[str, str] | None = None
    # Bookkeeping that does not change what is generated: accepted, no effect.
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    prompt_cache_options: Any = None
    safety_identifier: str | None = None
    # Tool calling: tools the model may call; tool_choice "none" | "auto" (default with tools) | "required"
    # | a named function (the last two by constrained decoding); parallel_tool_calls false: at most one call.
    tools: Annotated[list[ToolDefinition], msgspec.Meta(max_length=128)] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # Log probabilities of the generated tokens and the top_logprobs most likely alternatives per token.
    logprobs: bool | None = None
    top_logprobs: Annotated[int, msgspec.Meta(ge=0, le=20)] | None = None
    # Recognised, refused unless "off".
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    web_search_options: Any = None
    moderation: Any = None
    store: Any = None


class CompletionRequest(_Sampling, kw_only=True, forbid_unknown_fields=True):
    # A string or a list of strings (token-id prompts are refused in translate with a clear message).
    prompt: Any
    max_tokens: MaxTokens | None = None
    echo: bool | None = None
    # The log probabilities of each generated token and of this many most likely alternatives (0..20).
    logprobs: Annotated[int, msgspec.Meta(ge=0, le=20)] | bool | None = None
    # Recognised, refused unless "off".
    best_of: Any = None
    suffix: Any = None


# --- Response shapes ------------------------------------------------------------------------------------
# The routes build these bodies as dicts; these structs describe them for the OpenAPI document
# (gateway/openai/openapi.py) and tests/gateway/test_openapi_fuzz.py checks live responses against them.
# A field typed `X | UnsetType` is left out of the body when it has no value.


class OpenAIErrorInfo(msgspec.Struct, kw_only=True):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIError(msgspec.Struct, kw_only=True):
    """OpenAI's error shape, used by every error of this app (also SSE error events)."""

    error: OpenAIErrorInfo


class PromptTokensDetails(msgspec.Struct, kw_only=True):
    # Prompt tokens whose KV came from the engine's prefix cache (0 for an engine without one).
    cached_tokens: int = 0


class Usage(msgspec.Struct, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = msgspec.field(default_factory=PromptTokensDetails)


FinishReason = Literal["stop", "length", "tool_calls"]


class ResponseToolCallFunction(msgspec.Struct, kw_only=True):
    name: str
    arguments: str  # JSON text


class ResponseToolCall(msgspec.Struct, kw_only=True):
    id: str
    type: Literal["function"]
    function: ResponseToolCallFunction


class AssistantMessage(msgspec.Struct, kw_only=True):
    """`content` is null when the answer is only tool calls."""

    role: Literal["assistant"]
    content: str | None
    refusal: None
    tool_calls: list[ResponseToolCall] | msgspec.UnsetType = msgspec.UNSET


class TopLogprob(msgspec.Struct, kw_only=True):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(msgspec.Struct, kw_only=True):
    """One generated token: its text, log probability, UTF-8 bytes, and the most likely alternatives."""

    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(msgspec.Struct, kw_only=True):
    content: list[TokenLogprob] | None
    refusal: None


class ChatChoice(msgspec.Struct, kw_only=True):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None
    finish_reason: FinishReason


class ChatCompletion(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: None
    choices: list[ChatChoice]
    usage: Usage


class CompletionLogprobs(msgspec.Struct, kw_only=True):
    """The legacy completions shape: per generated token its text, log probability, the `logprobs` most
    likely alternatives ({token: logprob}) and its character offset in the choice's text."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class TextChoice(msgspec.Struct, kw_only=True):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason | None


class Completion(msgspec.Struct, kw_only=True):
    """The /v1/completions answer; its SSE chunks have the same shape (a `finish_reason` of null until the
    last chunk of a choice, `usage` null on every chunk but the last when `stream_options.include_usage`)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: None
    choices: list[TextChoice]
    usage: Usage | msgspec.UnsetType | None = msgspec.UNSET


class DeltaToolCallFunction(msgspec.Struct, kw_only=True):
    name: str | msgspec.UnsetType = msgspec.UNSET
    arguments: str


class DeltaToolCall(msgspec.Struct, kw_only=True):
    """A tool call streamed in pieces: the first delta of call `index` has its id, type and name; the
    `arguments` of all its deltas concatenate to the JSON text."""

    index: int
    id: str | msgspec.UnsetType = msgspec.UNSET
    type: Literal["function"] | msgspec.UnsetType = msgspec.UNSET
    function: DeltaToolCallFunction


class ChatDelta(msgspec.Struct, kw_only=True):
    role: Literal["assistant"] | msgspec.UnsetType = msgspec.UNSET
    content: str | msgspec.UnsetType = msgspec.UNSET
    tool_calls: list[DeltaToolCall] | msgspec.UnsetType = msgspec.UNSET


class ChatChunkChoice(msgspec.Struct, kw_only=True):
    index: int
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None
    finish_reason: FinishReason | None


class ChatCompletionChunk(msgspec.Struct, kw_only=True):
    """One SSE event of a streamed /v1/chat/completions."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    system_fingerprint: None
    choices: list[ChatChunkChoice]
    usage: Usage | msgspec.UnsetType | None = msgspec.UNSET


class ModelCard(msgspec.Struct, kw_only=True):
    """OpenAI's model object plus vLLM's `root`, `parent` (an adapter's base) and `max_model_len`."""

    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    parent: str | None
    max_model_len: int
    status: str


class ModelCardList(msgspec.Struct, kw_only=True):
    object: Literal["list"]
    data: list[ModelCard]


class Liveness(msgspec.Struct, kw_only=True):
    status: Literal["ok"]


class Readiness(msgspec.Struct, kw_only=True):
    status: Literal["ready", "not_ready"]
    model: str
    model_status: str


# --- /v1/files ------------------------------------------------------------------------------------------


class FileObject(msgspec.Struct, kw_only=True):
    """OpenAI's file object (only `fine-tune` files; validated on upload, so always `processed`)."""

    id: str
    object: Literal["file"]
    bytes: int
    created_at: int
    filename: str
    purpose: Literal["fine-tune"]
    status: Literal["processed"]
    status_details: None
    expires_at: None


class FileList(msgspec.Struct, kw_only=True):
    object: Literal["list"]
    data: list[FileObject]
    has_more: bool
    first_id: str | None
    last_id: str | None


class FileDeleted(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["file"]
    deleted: bool


# --- /v1/fine_tuning/jobs -------------------------------------------------------------------------------


class FineTuningHyperparameters(msgspec.Struct, kw_only=True):
    """The values the job trains with ("auto" resolved)."""

    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float


class FineTuningSupervised(msgspec.Struct, kw_only=True):
    hyperparameters: FineTuningHyperparameters


class FineTuningMethod(msgspec.Struct, kw_only=True):
    type: Literal["supervised"]
    supervised: FineTuningSupervised


class FineTuningJobError(msgspec.Struct, kw_only=True):
    code: str
    message: str
    param: None


class FineTuningJob(msgspec.Struct, kw_only=True):
    """OpenAI's fine-tuning job object; `status` also `paused` (OpenAI's pause/resume). `fine_tuned_model`
    (the adapter's name, usable as `model`) is set once the job has succeeded."""

    id: str
    object: Literal["fine_tuning.job"]
    created_at: int
    error: FineTuningJobError | None
    fine_tuned_model: str | None
    finished_at: int | None
    hyperparameters: FineTuningHyperparameters
    model: str
    organization_id: str
    result_files: list[str]
    seed: int
    status: Literal["queued", "running", "paused", "succeeded", "failed", "cancelled"]
    trained_tokens: None
    training_file: str
    validation_file: None
    estimated_finish: int | None
    integrations: list[dict[str, Any]]
    metadata: None
    method: FineTuningMethod


class FineTuningJobList(msgspec.Struct, kw_only=True):
    object: Literal["list"]
    data: list[FineTuningJob]
    has_more: bool


class FineTuningMetrics(msgspec.Struct, kw_only=True):
    step: int
    total_steps: int
    train_loss: float | None
    learning_rate: float | None


class FineTuningEvent(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["fine_tuning.job.event"]
    created_at: int
    level: Literal["info", "error"]
    message: str
    data: FineTuningMetrics | None
    type: Literal["message", "metrics"]


class FineTuningEventList(msgspec.Struct, kw_only=True):
    """Newest first."""

    object: Literal["list"]
    data: list[FineTuningEvent]
    has_more: bool
