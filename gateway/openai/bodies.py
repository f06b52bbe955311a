"""The response bodies of /v1/chat/completions and /v1/completions: whole answers and SSE chunks.

Tool calls (gateway/openai/tool_calls.py) and log probabilities are shaped here: chat logprobs as
`{"content": [{token, logprob, bytes, top_logprobs}], "refusal": null}`, legacy completions as
`{tokens, token_logprobs, top_logprobs, text_offset}`. A streamed chunk carries the logprobs of the tokens
whose text it brings.
"""

from __future__ import annotations

from typing import Any, Protocol

from gateway.generation import Outcome
from gateway.openai import tool_calls
from gateway.openai.choices import Choices
from gateway.openai.tool_calls import HermesStream
from gateway.openai.translate import Plan, finish_reason
from schemas.inference import TokenChunk, TokenLogprob, ToolCall

# --- log probabilities ---------------------------------------------------------------------------------


def _bytes(token: str) -> list[int]:
    return list(token.encode("utf-8"))


def chat_logprobs(entries: list[TokenLogprob]) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": e.token,
                "logprob": e.logprob,
                "bytes": _bytes(e.token),
                "top_logprobs": [{"token": t.token, "logprob": t.logprob, "bytes": _bytes(t.token)} for t in e.top],
            }
            for e in entries
        ],
        "refusal": None,
    }


def completion_logprobs(entries: list[TokenLogprob], offset: int = 0) -> dict[str, Any]:
    """`offset`: where the first token's text starts in the choice's text (streaming goes on from there)."""
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e.token)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{t.token: t.logprob for t in e.top} for e in entries],
        "text_offset": offsets,
    }


# --- whole answers -----------------------------------------------------------------------------------------


def _call_json(call: ToolCall) -> dict[str, Any]:
    return {
        "id": call.id,
        "type": "function",
        "function": {"name": call.function.name, "arguments": call.function.arguments},
    }


def _chat_choice(plan: Plan, i: int, o: Outcome) -> dict[str, Any]:
    text = "".join(o.text)
    message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
    called = False
    if plan.tools.active:
        parsed = tool_calls.parse(plan.tools, text)
        if parsed.calls:
            called = True
            message["content"] = parsed.content if parsed.content.strip() else None
            message["tool_calls"] = [_call_json(c) for c in parsed.calls]
    return {
        "index": i,
        "message": message,
        "logprobs": chat_logprobs(o.logprobs) if plan.logprobs else None,
        "finish_reason": finish_reason(o.finish_reason, called),
    }


def _body(
    plan: Plan, object_: str, created: int, choices: list[dict[str, Any]], usage: dict[str, Any]
) -> dict[str, Any]:
    return {
        "id": plan.id,
        "object": object_,
        "created": created,
        "model": plan.model,
        "system_fingerprint": None,
        "choices": choices,
        "usage": usage,
    }


def chat_body(plan: Plan, choices: Choices, created: int) -> dict[str, Any]:
    answers = [_chat_choice(plan, i, o) for i, o in enumerate(choices.outcomes)]
    return _body(plan, "chat.completion", created, answers, choices.usage(plan.n))


def completion_body(plan: Plan, choices: Choices, created: int) -> dict[str, Any]:
    answers = [
        {
            "index": i,
            "text": (plan.echo[i] if plan.echo else "") + "".join(o.text),
            "logprobs": completion_logprobs(o.logprobs) if plan.logprobs else None,
            "finish_reason": finish_reason(o.finish_reason),
        }
        for i, o in enumerate(choices.outcomes)
    ]
    return _body(plan, "text_completion", created, answers, choices.usage(plan.n))


# --- SSE chunks -------------------------------------------------------------------------------------------


class Chunks(Protocol):
    """The SSE chunk shapes of one endpoint; `content` and `finish` may give several chunks or none."""

    def opening(self, i: int) -> dict[str, Any] | None: ...
    def content(self, i: int, reply: TokenChunk) -> list[dict[str, Any]]: ...
    def finish(self, i: int, internal_reason: str) -> list[dict[str, Any]]: ...
    def usage(self, usage: dict[str, Any]) -> dict[str, Any]: ...


class _Chunks:
    object = ""

    def __init__(self, plan: Plan, created: int) -> None:
        self.plan = plan
        self.created = created

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.plan.id,
            "object": self.object,
            "created": self.created,
            "model": self.plan.model,
            "system_fingerprint": None,
            "choices": choices,
        }
        if self.plan.include_usage:
            out["usage"] = None  # as OpenAI: null on every chunk but the last one
        return out

    def usage(self, usage: dict[str, Any]) -> dict[str, Any]:
        return {**self._chunk([]), "usage": usage}


class _ChatChoiceStream:
    """One choice's tool-call state while streaming."""

    def __init__(self, plan: Plan) -> None:
        self.tools = plan.tools
        self.hermes = HermesStream(plan.tools.names) if plan.tools.mode == "auto" else None
        self.sent_calls = 0
        self.forced_id = ""  # named: the call's id once its first delta is out
        self.buffer = ""  # required: the JSON array, parsed at the end

    def deltas(self, text: str) -> list[dict[str, Any]]:
        """Content and tool-call deltas for new text (in order)."""
        if self.tools.mode == "named":
            if not text and self.forced_id:
                return []
            function: dict[str, Any] = {"arguments": text}
            call: dict[str, Any] = {"index": 0, "function": function}
            if not self.forced_id:
                self.forced_id = tool_calls.new_call_id()
                call.update(id=self.forced_id, type="function")
                function["name"] = self.tools.forced
            return [{"tool_calls": [call]}]
        if self.tools.mode == "required":
            self.buffer += text
            return []
        if self.hermes is None:
            return [{"content": text}] if text else []
        out = []
        if content := self.hermes.feed(text):
            out.append({"content": content})
        out.extend(self._new_calls())
        return out

    def _new_calls(self) -> list[dict[str, Any]]:
        assert self.hermes is not None
        out = []
        for call in self.hermes.calls[self.sent_calls :]:
            out.append({"tool_calls": [{"index": self.sent_calls, **_call_json(call)}]})
            self.sent_calls += 1
        return out

    def closing(self) -> tuple[list[dict[str, Any]], bool]:
        """The deltas the end of the text still owes, and whether the answer called tools."""
        if self.tools.mode == "named":
            return [], bool(self.forced_id)
        if self.tools.mode == "required":
            parsed = tool_calls.parse(self.tools, self.buffer)
            if not parsed.calls:
                return ([{"content": parsed.content}] if parsed.content else []), False
            return [{"tool_calls": [{"index": k, **_call_json(c)}]} for k, c in enumerate(parsed.calls)], True
        if self.hermes is None:
            return [], False
        rest = self.hermes.flush()
        return ([{"content": rest}] if rest else []), self.sent_calls > 0


class ChatChunks(_Chunks):
    object = "chat.completion.chunk"

    def __init__(self, plan: Plan, created: int) -> None:
        super().__init__(plan, created)
        self._choices = [_ChatChoiceStream(plan) for _ in plan.requests]

    def _delta(
        self, i: int, delta: dict[str, Any], reason: str | None = None, logprobs: list[TokenLogprob] | None = None
    ) -> dict[str, Any]:
        lp = chat_logprobs(logprobs) if self.plan.logprobs and logprobs is not None else None
        return self._chunk([{"index": i, "delta": delta, "logprobs": lp, "finish_reason": reason}])

    def opening(self, i: int) -> dict[str, Any]:
        return self._delta(i, {"role": "assistant", "content": ""})

    def content(self, i: int, reply: TokenChunk) -> list[dict[str, Any]]:
        deltas = self._choices[i].deltas(reply.chunk)
        if not deltas and reply.logprobs and self.plan.logprobs:
            deltas = [{"content": ""}]  # the text is held back (a tool call forming): its logprobs still go
        # The chunk's logprobs ride on its first delta.
        return [self._delta(i, d, logprobs=reply.logprobs if k == 0 else None) for k, d in enumerate(deltas)]

    def finish(self, i: int, internal_reason: str) -> list[dict[str, Any]]:
        deltas, called = self._choices[i].closing()
        return [self._delta(i, d) for d in deltas] + [self._delta(i, {}, finish_reason(internal_reason, called))]


class TextChunks(_Chunks):
    object = "text_completion"  # OpenAI streams legacy completions with the same object name

    def __init__(self, plan: Plan, created: int) -> None:
        super().__init__(plan, created)
        self._offsets = [0] * len(plan.requests)

    def _text(
        self, i: int, text: str, reason: str | None = None, logprobs: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        return self._chunk([{"index": i, "text": text, "logprobs": logprobs, "finish_reason": reason}])

    def opening(self, i: int) -> dict[str, Any] | None:
        return self._text(i, self.plan.echo[i]) if self.plan.echo else None

    def content(self, i: int, reply: TokenChunk) -> list[dict[str, Any]]:
        logprobs = None
        if self.plan.logprobs:
            logprobs = completion_logprobs(reply.logprobs, self._offsets[i])
            self._offsets[i] += sum(len(e.token) for e in reply.logprobs)
        elif not reply.chunk:
            return []
        return [self._text(i, reply.chunk, logprobs=logprobs)]

    def finish(self, i: int, internal_reason: str) -> list[dict[str, Any]]:
        return [self._text(i, "", finish_reason(internal_reason))]
