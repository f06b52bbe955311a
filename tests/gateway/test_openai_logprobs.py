"""`logprobs` / `top_logprobs` on /v1/chat/completions and `logprobs` on /v1/completions through the official
`openai` package: one entry per generated token, the text they spell, real log probabilities (greedy picks
the most likely token), the same numbers streamed, and clear 400s for what is not computed."""

from __future__ import annotations

import math
from typing import Any

import openai
import pytest
from openai import AsyncOpenAI

HELLO: list[Any] = [{"role": "user", "content": "Hello there"}]


@pytest.fixture
def client(aclient: AsyncOpenAI) -> AsyncOpenAI:
    return aclient


async def test_chat_logprobs_cover_every_token_and_greedy_picks_the_top_alternative(client: AsyncOpenAI) -> None:
    r = await client.chat.completions.create(
        model="tiny", messages=HELLO, max_tokens=10, temperature=0, logprobs=True, top_logprobs=3
    )
    choice = r.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    entries = choice.logprobs.content
    assert r.usage is not None and len(entries) == r.usage.completion_tokens
    if choice.finish_reason == "length":  # an end-of-text token adds no text
        assert "".join(e.token for e in entries) == choice.message.content
    for e in entries:
        assert e.logprob <= 0 and e.bytes == list(e.token.encode())
        assert len(e.top_logprobs) == 3
        tops = [t.logprob for t in e.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        assert math.isclose(e.logprob, tops[0], abs_tol=1e-4)  # greedy: the chosen token is the most likely
        assert sum(math.exp(t) for t in tops) <= 1.0001


async def test_streamed_chat_logprobs_equal_the_whole_answers(client: AsyncOpenAI) -> None:
    args: dict[str, Any] = {"model": "tiny", "messages": HELLO, "max_tokens": 12, "temperature": 0, "logprobs": True}
    whole = await client.chat.completions.create(**args)
    stream = await client.chat.completions.create(**args, stream=True)
    streamed = []
    async for chunk in stream:
        for choice in chunk.choices:
            if choice.logprobs and choice.logprobs.content:
                streamed.extend(choice.logprobs.content)
    assert whole.choices[0].logprobs is not None
    expected = whole.choices[0].logprobs.content or []
    assert [e.token for e in streamed] == [e.token for e in expected]
    assert all(math.isclose(a.logprob, b.logprob, abs_tol=1e-4) for a, b in zip(streamed, expected, strict=True))
    assert all(e.top_logprobs == [] for e in streamed)  # no top_logprobs asked


async def test_sampled_tokens_have_their_own_logprob_under_the_models_distribution(client: AsyncOpenAI) -> None:
    r = await client.chat.completions.create(
        model="tiny", messages=HELLO, max_tokens=16, temperature=1.0, seed=5, logprobs=True, top_logprobs=20
    )
    entries = (r.choices[0].logprobs and r.choices[0].logprobs.content) or []
    assert entries
    for e in entries:
        ranked = {t.token: t.logprob for t in e.top_logprobs}
        if e.token in ranked:  # the sampled token among the 20 most likely: the same number
            assert math.isclose(ranked[e.token], e.logprob, abs_tol=1e-4)
        else:  # else less likely than all of them
            assert e.logprob <= min(ranked.values()) + 1e-4


async def test_legacy_completions_logprobs_have_tokens_offsets_and_alternatives(client: AsyncOpenAI) -> None:
    r = await client.completions.create(
        model="tiny", prompt="Once upon a time", max_tokens=8, temperature=0, logprobs=2
    )
    lp = r.choices[0].logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs and lp.text_offset
    assert r.usage is not None and len(lp.tokens) == r.usage.completion_tokens
    assert len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == len(lp.tokens)
    assert lp.text_offset[0] == 0
    assert all(b - a == len(t) for a, b, t in zip(lp.text_offset, lp.text_offset[1:], lp.tokens, strict=False))
    assert all(len(top) <= 2 and max(top.values()) <= 0 for top in lp.top_logprobs)


async def test_logprobs_are_null_unless_asked(client: AsyncOpenAI) -> None:
    r = await client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=4, temperature=0)
    assert r.choices[0].logprobs is None


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        ("chat", {"messages": HELLO, "top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
        ("chat", {"messages": HELLO, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("completions", {"prompt": "Hi", "logprobs": 2, "echo": True}, "logprobs"),
        ("completions", {"prompt": "Hi", "logprobs": 30}, "logprobs"),
    ],
)
async def test_logprob_requests_that_cannot_be_served_are_400(
    client: AsyncOpenAI, route: str, body: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        if route == "chat":
            await client.chat.completions.create(model="tiny", max_tokens=4, **body)
        else:
            await client.completions.create(model="tiny", max_tokens=4, **body)
    assert caught.value.param == param, caught.value.message
