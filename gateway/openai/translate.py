"""OpenAI requests -> internal GenerateRequests (one per choice), and the facts the response needs.

Defaults are the spec's for /v1/chat/completions (max_tokens 256, temperature 0.7, top_p 0.9,
repetition_penalty 1.0); /v1/completions shares them except max_tokens, which is 16 as in OpenAI and vLLM.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from gateway.core import GatewayCore
from gateway.generation import new_trace_id
from gateway.openai.errors import bad_request
from gateway.openai.protocol import (
    MAX_CHOICES,
    ChatCompletionRequest,
    CompletionRequest,
    Message,
    ResponseFormatJsonObject,
    ResponseFormatJsonSchema,
    _Sampling,
)
from schemas.errors import CyError, ErrorCode, ErrorDetail
from schemas.inference import ChatMessage, GenerateRequest, GenerationParams, Metadata

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
    "logprobs": (_falsy, "log probabilities are not returned by this server"),
    "top_logprobs": (_falsy, "log probabilities are not returned by this server"),
    "logit_bias": (_falsy, "logit_bias is not supported by the engine"),
    "tools": (_falsy, "tool calling is not supported by this server"),
    "functions": (_falsy, "function calling is not supported by this server"),
    "tool_choice": (lambda v: v in (None, "none", "auto"), "tool calling is not supported by this server"),
    "function_call": (lambda v: v in (None, "none", "auto"), "function calling is not supported by this server"),
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
    "logprobs": (lambda v: v is None or v is False, "log probabilities are not returned by this server"),
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


def _params(body: _Sampling, max_new_tokens: int) -> GenerationParams:
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
    )


def _seeded(params: GenerationParams, i: int) -> GenerationParams:
    """Choice i of n: its own seed derived from the request's (choice 0 keeps it, so n=1 and n>1 agree)."""
    if params.seed is None or i == 0:
        return params
    return msgspec.structs.replace(params, seed=(params.seed + i) % _SEED_SPACE)


def _metadata(user: str | None, tags: dict[str, str] | None) -> Metadata:
    """`user` is OpenAI's end-user id: the player. `metadata` may carry the /api/v1 metadata fields."""
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
        if m.role in ("tool", "function") or m.tool_calls or m.function_call:
            raise bad_request(
                f"messages[{i}]",
                "tool and function messages are not supported by this server.",
                code="unsupported_parameter",
            )
        # "developer" is OpenAI's newer name for the system turn; templates know "system".
        role = "system" if m.role == "developer" else m.role
        turns.append(ChatMessage(role=role, content=_content(m, i)))
    return turns


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
    max_new = body.max_completion_tokens or body.max_tokens or CHAT_MAX_TOKENS
    return _fan_out(
        core, "chatcmpl", body, [("", messages)], _params(body, max_new), _metadata(body.user, body.metadata)
    )


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
    params = _params(body, body.max_tokens or COMPLETION_MAX_TOKENS)
    return _fan_out(
        core,
        "cmpl",
        body,
        [(p, None) for p in prompts],
        params,
        _metadata(body.user, None),
        echo=prompts if body.echo else None,
    )


def finish_reason(internal: str | None) -> str:
    """The worker's finish reason in OpenAI's vocabulary ("length" when max_tokens or the context ran out)."""
    return "length" if internal == "length" else "stop"
