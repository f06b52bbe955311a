"""/v1/completions (raw prompt in, text out) driven by the official `openai` package."""

from __future__ import annotations

import asyncio
from typing import Any

import openai
import pytest
from openai import AsyncOpenAI, OpenAI
from transformers import AutoTokenizer

from services.models.registry import Registry

PROMPT = "Once upon a time"


def raw_tokens(registry: Registry, text: str) -> int:
    tokenizer = AutoTokenizer.from_pretrained(registry.models["tiny"].model_path)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


async def test_completion_sends_the_prompt_raw_and_defaults_to_16_tokens(
    aclient: AsyncOpenAI, registry: Registry
) -> None:
    r = await aclient.completions.create(model="default", prompt=PROMPT, temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == "default"
    (choice,) = r.choices
    assert choice.index == 0 and choice.text and choice.finish_reason in ("stop", "length")
    assert r.usage is not None and 0 < r.usage.completion_tokens <= 16
    if choice.finish_reason == "length":
        assert r.usage.completion_tokens == 16
    # No chat template: the prompt is exactly the tokens of the text sent.
    assert r.usage.prompt_tokens == raw_tokens(registry, PROMPT)


async def test_streamed_completion_equals_the_non_streamed_one_and_ends_with_usage(sync_client: OpenAI) -> None:
    params: dict[str, Any] = {"model": "default", "prompt": PROMPT, "temperature": 0, "max_tokens": 10}

    def run() -> tuple[Any, list[Any]]:
        full = sync_client.completions.create(**params)
        with sync_client.completions.create(**params, stream=True, stream_options={"include_usage": True}) as stream:
            return full, list(stream)

    full, chunks = await asyncio.to_thread(run)
    assert all(c.object == "text_completion" and c.id == chunks[0].id for c in chunks)
    assert "".join(c.choices[0].text for c in chunks[:-1]) == full.choices[0].text
    assert chunks[-2].choices[0].finish_reason == full.choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == full.usage.model_dump()


async def test_a_list_of_prompts_times_n_gives_prompt_major_choices_and_counts_each_prompt_once(
    aclient: AsyncOpenAI, registry: Registry
) -> None:
    prompts = ["The cat", "A dog and a bird"]
    r = await aclient.completions.create(model="tiny", prompt=prompts, n=2, temperature=0, max_tokens=6)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    single = [(await aclient.completions.create(model="tiny", prompt=p, temperature=0, max_tokens=6)) for p in prompts]
    # Greedy: both choices of a prompt equal that prompt's own completion.
    assert [c.text for c in r.choices] == [single[0].choices[0].text] * 2 + [single[1].choices[0].text] * 2
    assert r.usage is not None
    assert r.usage.prompt_tokens == sum(raw_tokens(registry, p) for p in prompts)
    assert r.usage.completion_tokens == sum(s.usage.completion_tokens for s in single) * 2  # type: ignore[union-attr]


async def test_echo_puts_the_prompt_before_the_completion(aclient: AsyncOpenAI) -> None:
    plain = await aclient.completions.create(model="default", prompt=PROMPT, temperature=0, max_tokens=5)
    echoed = await aclient.completions.create(model="default", prompt=PROMPT, temperature=0, max_tokens=5, echo=True)
    assert echoed.choices[0].text == PROMPT + plain.choices[0].text
    stream = await aclient.completions.create(
        model="default", prompt=PROMPT, temperature=0, max_tokens=5, echo=True, stream=True
    )
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].text == PROMPT
    assert "".join(c.choices[0].text for c in chunks) == echoed.choices[0].text


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"prompt": [1, 2, 3]}, "prompt"),
        ({"prompt": [[1, 2], [3]]}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": PROMPT, "best_of": 3}, "best_of"),
        ({"prompt": PROMPT, "suffix": "the end"}, "suffix"),
        ({"prompt": PROMPT, "logprobs": 2, "echo": True}, "logprobs"),
        ({"prompt": [PROMPT] * 9, "n": 2}, "n"),
    ],
)
async def test_what_the_engine_cannot_do_is_refused_with_a_400_naming_the_parameter(
    aclient: AsyncOpenAI, params: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        await aclient.completions.create(model="default", **params)
    assert err.value.status_code == 400 and err.value.param == param, err.value.body
    assert err.value.type == "invalid_request_error"
