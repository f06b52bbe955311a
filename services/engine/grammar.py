"""JSON-schema constrained decoding (`GenerationParams.json_schema`) with xgrammar.

`check_schema` runs on every engine before a constrained request starts, so a schema that cannot become a
grammar fails that request alone with INVALID_REQUEST (in the cpu-openvino process a bad schema would fail
the whole batch step). `Grammars` serves the transformers engine: one compiler per tokenizer, and per
sequence a `Constraint` that masks the logits to the tokens the grammar allows and follows the tokens
chosen. OpenVINO GenAI compiles its own grammars (the same xgrammar, built into the library).
"""

from __future__ import annotations

import asyncio
import functools
import json
import threading
from typing import Any

import torch

from schemas.errors import CyError, ErrorCode

xgr: Any
try:
    import xgrammar as xgr
except ImportError:  # optional at import time: only constrained requests need it
    xgr = None


def _invalid(message: str) -> CyError:
    return CyError(ErrorCode.INVALID_REQUEST, f"unusable json_schema: {message}")


@functools.lru_cache(maxsize=256)
def _schema_error(schema: str) -> str:
    """Why `schema` cannot be used ("" when it is a JSON object that xgrammar turns into a grammar)."""
    try:
        parsed = json.loads(schema)
    except ValueError as exc:
        return f"not JSON ({exc})"
    if not isinstance(parsed, dict):
        return "a JSON schema must be a JSON object"
    if xgr is None:
        return ""  # the engine that compiles it reports what is wrong
    try:
        xgr.Grammar.from_json_schema(schema, any_whitespace=False)
    except Exception as exc:  # xgrammar raises RuntimeError/ValueError with the converter's message
        return str(exc).strip().splitlines()[-1][:300]
    return ""


async def check_schema(schema: str) -> None:
    """Raises CyError(INVALID_REQUEST) for a schema that is not a JSON object or cannot become a grammar."""
    error = await asyncio.to_thread(_schema_error, schema)
    if error:
        raise _invalid(error)


class Constraint:
    """One sequence's grammar state. Used only on the batcher thread."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        self._bits = torch.arange(32, dtype=torch.int32)

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """One row of logits [vocab] as float32 with every token the grammar forbids next at -inf."""
        self.matcher.fill_next_token_bitmask(self.bitmask)
        # Unpacked in torch rather than xgrammar's apply kernel: that one needs triton on CUDA.
        allowed = ((self.bitmask[0, :, None] >> self._bits) & 1).flatten()[: self.vocab_size].bool()
        logits = logits.float()
        return logits.masked_fill(~allowed.to(logits.device), float("-inf"))

    def accept(self, token: int) -> bool:
        return bool(self.matcher.accept_token(token))


class Grammars:
    """Compiles schemas for one tokenizer (cached by schema text). Raises CyError(INVALID_REQUEST) when
    xgrammar is not installed."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: frozenset[int]) -> None:
        if xgr is None:
            raise CyError(
                ErrorCode.INVALID_REQUEST,
                "json_schema needs the xgrammar package on this worker (pip install xgrammar)",
            )
        self.vocab_size = vocab_size
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(stop_ids))
        self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=True)
        self._lock = threading.Lock()

    def constraint(self, schema: str) -> Constraint:
        """Raises CyError(INVALID_REQUEST) for a schema xgrammar cannot compile."""
        try:
            with self._lock:
                # No free whitespace: a small model could otherwise spend its tokens on blank lines.
                compiled = self._compiler.compile_json_schema(schema, any_whitespace=False)
        except Exception as exc:
            raise _invalid(str(exc).strip().splitlines()[-1][:300]) from exc
        return Constraint(xgr.GrammarMatcher(compiled), self.vocab_size)
