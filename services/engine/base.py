"""What the worker needs from an engine; each engine module implements it and translates its errors."""

from __future__ import annotations

import abc
import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec

from schemas.errors import CyError, ErrorCode
from schemas.inference import FinishReason, GenerateRequest, GenerationParams, TokenLogprob
from services.engine import tool_prompt


class EngineDown(CyError):
    """The engine cannot run requests now (its process died, or is being restarted). Raised by `generate`;
    retryable: a request that has produced no text yet is handed back to the queue by the worker."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.INTERNAL_ERROR, message, retryable=True)


class TokenStep(msgspec.Struct):
    """New token ids from the engine; `finish_reason` is set on the last step of a sequence.

    `logprobs` (when the request asked for them): one entry per token id, its `token` text still empty
    (the worker fills it in). `cached_tokens` (on a sequence's first step): how many of its prompt tokens
    came from the engine's prefix cache.
    """

    token_ids: list[int]
    finish_reason: FinishReason | None = None
    logprobs: list[TokenLogprob] | None = None
    cached_tokens: int = 0


class EngineStats(msgspec.Struct, frozen=True, kw_only=True):
    """What an engine knows about its KV cache and its queue, for the worker's metrics (services/metrics.py).
    None: the engine does not measure it."""

    # Prompt tokens looked up in the prefix cache since the engine started, and how many of them were found.
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    # Fraction (0-1) of the KV cache that running sequences hold.
    kv_cache_usage: float | None = None
    # Requests the engine holds but did not run in its last step (waiting for KV blocks or prefill budget).
    waiting: int | None = None


class StepInbox:
    """Token steps handed from an engine's own thread to the coroutine that streams them.

    Create it on the event loop; `put` may be called from any thread and returns False once the loop is gone
    (nobody is listening any more: the engine should drop the sequence).
    """

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[TokenStep | BaseException] = asyncio.Queue()

    def put(self, item: TokenStep | BaseException) -> bool:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:
            return False
        return True

    async def steps(self, translate: Callable[[BaseException], BaseException]) -> AsyncIterator[TokenStep]:
        """Yield steps until the one with a finish reason; an error put by the engine is raised as translated."""
        while True:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                raise translate(item)
            yield item
            if item.finish_reason is not None:
                return


class Engine(abc.ABC):
    """One loaded base model (plus its adapters) serving many concurrent sequences."""

    name: str
    device: str
    max_model_len: int
    slots: int
    tokenizer: Any

    @abc.abstractmethod
    async def start(self) -> None:
        """Load the model. Raises CyError(INSUFFICIENT_RESOURCES/INTERNAL_ERROR) when it cannot."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @property
    def available(self) -> bool:
        """Whether the engine can take a request now (False while its process restarts: the worker stops
        pulling, so another worker serves the queue meanwhile)."""
        return True

    @abc.abstractmethod
    def generate(self, prompt_ids: list[int], params: GenerationParams, adapter: str) -> AsyncIterator[TokenStep]:
        """Stream new tokens. Closing the iterator early aborts the sequence and frees its slot."""

    def stats(self) -> EngineStats:
        """The engine's cache and queue numbers (read from the metrics thread: plain attributes only)."""
        return EngineStats()

    def adapters(self) -> list[str]:
        return []

    def has_adapter(self, name: str) -> bool:
        return name in self.adapters()

    def encode(self, request: GenerateRequest) -> list[int]:
        """Prompt token ids: the chat template for `messages` (with `tools`, tool_prompt.py), the raw text
        for `prompt`.

        Raises CyError(INVALID_REQUEST) for an empty prompt or one that leaves no room to generate.
        """
        if request.messages:
            template = getattr(self.tokenizer, "chat_template", None)
            if not template:
                raise CyError(ErrorCode.INVALID_REQUEST, "this model has no chat template; send `prompt`")
            tools = None
            if tool_prompt.template_knows_tools(template):
                conversation, tools = tool_prompt.native(request.messages, request.tools)
            else:
                conversation = tool_prompt.hermes(request.messages, request.tools)
            ids = self.tokenizer.apply_chat_template(
                conversation, tools=tools, add_generation_prompt=True, tokenize=True, return_dict=False
            )
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            ids = list(ids)
        elif request.prompt:
            ids = list(self.tokenizer(request.prompt, add_special_tokens=False)["input_ids"])
        else:
            raise CyError(ErrorCode.INVALID_REQUEST, "the request has neither `prompt` nor `messages`")
        if len(ids) >= self.max_model_len:
            raise CyError(
                ErrorCode.INVALID_REQUEST,
                f"the prompt has {len(ids)} tokens; this model's context is {self.max_model_len} tokens",
            )
        return ids
