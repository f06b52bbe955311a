"""Batch invariance: greedy output of a prompt alone must equal its output inside a batch."""

from __future__ import annotations

import asyncio
from typing import Any

CHECK_PROMPTS = [f"Question number {i}: tell me about {'cats ' * (i % 5)}and dogs" for i in range(16)]


async def run_run(engine: Any, ids: list[int], max_new: int) -> list[int]:
    from schemas.inference import GenerationParams

    out: list[int] = []
    async for step in engine.generate(ids, GenerationParams(temperature=0, max_new_tokens=max_new), ""):
        out.extend(step.token_ids)
    return out


async def batch_invariance(engine: Any, n: int, max_new: int) -> dict[str, Any]:
    """Each prompt alone, then all n together: greedy outputs must be identical (tests/engine's contract)."""
    from schemas.inference import ChatMessage, GenerateRequest

    ids = [
        engine.encode(GenerateRequest(trace_id="t", model_id="m", messages=[ChatMessage(role="user", content=p)]))
        for p in CHECK_PROMPTS[:n]
    ]
    alone = [await run_run(engine, i, max_new) for i in ids]
    together = await asyncio.gather(*(run_run(engine, i, max_new) for i in ids))
    again = [await run_run(engine, i, max_new) for i in ids[:2]]
    diverge = {}
    for k, (a, b) in enumerate(zip(alone, together, strict=True)):
        if a != b:
            diverge[str(k)] = next(
                (j for j, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
            )
    return {
        "prompts": n,
        "max_new_tokens": max_new,
        "identical": sum(a == b for a, b in zip(alone, together, strict=True)),
        "alone_repeatable": again == alone[:2],
        "first_divergent_token_by_prompt": diverge,
        "distinct_tokens_in_outputs": len({t for seq in alone for t in seq}),
        "sample_alone_0": alone[0][:12],
    }
