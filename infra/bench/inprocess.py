"""The floor of the transformers stack: the transformers engine called directly (no NATS, no HTTP), in a
process of its own. (The production default on a CPU is cpu-openvino; this floor measures what the
gateway, NATS and the worker cost on top of the transformers engine, compared with the transformers stack.)

`python -m infra.bench.inprocess --workload JSON` loads the engine exactly as a CY_LLM_ENGINE=transformers
worker does (same class, slots and dtype), prints `{"load_s": ...}` on stdout, then serves one concurrency
level per stdin line (`{"concurrency": 4}`), answering each with the level's results as one JSON line.
Being a separate process, it gets the CPU the way the worker does, the driver stays a light client, and its
levels can be interleaved with the other targets' (bursts of load from other users then hit every target alike).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from infra.bench._children import die_with_parent
from infra.bench.workloads import Sample, TokenCounter, Workload, run_level
from schemas.inference import ChatMessage, GenerateRequest, GenerationParams
from services.models.registry import ModelSpec


async def serve(spec: ModelSpec, model_id: str, workload: Workload, slots: int) -> None:
    from services.engine.transformers_engine import TransformersEngine

    started = time.monotonic()
    engine = TransformersEngine(spec.model_path, max_model_len=spec.max_model_len, dtype=spec.dtype, slots=slots)
    await engine.start()
    counter = TokenCounter(Path(spec.model_path))

    async def one(prompt: str, max_new_tokens: int) -> Sample:
        sent = time.monotonic()
        request = GenerateRequest(
            trace_id="bench", model_id=model_id, messages=[ChatMessage(role="user", content=prompt)]
        )
        ids = engine.encode(request)
        params = GenerationParams(max_new_tokens=max_new_tokens, temperature=0.0)
        generated: list[int] = []
        ttft: float | None = None
        finish: str | None = None
        async for step in engine.generate(ids, params, ""):
            if ttft is None and step.token_ids:
                ttft = time.monotonic() - sent
            generated.extend(step.token_ids)
            finish = step.finish_reason or finish
        duration = time.monotonic() - sent
        text = engine.tokenizer.decode(generated, skip_special_tokens=True)
        return Sample(ttft, duration, counter.count(text), finish, server_tokens=len(generated))

    try:
        first = await one("Say hello.", 8)  # first-call allocations, reported apart
        _answer({"load_s": time.monotonic() - started - first.duration, "first_ttft_s": first.ttft})
        while line := await asyncio.to_thread(sys.stdin.readline):
            level = await run_level("in-process", one, int(json.loads(line)["concurrency"]), workload)
            _answer(level.to_json())
    finally:
        await engine.close()


def _answer(payload: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(payload) + "\n")
    sys.stdout.flush()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.bench.inprocess")
    parser.add_argument("--workload", required=True, help="the Workload as JSON (Workload.to_json)")
    parser.add_argument("--slots", type=int, default=32)
    args = parser.parse_args()

    from services.models.registry import load_registry
    from services.runtime import configure_logging

    configure_logging("bench-inprocess", level="warning")
    resolved = load_registry().resolve("default")
    assert resolved is not None  # load_registry checks that the default model exists
    model_id, spec = resolved
    asyncio.run(serve(spec, model_id, Workload.from_json(args.workload), args.slots))
    return 0


if __name__ == "__main__":
    sys.exit(main())


class InProcessTarget:
    """The driver's side: `async with InProcessTarget(workload, slots) as t: await t.level(4)`."""

    def __init__(self, workload: Workload, slots: int, env: dict[str, str]) -> None:
        self.workload, self.slots, self.env = workload, slots, env
        self.proc: asyncio.subprocess.Process | None = None
        self.load_s: float | None = None
        self.first_ttft_s: float | None = None

    async def __aenter__(self) -> InProcessTarget:
        cmd = [sys.executable, "-m", "infra.bench.inprocess", "--workload", self.workload.to_json()]
        self.proc = await asyncio.create_subprocess_exec(
            *cmd,
            "--slots",
            str(self.slots),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=self.env,
            preexec_fn=die_with_parent,
        )
        hello = await self._read()
        self.load_s, self.first_ttft_s = hello["load_s"], hello["first_ttft_s"]
        return self

    async def level(self, concurrency: int) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"concurrency": concurrency}).encode() + b"\n")
        await self.proc.stdin.drain()
        return await self._read()

    async def _read(self) -> dict[str, Any]:
        """The next JSON line (anything else a library prints on stdout is skipped). Raises RuntimeError."""
        assert self.proc is not None and self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            if line.startswith(b"{"):
                return dict(json.loads(line))
        raise RuntimeError(f"the in-process engine exited (code {await self.proc.wait()})")

    async def __aexit__(self, *exc: object) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        assert self.proc.stdin is not None
        self.proc.stdin.close()  # end of input: between levels the engine closes and the process exits
        for action in (None, self.proc.terminate, self.proc.kill):
            if action is not None:
                action()
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
                return
            except TimeoutError:
                continue
