"""Stored OpenAI responses (/v1/responses): the record a `previous_response_id` continues from.

One record per response id in the JetStream KV bucket `subjects.RESPONSES_BUCKET` (MessagePack), written by the
gateway once a response has finished and kept for the bucket's TTL, so a conversation survives gateway restarts
and is shared by every gateway. A record holds the whole conversation so far, not a link to the previous one: one
read rebuilds it, and deleting an earlier response does not break the later ones.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

Role = Literal["user", "system", "developer", "assistant"]


class Item(msgspec.Struct, kw_only=True):
    """One message of a conversation. `content` holds its text parts, as sent (the chat template reads them
    joined by a newline, as /v1/chat/completions joins text parts)."""

    id: str  # `msg_<hex>`: the client's for an item it sent with an id, else given here
    role: Role
    content: list[str]


class StoredResponse(msgspec.Struct, kw_only=True):
    """A finished response (completed, or incomplete when it ran out of tokens) and its conversation.

    The next turn's conversation is `conversation + [output]`; `instructions` are not part of it (as OpenAI: a
    new turn brings its own). The other fields are what a retrieve echoes back.
    """

    id: str  # `resp_<hex>`
    created_at: int  # unix seconds
    completed_at: int
    model: str  # as the client named it
    status: Literal["completed", "incomplete"]
    # The model's input without the instructions: earlier turns' items, then this turn's input items.
    conversation: list[Item]
    output: Item
    input_tokens: int
    output_tokens: int
    instructions: str | None = None
    previous_response_id: str | None = None
    # Routes every turn of a conversation to the worker that cached its prefix: the client's prompt_cache_key,
    # else the id of the conversation's first response.
    session: str = ""
    incomplete_reason: str = ""  # "max_output_tokens" when status is incomplete
    temperature: float = 1.0
    top_p: float = 1.0
    max_output_tokens: int | None = None
    # The request's `text.format` as JSON ({} = plain text).
    text_format: dict[str, Any] = {}
    metadata: dict[str, str] = {}
    user: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    safety_identifier: str | None = None
    tool_choice: str = "auto"
    parallel_tool_calls: bool = True
    max_tool_calls: int | None = None
    # Of input_tokens, those the engine served from its prefix cache (0 in records stored before this field).
    cached_tokens: int = 0


response_decoder = msgspec.msgpack.Decoder(StoredResponse)
