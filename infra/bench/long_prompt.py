"""What one long prompt does to the streams already running on the `cpu-openvino` engine (issue 19, item 6).

`python -m infra.bench.long_prompt [--budgets 64,128,256] [--repeats 2] [--scheduler JSON ...]` drives
OpenVinoEngine in this process (no NATS, no HTTP), once per setting: 8 greedy streams run (each restarted
when it ends, so 8 are always running), then for `--baseline-s` seconds the gaps between consecutive token
steps of every stream are recorded (the baseline); then one unique ~7.8k-token prompt arrives and the gaps are
recorded again until its first token (the prefill window). A gap is counted in the prefill window when it
overlaps it; the first token of a request is a TTFT, not a gap. The ratio that matters, the prefill window's
p99 gap over the baseline's, is taken within one run, so a slower minute hits both sides alike; settings
are run in turn, `--repeats` times, so that load from other users spreads over all of them.

`--scheduler` overrides SchedulerConfig fields in the engine's process for one extra setting, as JSON (e.g.
'{"dynamic_split_fuse": false, "max_num_batched_tokens": 8192}'); the engine itself exposes only the budget.

Prints one row per run and a summary per setting (medians over the repeats), and writes them as JSON to
bench-results/long-prompt-<time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from infra.bench.facts import CpuWatch, process_cpu_s

_SCHEDULER_ENV = "CY_BENCH_SCHEDULER"

# Greedy prompts that make SmolLM2 talk for a long time (a stream that ends anyway is restarted).
_STREAM_PROMPTS = [
    "Count from 1 to 1000, one number per line.",
    "Write a very long story about a dragon who learns to cook.",
    "List every country in the world with its capital, one per line.",
    "Explain in great detail how a steam engine works, step by step.",
    "Write a long poem about the sea, with at least fifty verses.",
    "Describe the history of Rome from its founding to the fall of the empire.",
    "Write a long letter to a friend about your travels through Asia.",
    "Give a detailed recipe for each of twenty different soups.",
]


def _child_main(conn: Any, config: Any) -> None:
    """The engine process's entry point with the SchedulerConfig overrides of `CY_BENCH_SCHEDULER` applied."""
    import openvino_genai as ov_genai

    from services.engine import openvino_process as proc

    overrides = json.loads(os.environ.get(_SCHEDULER_ENV) or "{}")
    real = ov_genai.ContinuousBatchingPipeline

    def patched(model_dir: str, scheduler: Any, *args: Any) -> Any:
        for name, value in overrides.items():
            setattr(scheduler, name, value)
        return real(model_dir, scheduler, *args)

    ov_genai.ContinuousBatchingPipeline = patched
    proc.main(conn, config)


@dataclass
class Setting:
    label: str
    budget: int
    scheduler: dict[str, Any] = field(default_factory=dict)


@dataclass
class Run:
    label: str
    repeat: int
    baseline_p50_ms: float
    baseline_p99_ms: float
    long_p50_ms: float
    long_p99_ms: float
    long_max_ms: float
    ratio_p99: float
    long_ttft_s: float
    prompt_tokens: int
    baseline_tok_s: float
    during_tok_s: float
    restarts_during: int
    other_cores: float | None


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _long_prompt_ids(tokenizer: Any, tokens: int, rng: random.Random) -> list[int]:
    """A prompt of about `tokens` tokens that no earlier run sent (the prefix cache would make it instant)."""
    words = ["red", "brick", "stone", "river", "lamp", "green", "cloud", "table", "north", "seven", "quiet"]
    head = " ".join(f"{rng.randrange(10**6):06d}" for _ in range(8))
    text = head + ". " + " ".join(f"item {i} is a {rng.choice(words)} {rng.choice(words)}." for i in range(tokens))
    return list(tokenizer(text)["input_ids"][:tokens])


async def measure(setting: Setting, repeat: int, args: argparse.Namespace, spec: Any, rng: random.Random) -> Run:
    from schemas.inference import GenerationParams
    from services.engine import openvino_process as proc
    from services.engine.engines import EngineOptions
    from services.engine.openvino_engine import OpenVinoEngine

    os.environ[_SCHEDULER_ENV] = json.dumps(setting.scheduler)
    real_main = proc.main
    proc.main = _child_main  # type: ignore[assignment]  # pickled by name: the spawned process runs _child_main
    try:
        engine = OpenVinoEngine(spec, slots=args.slots, options=EngineOptions(prefill_budget=setting.budget))
        await engine.start()
    finally:
        proc.main = real_main  # type: ignore[assignment]
    tokenizer = engine.tokenizer
    gaps: list[tuple[float, float]] = []  # (arrival of the earlier token, of the later one)
    tokens: list[float] = []  # arrival time of every stream token
    starts: list[float] = []  # when a stream (re)started
    stop = asyncio.Event()

    async def stream(index: int) -> None:
        messages = [{"role": "user", "content": _STREAM_PROMPTS[index % len(_STREAM_PROMPTS)]}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "input_ids") else ids)
        params = GenerationParams(max_new_tokens=args.stream_tokens, temperature=0.0)
        while not stop.is_set():
            starts.append(time.monotonic())
            last: float | None = None
            async for step in engine.generate(ids, params, ""):
                now = time.monotonic()
                if step.token_ids:
                    if last is not None:
                        gaps.append((last, now))
                    tokens.extend([now] * len(step.token_ids))
                    last = now
                if stop.is_set():
                    break

    watch = CpuWatch()
    pid = engine._process.pid  # the engine's process is not our reaped child yet: CpuWatch counts it as other
    tasks = [asyncio.create_task(stream(i)) for i in range(args.streams)]
    try:
        await asyncio.sleep(args.warmup_s)
        watch.start()
        engine_cpu0 = process_cpu_s(pid) or 0.0
        base_start = time.monotonic()
        await asyncio.sleep(args.baseline_s)
        long_ids = _long_prompt_ids(tokenizer, args.prompt_tokens, rng)
        injected = time.monotonic()
        first: float | None = None
        async for step in engine.generate(long_ids, GenerationParams(max_new_tokens=4, temperature=0.0), ""):
            if step.token_ids and first is None:
                first = time.monotonic()
        assert first is not None, "the long prompt produced no token"
        await asyncio.sleep(1.0)  # the gaps that end with the prefill's last step arrive with or after it
        engine_cpu = (process_cpu_s(pid) or 0.0) - engine_cpu0
        cpu = watch.stop()
    finally:
        stop.set()
        await asyncio.wait(tasks, timeout=30)
        for task in tasks:
            task.cancel()
        await engine.close()
    # A gap belongs to the prefill window when it overlaps it (a one-step prefill makes one long gap that ends
    # with the first token); to the baseline when it lies within the baseline.
    base = [b - a for a, b in gaps if base_start <= a and b <= injected]
    during = [b - a for a, b in gaps if b > injected and a < first]
    baseline_tok_s = sum(1 for t in tokens if base_start <= t < injected) / (injected - base_start)
    during_tok_s = sum(1 for t in tokens if injected < t <= first) / (first - injected)
    return Run(
        label=setting.label,
        repeat=repeat,
        baseline_p50_ms=round(_pct(base, 0.5) * 1000, 1),
        baseline_p99_ms=round(_pct(base, 0.99) * 1000, 1),
        long_p50_ms=round(_pct(during, 0.5) * 1000, 1) if during else float("nan"),
        long_p99_ms=round(_pct(during, 0.99) * 1000, 1) if during else float("nan"),
        long_max_ms=round(max(during) * 1000, 1) if during else float("nan"),
        ratio_p99=round(_pct(during, 0.99) / _pct(base, 0.99), 2) if during else float("nan"),
        long_ttft_s=round(first - injected, 2),
        prompt_tokens=len(long_ids),
        baseline_tok_s=round(baseline_tok_s, 1),
        during_tok_s=round(during_tok_s, 1),
        restarts_during=sum(1 for t in starts if injected < t <= first),
        other_cores=round(max(cpu["other_cpu_s"] - engine_cpu, 0.0) / cpu["wall_s"], 2) if cpu else None,
    )


_COLUMNS = (
    "setting | rep | base p50 | base p99 | long p50 | long p99 | long max | ratio p99 | long TTFT | "
    "tok/s base | tok/s during | restarts | other cores"
)


def _row(run: Run) -> str:
    return (
        f"{run.label} | {run.repeat} | {run.baseline_p50_ms:.0f} ms | {run.baseline_p99_ms:.0f} ms | "
        f"{run.long_p50_ms:.0f} ms | {run.long_p99_ms:.0f} ms | {run.long_max_ms:.0f} ms | {run.ratio_p99:.2f}x | "
        f"{run.long_ttft_s:.1f} s | {run.baseline_tok_s:.0f} | {run.during_tok_s:.0f} | {run.restarts_during} | "
        f"{run.other_cores}"
    )


def _summary(runs: list[Run], labels: list[str]) -> list[str]:
    lines = ["setting | baseline p99 gap | with long prompt p99 gap | ratio | long prompt TTFT | tok/s base -> during"]
    for label in labels:
        mine = [r for r in runs if r.label == label]
        if not mine:
            continue

        def med(name: str, runs: list[Run] = mine) -> float:
            return statistics.median(getattr(r, name) for r in runs)

        lines.append(
            f"{label} | {med('baseline_p99_ms'):.0f} ms | {med('long_p99_ms'):.0f} ms | {med('ratio_p99'):.2f}x "
            f"({', '.join(f'{r.ratio_p99:.2f}' for r in mine)}) | {med('long_ttft_s'):.1f} s | "
            f"{med('baseline_tok_s'):.0f} -> {med('during_tok_s'):.0f}"
        )
    return lines


def _settings(args: argparse.Namespace) -> list[Setting]:
    settings = [Setting(f"budget {b}", b) for b in args.budgets]
    for raw in args.scheduler:
        overrides = json.loads(raw)
        budget = int(overrides.get("max_num_batched_tokens", 256))
        settings.append(Setting(" ".join(f"{k}={v}" for k, v in overrides.items()), budget, overrides))
    return settings


async def run(args: argparse.Namespace) -> int:
    from services.models.registry import load_registry

    resolved = load_registry().resolve("default")
    assert resolved is not None
    _, spec = resolved
    settings = _settings(args)
    rng = random.Random(args.seed)
    runs: list[Run] = []
    print(f"model {spec.model_path}, max_model_len {spec.max_model_len}; {args.streams} streams", flush=True)
    print(_COLUMNS, flush=True)
    for repeat in range(args.repeats):
        order = settings if repeat % 2 == 0 else settings[::-1]  # alternate, so no setting always goes first
        for setting in order:
            result = await measure(setting, repeat, args, spec, rng)
            runs.append(result)
            print(_row(result), flush=True)
    print()
    print("\n".join(_summary(runs, [s.label for s in settings])))
    out = Path("bench-results") / f"long-prompt-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "runs": [asdict(r) for r in runs]}, indent=1))
    print(f"\nwrote {out}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.bench.long_prompt")
    parser.add_argument("--budgets", type=lambda s: [int(x) for x in s.split(",") if x], default=[64, 128, 256, 512])
    parser.add_argument("--scheduler", action="append", default=[], help="SchedulerConfig overrides as JSON")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--stream-tokens", type=int, default=200, help="max_new_tokens of each stream's request")
    parser.add_argument("--prompt-tokens", type=int, default=7800)
    parser.add_argument("--slots", type=int, default=32, help="the worker's CY_LLM_SLOTS")
    parser.add_argument("--warmup-s", type=float, default=3.0)
    parser.add_argument("--baseline-s", type=float, default=8.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from services.runtime import configure_logging

    configure_logging("bench-long-prompt", level="warning")
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
