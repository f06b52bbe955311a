"""The in-process engine (TransformersEngine + Batcher, no NATS/HTTP): latency and throughput by level."""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from infra.gpu.invariance import batch_invariance


def client(engine: Any) -> Callable[[str, int], Any]:
    """A `run_level` client: chat prompt -> Sample; tokens are the engine's own token count."""
    from infra.bench.workloads import Sample
    from schemas.inference import ChatMessage, GenerateRequest, GenerationParams

    async def one(prompt: str, max_new_tokens: int) -> Sample:
        sent = time.monotonic()
        request = GenerateRequest(trace_id="gpu", model_id="m", messages=[ChatMessage(role="user", content=prompt)])
        ids = engine.encode(request)
        params = GenerationParams(max_new_tokens=max_new_tokens, temperature=0.0)
        n, ttft, finish = 0, None, None
        async for step in engine.generate(ids, params, ""):
            if ttft is None and step.token_ids:
                ttft = time.monotonic() - sent
            n += len(step.token_ids)
            finish = step.finish_reason or finish
        return Sample(ttft, time.monotonic() - sent, n, finish, server_tokens=n)

    return one


def level_row(result: Any, max_new: int) -> dict[str, Any]:
    s = result.summary()
    short = [x.tokens for x in result.ok if x.tokens != max_new]
    row = {k: s[k] for k in ("requests", "errors", "completion_tokens", "ttft_ms_p50", "ttft_ms_p99")}
    row |= {
        "concurrency": result.concurrency,
        "stream_tps_p50": s["stream_tps_p50"],
        "aggregate_tps": s["aggregate_tps"],
        "wall_s": round(s["wall_s"], 2),
        "finish_reasons": s["finish_reasons"],
        "all_full_length": not short and not s["errors"],
    }
    if s["errors"]:
        row["first_error"] = next(x.error for x in result.samples if x.error)
    return row


async def inprocess_phase(model_dir: Path, dtype: str, device: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from infra.bench.workloads import Workload, run_level
    from services.engine.transformers_engine import TransformersEngine

    levels = args.bf16_levels if dtype == "bfloat16" else args.levels
    result: dict[str, Any] = {"dtype": dtype, "slots": args.slots, "max_new_tokens": args.max_new}
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    started = time.monotonic()
    engine = TransformersEngine(str(model_dir), max_model_len=8192, dtype=dtype, slots=args.slots, device=device)
    await engine.start()
    result["engine_device"] = engine.device
    result["load_s"] = round(time.monotonic() - started, 2)
    try:
        one = client(engine)
        first = await one("Say hello.", 8)
        result["first_request"] = {"ttft_ms": first.ttft and round(first.ttft * 1000, 1), "tokens": first.tokens}
        warm = Workload(args.max_new // 4 or 1, (), (), (), rounds=1, single_requests=1)
        await run_level("warm-up", one, max(levels), warm)
        workload = Workload(args.max_new, (), (), (), rounds=args.rounds, single_requests=args.singles)
        result["levels"] = []
        for c in levels:
            level = await run_level(f"in-process {dtype}", one, c, workload)
            result["levels"].append(level_row(level, args.max_new))
        if args.check_prompts:
            result["batch_invariance"] = await batch_invariance(engine, args.check_prompts, args.check_tokens)
        if device.startswith("cuda"):
            result["max_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    finally:
        await engine.close()
        del engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return result
