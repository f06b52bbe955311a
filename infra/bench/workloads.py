"""What every target is asked to do, and how one concurrency level is driven and summarised.

A target is anything with an async `one(prompt, max_new_tokens) -> Sample`: the in-process engine, a
gateway over HTTP/SSE (one per worker engine), a direct NATS publisher, or the peer server. `run_level`
drives it with `c` closed-loop clients (each sends its next request as soon as its previous one ends), so
every target sees the same prompts in the same order at the same concurrency.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Chat prompts that make SmolLM2-135M-Instruct write on without stopping early under greedy decoding
# (checked: every one runs to `length` at 128 new tokens), with prompt lengths spread from ~35 to ~75
# tokens once the chat template is applied. Every target gets them as chat messages.
PROMPTS: tuple[str, ...] = (
    "Write a long story about a robot who learns to paint.",
    "Explain in detail how a steam engine works, step by step, for a curious child.",
    "Describe a busy market in an old port city at dawn: the sounds, the smells, the people, the boats.",
    "Write a detailed guide to planting and caring for a vegetable garden through a whole year.",
    "Tell the history of the printing press and how it changed the way people shared ideas.",
    "Write a long letter from a lighthouse keeper to her brother describing a winter storm on the island.",
    "Explain how the water cycle works and why it matters for farmers, cities and rivers.",
    "Write a travel diary about crossing a desert by train, with the people met along the way.",
)


@dataclass(frozen=True)
class Workload:
    """Fixed output length, greedy decoding, the same prompt sequence for everyone."""

    max_new_tokens: int
    levels: tuple[int, ...]
    nats_levels: tuple[int, ...]
    inprocess_levels: tuple[int, ...]
    # Requests per client at each level; level 1 gets `single_requests` so its median means something.
    rounds: int
    single_requests: int

    def requests_at(self, concurrency: int) -> int:
        return self.single_requests if concurrency == 1 else concurrency * self.rounds

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Workload:
        raw: dict[str, Any] = json.loads(text)
        fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
        return cls(**fields)


QUICK = Workload(
    max_new_tokens=64,
    levels=(1, 4, 16),
    nats_levels=(1, 16),
    inprocess_levels=(1, 4, 16),
    rounds=1,
    single_requests=2,
)
FULL = Workload(
    max_new_tokens=128,
    levels=(1, 4, 16, 32),
    nats_levels=(1, 16),
    inprocess_levels=(1, 4, 16, 32),
    rounds=2,
    single_requests=4,
)


@dataclass
class Sample:
    """One request as its client saw it. Times are seconds from when the request was sent."""

    ttft: float | None
    duration: float
    # Completion tokens: the received text re-encoded with the model's tokenizer, the same way for every
    # target (never estimated from characters); `server_tokens` is the server's own count where it sends one.
    tokens: int
    finish_reason: str | None
    server_tokens: int | None = None
    # Seconds from sending until a worker took the request (its Accepted reply); direct NATS only.
    queued: float | None = None
    error: str = ""

    @property
    def decode_tps(self) -> float | None:
        """Tokens per second after the first one (the stream's decode rate)."""
        if self.ttft is None or self.tokens < 2 or self.duration <= self.ttft:
            return None
        return (self.tokens - 1) / (self.duration - self.ttft)


OneRequest = Callable[[str, int], Awaitable[Sample]]


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


@dataclass
class LevelResult:
    target: str
    concurrency: int
    wall_s: float
    samples: list[Sample] = field(default_factory=list)

    @property
    def ok(self) -> list[Sample]:
        return [s for s in self.samples if not s.error]

    def summary(self) -> dict[str, Any]:
        ok = self.ok
        ttfts = [s.ttft * 1000 for s in ok if s.ttft is not None]
        tps = [t for s in ok if (t := s.decode_tps) is not None]
        queued = [s.queued * 1000 for s in ok if s.queued is not None]
        tokens = sum(s.tokens for s in ok)
        finishes: dict[str, int] = {}
        for s in ok:
            finishes[str(s.finish_reason)] = finishes.get(str(s.finish_reason), 0) + 1
        return {
            "requests": len(self.samples),
            "errors": len(self.samples) - len(ok),
            "completion_tokens": tokens,
            "ttft_ms_p50": _pct(ttfts, 0.5),
            "ttft_ms_p95": _pct(ttfts, 0.95),
            "ttft_ms_p99": _pct(ttfts, 0.99),
            "stream_tps_p50": _pct(tps, 0.5),
            "queued_ms_p50": _pct(queued, 0.5),
            "queued_ms_p99": _pct(queued, 0.99),
            "aggregate_tps": tokens / self.wall_s if self.wall_s > 0 else None,
            "wall_s": self.wall_s,
            "finish_reasons": finishes,
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "concurrency": self.concurrency,
            "summary": self.summary(),
            "samples": [asdict(s) for s in self.samples],
        }


class Progress:
    """One updating line per level on a terminal, plain lines otherwise (CI logs)."""

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total, self.done, self.tokens = label, total, 0, 0
        self.started = time.monotonic()
        self._tty = sys.stderr.isatty()
        self._show()

    def step(self, sample: Sample) -> None:
        self.done += 1
        self.tokens += sample.tokens
        if self._tty or self.done == self.total:
            self._show()

    def _show(self) -> None:
        elapsed = time.monotonic() - self.started
        line = f"  {self.label:<28} {self.done:>3}/{self.total} requests  {self.tokens:>5} tokens  {elapsed:6.1f}s"
        end = "\n" if self.done == self.total or not self._tty else ""
        print(("\r" if self._tty else "") + line, end=end, file=sys.stderr, flush=True)


async def run_level(target: str, one: OneRequest, concurrency: int, workload: Workload) -> LevelResult:
    """`concurrency` clients share the request list (prompt i -> PROMPTS[i % n]) until it is used up."""
    total = workload.requests_at(concurrency)
    order = list(range(total))
    samples: list[Sample] = []
    progress = Progress(f"{target} x{concurrency}", total)

    async def client() -> None:
        while order:
            i = order.pop(0)
            try:
                sample = await one(PROMPTS[i % len(PROMPTS)], workload.max_new_tokens)
            except Exception as exc:  # one failed request is a data point, not the end of the run
                sample = Sample(ttft=None, duration=0.0, tokens=0, finish_reason=None, error=repr(exc)[:300])
            samples.append(sample)
            progress.step(sample)

    started = time.monotonic()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return LevelResult(target, concurrency, time.monotonic() - started, samples)


class TokenCounter:
    """Completion tokens from text with the model's own tokenizer (tokenizer.json, no transformers import)."""

    def __init__(self, model_dir: Path) -> None:
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))

    def count(self, text: str) -> int:
        return len(self._tok.encode(text, add_special_tokens=False).ids)
