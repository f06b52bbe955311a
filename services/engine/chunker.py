"""Engine token steps -> the TokenChunks a reply stream carries: detokenized, cut at stop strings, grouped.

The first chunk goes out as soon as there is text (time to first token), then one every `chunk_size`
tokens, and a last one with the finish reason. Stop strings end the text before them (the stop text is
not returned). Log probabilities, when the engine gives them, travel with the chunk of their tokens, each
with its token's text. Pure bookkeeping: no NATS, no engine (tests/engine/test_chunker.py).
"""

from __future__ import annotations

from typing import Any

from schemas.inference import FinishReason, TokenChunk, TokenLogprob
from services.engine.base import TokenStep
from services.engine.detokenizer import IncrementalDetokenizer
from services.engine.stops import StopMatcher


class Chunker:
    def __init__(self, trace_id: str, tokenizer: Any, stops: list[str], chunk_size: int, worker_id: str = "") -> None:
        self.trace_id = trace_id
        self.worker_id = worker_id
        self.tokenizer = tokenizer
        self.chunk_size = chunk_size
        self.finish: FinishReason | None = None
        self.completion_tokens = 0
        self.chunks = 0  # chunks handed out so far
        self._detok = IncrementalDetokenizer(tokenizer)
        self._stops = StopMatcher(stops)
        self._text = ""
        self._tokens = 0
        self._logprobs: list[TokenLogprob] = []
        self._token_text: dict[int, str] = {}

    def feed(self, step: TokenStep) -> TokenChunk | None:
        """Fold one engine step in; the chunk to publish now, if any. Once `finish` is set, stop feeding."""
        self.completion_tokens += len(step.token_ids)
        self._tokens += len(step.token_ids)
        if step.logprobs:
            self._logprobs.extend(self._named(e) for e in step.logprobs)
        piece = self._detok.push(step.token_ids)
        if step.finish_reason is not None:
            piece += self._detok.flush()
            self.finish = step.finish_reason
        piece, hit = self._stops.feed(piece)
        if hit:
            self.finish = "stop"
        elif self.finish is not None:
            piece += self._stops.flush()
        self._text += piece
        if self.finish is None and not (self._text and (self.chunks == 0 or self._tokens >= self.chunk_size)):
            return None
        chunk = TokenChunk(
            trace_id=self.trace_id,
            chunk=self._text,
            index=self.chunks,
            token_count=self._tokens,
            end_of_stream=self.finish is not None,
            finish_reason=self.finish,
            logprobs=self._logprobs,
            worker_id=self.worker_id,
        )
        self.chunks += 1
        self._text, self._tokens, self._logprobs = "", 0, []
        return chunk

    def _text_of(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.tokenizer.decode([token_id])
        return text

    def _named(self, entry: TokenLogprob) -> TokenLogprob:
        entry.token = self._text_of(entry.token_id)
        for alternative in entry.top:
            alternative.token = self._text_of(alternative.token_id)
        return entry
