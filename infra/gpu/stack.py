"""The full path: nats-server + worker + gateway, over HTTP/SSE and over NATS directly."""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import time
from pathlib import Path
from typing import Any

from infra.gpu.engine import level_row


def stack_phase(model_dir: Path, root: Path, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from infra.bench.stack import Stack

    model_id = "smol-random"
    registry = {
        "default": model_id,
        "models": {
            model_id: {
                "name": "SmolLM2-135M architecture, random weights",
                "engine": "transformers",
                "modelPath": str(model_dir),
                "maxModelLen": 8192,
                "dtype": "float32",
                "capabilities": ["inference", "stream"],
            }
        },
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "models.json").write_text(json.dumps(registry))
    env = {"CY_LLM_MODELS_FILE": str(root / "models.json"), "CY_LLM_DEVICE": args.device}
    stack = Stack(root / "stack", model_id=model_id, slots=args.slots, env=env)
    result: dict[str, Any] = {"slots": args.slots, "max_new_tokens": args.max_new}
    try:
        stack.start(timeout=args.stack_timeout)
        result["ready_s"] = round(stack.ready_s or 0, 1)
        result |= asyncio.run(_stack_levels(stack, model_id, model_dir, args))
    finally:
        stack.stop()
        for name in ("worker", "gateway"):
            log = root / "stack" / f"{name}.log"
            if log.exists():
                shutil.copy(log, out / f"{name}.log")
    return result


async def _stack_levels(stack: Any, model_id: str, model_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    from infra.bench._sse import make_client, sse_events
    from infra.bench.nats_load import connect, nats_request
    from infra.bench.workloads import Sample, TokenCounter, Workload, run_level

    counter = TokenCounter(model_dir)
    workload = Workload(args.max_new, (), (), (), rounds=args.rounds, single_requests=args.singles)
    levels = [c for c in args.stack_levels]
    client = make_client(max(levels))
    url, headers = f"{stack.base_url}/api/v1/inference/stream", {"X-API-Key": stack.api_key}

    async def gateway_one(prompt: str, max_new_tokens: int) -> Sample:
        # As infra/bench/gateway_load.py, but the SSE stream carries no token count and random-weight text
        # does not re-encode to the same count: a `length` finish is max_new_tokens tokens (no EOS possible).
        body = {
            "modelId": "default",
            "prompt": prompt,
            "generation": {"temperature": 0, "maxNewTokens": max_new_tokens},
        }
        sent, ttft, finish, text = time.monotonic(), None, None, []
        async for event in sse_events(client, url, body, headers):
            if "error" in event:
                raise RuntimeError(f"stream error: {event['error']}")
            choice = event["choices"][0]
            if choice.get("text"):
                ttft = ttft if ttft is not None else time.monotonic() - sent
                text.append(choice["text"])
            finish = choice.get("finish_reason") or finish
        n = max_new_tokens if finish == "length" else counter.count("".join(text))
        return Sample(ttft, time.monotonic() - sent, n, finish)

    nc = await connect(stack.nats_url, stack.token)
    direct = nats_request(nc, model_id, counter)

    async def nats_one(prompt: str, max_new_tokens: int) -> Sample:
        sample = await direct(prompt, max_new_tokens)
        sample.tokens = sample.server_tokens if sample.server_tokens is not None else sample.tokens
        return sample

    out: dict[str, Any] = {"gateway": [], "nats": []}
    try:
        await run_level("gateway warm-up", gateway_one, max(levels), Workload(8, (), (), (), 1, 1))
        for c in levels:
            out["gateway"].append(level_row(await run_level("gateway", gateway_one, c, workload), args.max_new))
            out["nats"].append(level_row(await run_level("nats", nats_one, c, workload), args.max_new))
    finally:
        await client.aclose()
        await nc.close()
    return out
