"""Token steps -> reply chunks, without NATS or an engine: the first chunk as soon as there is text, then
every N tokens, stop strings cut the text, and log probabilities travel with their tokens' chunk, named."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from transformers import AutoTokenizer

from schemas.inference import TokenChunk, TokenLogprob, TopLogprob
from services.engine.base import TokenStep
from services.engine.chunker import Chunker
from tests.helpers import real_model_dir


@pytest.fixture(scope="module")
def tokenizer() -> Iterator[object]:
    yield AutoTokenizer.from_pretrained(real_model_dir())


def _run(chunker: Chunker, steps: list[TokenStep]) -> list[TokenChunk]:
    out = []
    for step in steps:
        if (chunk := chunker.feed(step)) is not None:
            out.append(chunk)
        if chunker.finish is not None:
            break
    return out


def test_the_first_chunk_goes_out_at_once_then_every_n_tokens_and_the_last_carries_the_finish(
    tokenizer: object,
) -> None:
    ids = tokenizer.encode(" one two three four five six seven")  # type: ignore[attr-defined]
    steps = [TokenStep([t]) for t in ids[:-1]] + [TokenStep([ids[-1]], "length")]
    chunks = _run(Chunker("t", tokenizer, [], 3), steps)
    assert "".join(c.chunk for c in chunks) == " one two three four five six seven"
    assert chunks[0].token_count == 1 and chunks[0].index == 0
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert sum(c.token_count for c in chunks) == len(ids)
    assert chunks[-1].finish_reason == "length" and chunks[-1].end_of_stream


def test_a_stop_string_ends_the_text_before_it(tokenizer: object) -> None:
    ids = tokenizer.encode(" alpha beta STOP gamma delta")  # type: ignore[attr-defined]
    chunker = Chunker("t", tokenizer, ["STOP"], 2)
    chunks = _run(chunker, [TokenStep([t]) for t in ids])
    assert "".join(c.chunk for c in chunks) == " alpha beta "
    assert chunker.finish == "stop" and chunks[-1].finish_reason == "stop"


def test_logprobs_travel_with_the_chunk_of_their_tokens_with_the_tokens_text(tokenizer: object) -> None:
    ids = tokenizer.encode(" red green blue")  # type: ignore[attr-defined]
    steps = [
        TokenStep(
            [t],
            "length" if k == len(ids) - 1 else None,
            [TokenLogprob(token_id=t, logprob=-0.5, top=[TopLogprob(t, "", -0.5)])],
        )
        for k, t in enumerate(ids)
    ]
    chunks = _run(Chunker("t", tokenizer, [], 2), steps)
    entries = [e for c in chunks for e in c.logprobs]
    assert [len(c.logprobs) for c in chunks] == [c.token_count for c in chunks]
    assert "".join(e.token for e in entries) == " red green blue"
    assert all(e.top[0].token == e.token for e in entries)
