"""OpenAI requests -> internal GenerateRequests (one per choice), and the facts the response needs.

Defaults are the spec's for /v1/chat/completions (max_tokens 256, temperature 0.7, top_p 0.9,
repetition_penalty 1.0); /v1/completions shares them except max_tokens, which is 16 as in OpenAI and vLLM.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from gateway.core import GatewayCore
from gateway.generation import new_trace_id
from gateway.openai import tool_calls
from gateway.openai.errors import bad_request
from gateway.openai.protocol import (
    MAX_CHOICES,
    ChatCompletionRequest,
    CompletionRequest,
    Message,
    NamedToolChoice,
    ResponseFormatJsonObject,
    ResponseFormatJsonSchema,
    _Sampling,
)
from gateway.openai.tool_calls import ToolPlan
from schemas.errors import CyError, ErrorCode, ErrorDetail
from schemas.inference import (
    ChatMessage,
    GenerateRequest,
    GenerationParams,
    Metadata,
    Tool,
    ToolCall,
    ToolCallFunction,
    ToolFunction,
)

CHAT_MAX_TOKENS = 256
COMPLETION_MAX_TOKENS = 16
TEMPERATURE = 0.7
TOP_P = 0.9
_SEED_SPACE = 2**64  # torch generators take seeds in [0, 2**64)


@dataclass(frozen=True)
class Plan:
    """What one HTTP request becomes: `requests[i]` produces choice `i`."""

    id: str
    model: str  # as the client named it (echoed in every response, as OpenAI and vLLM do)
    requests: list[GenerateRequest]
    n: int  # choices per prompt; prompt p owns choices p*n .. p*n+n-1
    stream: bool
    include_usage: bool
    echo: list[str] = field(default_factory=list)  # per choice: text to put before the completion
    tools: ToolPlan = field(default_factory=ToolPlan)
    logprobs: bool = False

    @property
    def adapter(self) -> str:
        return self.requests[0].adapter


# --- model names ---------------------------------------------------------------------------------


def resolve_target(core: GatewayCore, name: str) -> tuple[str, str]:
    """(registry model id, adapter) for an OpenAI `model`: a model id, "default", or an adapter name.

    Raises CyError(MODEL_NOT_FOUND).
    """
    resolved = core.registry.resolve(name)
    if resolved is not None:
        return resolved[0], ""
    pair = core.resolve_adapter(name)
    if pair is not None:
        return pair
    raise CyError(
        ErrorCode.MODEL_NOT_FOUND,
        f"The model `{name}` does not exist (GET /v1/models lists the models and adapters served here).",
        details=[ErrorDetail(type="model_not_found", field="model")],
    )


# --- parameters the engine cannot honour -----------------------------------------------------------


def _none(v: Any) -> bool:
    return v is None


def _falsy(v: Any) -> bool:
    return v is None or v is False or v == 0 or v == [] or v == {} or v == ""


_CHAT_UNSUPPORTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "logit_bias": (_falsy, "logit_bias is not supported by the engine"),
    "functions": (_falsy, "the deprecated `functions` are not supported (send `tools`)"),
    "function_call": (
        lambda v: v in (None, "none", "auto"),
        "the deprecated `function_call` is not supported (send `tool_choice`)",
    ),
    "audio": (_none, "audio output is not supported"),
    "modalities": (lambda v: v is None or v == ["text"], "only the 'text' modality is supported"),
    "prediction": (_none, "predicted outputs are not supported"),
    "reasoning_effort": (lambda v: v in (None, "none"), "the served models are not reasoning models"),
    "verbosity": (_none, "verbosity is not supported"),
    "web_search_options": (_none, "web search is not supported"),
    "moderation": (_none, "moderation is not supported"),
    "store": (_falsy, "completions are not stored by this server"),
}

_COMPLETION_UNSUPPORTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "logit_bias": (_falsy, "logit_bias is not supported by the engine"),
    "best_of": (lambda v: v in (None, 1), "best_of is not supported (use n)"),
    "suffix": (_falsy, "suffix (insertion) is not supported"),
}


def refuse_unsupported(body: Any, table: dict[str, tuple[Callable[[Any], bool], str]]) -> None:
    """Raises CyError(INVALID_REQUEST, code "unsupported_parameter") for the first parameter set to a value
    the engine cannot honour: never silently ignored."""
    for name, (is_off, reason) in table.items():
        if not is_off(getattr(body, name)):
            raise bad_request(name, f"Unsupported parameter '{name}': {reason}.", code="unsupported_parameter")


# --- shared sampling ---------------------------------------------------------------------------------


def _stops(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not s for s in stops):
        raise bad_request("stop", "Invalid 'stop': stop sequences must be non-empty strings.")
    return stops


ANY_OBJECT = '{"type":"object"}'


def _json_schema(body: _Sampling) -> str:
    """The JSON Schema text `response_format` asks for ("" for text)."""
    match body.response_format:
        case ResponseFormatJsonObject():
            return ANY_OBJECT
        case ResponseFormatJsonSchema(json_schema=spec):
            return ANY_OBJECT if spec.schema is None else msgspec.json.encode(spec.schema).decode()
    return ""


def _params(body: _Sampling, max_new_tokens: int, logprobs: tuple[bool, int] = (False, 0)) -> GenerationParams:
    temperature = TEMPERATURE if body.temperature is None else body.temperature
    top_p = TOP_P if body.top_p is None else body.top_p
    if top_p == 0:
        # The nucleus of mass 0 is the single most likely token: greedy decoding (the engine wants 0 < top_p).
        temperature, top_p = 0.0, 1.0
    return GenerationParams(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=max(body.top_k or 0, 0),  # vLLM's -1 means "off", like 0 here
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        seed=None if body.seed is None else body.seed % _SEED_SPACE,
        stop=_stops(body.stop),
        json_schema=_json_schema(body),
        logprobs=logprobs[0],
        top_logprobs=logprobs[1],
    )


def _seeded(params: GenerationParams, i: int) -> GenerationParams:
    """Choice i of n: its own seed derived from the request's (choice 0 keeps it, so n=1 and n>1 agree)."""
    if params.seed is None or i == 0:
        return params
    return msgspec.structs.replace(params, seed=(params.seed + i) % _SEED_SPACE)


def _metadata(user: str | None, tags: dict[str, str] | None, session: str | None = None) -> Metadata:
    """`user` is OpenAI's end-user id: the player. `metadata` may carry the /api/v1 metadata fields.
    `session` (OpenAI's prompt_cache_key) routes the request to the worker that cached its prefix."""
    tags = tags or {}
    if len(tags) > 16 or any(len(k) > 64 or len(v) > 512 for k, v in tags.items()):
        raise bad_request("metadata", "Invalid 'metadata': at most 16 pairs, keys <= 64 and values <= 512 chars.")

    def pick(*keys: str) -> str:
        return next((tags[k] for k in keys if tags.get(k)), "")

    return Metadata(
        trace_id=pick("traceId", "trace_id")[:256],
        tenant=pick("tenant")[:256],
        player_id=(pick("playerId", "player_id") or user or "")[:256],
        locale=pick("locale")[:64],
        session_id=(session or pick("sessionId", "session_id"))[:256],
    )


def _stream_flags(body: _Sampling) -> tuple[bool, bool]:
    stream = bool(body.stream)
    if body.stream_options is not None and not stream:
        raise bad_request("stream_options", "The 'stream_options' parameter is only allowed when 'stream' is enabled.")
    return stream, bool(stream and body.stream_options and body.stream_options.include_usage)


def _fan_out(
    core: GatewayCore,
    prefix: str,
    body: _Sampling,
    inputs: list[tuple[str, list[ChatMessage] | None]],
    params: GenerationParams,
    metadata: Metadata,
    echo: list[str] | None = None,
) -> Plan:
    n = body.n or 1
    if len(inputs) * n > MAX_CHOICES:
        raise bad_request("n", f"Invalid 'n': at most {MAX_CHOICES} choices per request (prompts x n).")
    model_id, adapter = resolve_target(core, body.model)
    stream, include_usage = _stream_flags(body)
    plan_id = new_trace_id(prefix)
    requests = [
        GenerateRequest(
            trace_id=plan_id if len(inputs) * n == 1 else f"{plan_id}-{p * n + i}",
            model_id=model_id,
            prompt=prompt,
            messages=messages,
            adapter=adapter,
            generation=_seeded(params, i),
            metadata=metadata,
        )
        for p, (prompt, messages) in enumerate(inputs)
        for i in range(n)
    ]
    return Plan(
        id=plan_id,
        model=body.model,
        requests=requests,
        n=n,
        stream=stream,
        include_usage=include_usage,
        echo=[text for text in (echo or []) for _ in range(n)],
    )


# --- chat ----------------------------------------------------------------------------------------------


def _content(message: Message, i: int) -> str:
    content = message.content
    if content is None:
        if message.role == "assistant":
            return ""
        raise bad_request(f"messages[{i}].content", f"Missing required parameter: 'messages[{i}].content'.")
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise bad_request(
                f"messages[{i}].content[{j}]",
                f"Unsupported content part type '{part.type}': the served models read text only.",
                code="unsupported_content",
            )
        texts.append(part.text)
    return "\n".join(texts)


def chat_messages(messages: list[Message]) -> list[ChatMessage]:
    """OpenAI messages -> the turns the model's chat template formats. Raises CyError(INVALID_REQUEST)."""
    if not messages:
        raise bad_request("messages", "Invalid 'messages': empty array. Expected at least one message.")
    turns = []
    for i, m in enumerate(messages):
        if m.role == "function" or m.function_call:
            raise bad_request(
                f"messages[{i}]",
                "the deprecated function messages are not supported (send tool_calls and role 'tool').",
                code="unsupported_parameter",
            )
        if m.role == "tool" and not m.tool_call_id:
            raise bad_request(
                f"messages[{i}].tool_call_id", f"Missing required parameter: 'messages[{i}].tool_call_id'."
            )
        if m.tool_calls and m.role != "assistant":
            raise bad_request(f"messages[{i}].tool_calls", "Only assistant messages carry 'tool_calls'.")
        # "developer" is OpenAI's newer name for the system turn; templates know "system".
        role = "system" if m.role == "developer" else m.role
        calls = [
            ToolCall(id=c.id, function=ToolCallFunction(name=c.function.name, arguments=c.function.arguments))
            for c in m.tool_calls or []
        ]
        turns.append(
            ChatMessage(
                role=role,
                content=_content(m, i),
                tool_calls=calls,
                tool_call_id=(m.tool_call_id or "") if role == "tool" else "",
                name=(m.name or "") if role == "tool" else "",
            )
        )
    return turns


def _tools(body: ChatCompletionRequest) -> tuple[ToolPlan, list[Tool]]:
    """The tool plan and the tools to present to the model. Raises CyError(INVALID_REQUEST)."""
    declared = body.tools or []
    choice = body.tool_choice
    names = [t.function.name for t in declared]
    if len(set(names)) != len(names):
        raise bad_request("tools", "Invalid 'tools': function names must be unique.")
    if not declared:
        if choice == "required" or isinstance(choice, NamedToolChoice):
            raise bad_request(
                "tool_choice",
                "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are specified.",
            )
        return ToolPlan(), []
    forced = ""
    if isinstance(choice, NamedToolChoice):
        forced = choice.function.name
        if forced not in names:
            raise bad_request("tool_choice", f"Invalid value for 'tool_choice': function '{forced}' is not in 'tools'.")
    mode: tool_calls.Mode = "named" if forced else "auto" if choice is None else choice  # type: ignore[assignment]
    if mode == "none":
        return ToolPlan(), []
    plan = ToolPlan(mode=mode, names=frozenset(names), forced=forced, parallel=body.parallel_tool_calls is not False)
    tools = [
        Tool(
            function=ToolFunction(
                name=t.function.name, description=t.function.description or "", parameters=t.function.parameters or {}
            )
        )
        for t in declared
    ]
    return plan, tools


def _chat_logprobs(body: ChatCompletionRequest) -> tuple[bool, int]:
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request(
            "top_logprobs", "Invalid value for 'top_logprobs': 'logprobs' must be true to use 'top_logprobs'."
        )
    return bool(body.logprobs), body.top_logprobs or 0


def plan_chat(core: GatewayCore, body: ChatCompletionRequest) -> Plan:
    """Raises CyError: 400 for bad or unsupported parameters, 404 for an unknown model."""
    refuse_unsupported(body, _CHAT_UNSUPPORTED)
    messages = chat_messages(body.messages)
    if isinstance(body.response_format, ResponseFormatJsonObject) and not any(
        "json" in m.content.lower() for m in messages
    ):
        # As OpenAI: without being asked for JSON, a model may emit whitespace until max_tokens.
        raise bad_request(
            "messages",
            "'messages' must contain the word 'json' in some form, to use 'response_format' of type 'json_object'.",
        )
    tool_plan, tools = _tools(body)
    params = _params(body, body.max_completion_tokens or body.max_tokens or CHAT_MAX_TOKENS, _chat_logprobs(body))
    if forcing := tool_calls.forcing_schema(tool_plan, {t.function.name: t.function.parameters for t in tools}):
        if params.json_schema:
            raise bad_request(
                "response_format",
                "'response_format' cannot be combined with a 'tool_choice' that forces a call "
                "(the call's arguments follow the function's schema).",
            )
        params = msgspec.structs.replace(params, json_schema=forcing)
    plan = _fan_out(
        core, "chatcmpl", body, [("", messages)], params, _metadata(body.user, body.metadata, body.prompt_cache_key)
    )
    for request in plan.requests:
        request.tools = tools
    return dataclasses.replace(plan, tools=tool_plan, logprobs=params.logprobs)


# --- completions -----------------------------------------------------------------------------------------


def completion_prompts(prompt: Any) -> list[str]:
    """A string or a list of strings. Raises CyError(INVALID_REQUEST) for token ids and empty prompts."""
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts:
        raise bad_request("prompt", "Invalid 'prompt': expected a string or a non-empty array of strings.")
    if not all(isinstance(p, str) for p in prompts):
        raise bad_request(
            "prompt", "Invalid 'prompt': token-id prompts are not supported; send text.", code="unsupported_parameter"
        )
    if any(not p for p in prompts):
        raise bad_request("prompt", "Invalid 'prompt': prompts must not be empty.")
    return prompts


def plan_completion(core: GatewayCore, body: CompletionRequest) -> Plan:
    """Raises CyError: 400 for bad or unsupported parameters, 404 for an unknown model."""
    refuse_unsupported(body, _COMPLETION_UNSUPPORTED)
    prompts = completion_prompts(body.prompt)
    logprobs = body.logprobs is not None and body.logprobs is not False
    if logprobs and body.echo:
        raise bad_request(
            "logprobs",
            "Unsupported parameter 'logprobs' with 'echo': prompt log probabilities are not computed by this server.",
            code="unsupported_parameter",
        )
    top = 0 if isinstance(body.logprobs, bool) or body.logprobs is None else body.logprobs
    params = _params(body, body.max_tokens or COMPLETION_MAX_TOKENS, (logprobs, top))
    plan = _fan_out(
        core,
        "cmpl",
        body,
        [(p, None) for p in prompts],
        params,
        _metadata(body.user, None),
        echo=prompts if body.echo else None,
    )
    return dataclasses.replace(plan, logprobs=logprobs)


def finish_reason(internal: str | None, called: bool = False) -> str:
    """The worker's finish reason in OpenAI's vocabulary ("length" when max_tokens or the context ran out,
    "tool_calls" when the answer calls tools)."""
    return "length" if internal == "length" else "tool_calls" if called else "stop"
