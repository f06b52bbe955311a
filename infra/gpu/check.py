"""`python -m infra.gpu.check`: the project's own engine and trainer on a CUDA GPU, in one short run.

CI has no GPU, so this is the one place that measures and checks the CUDA path. Phases, in order (a
phase starts only while the time budget allows; results are written after every phase):

1. in-process engine (TransformersEngine + Batcher, no NATS/HTTP), float32 as the registry serves it:
   one warm-up, then TTFT, per-stream decode tokens/s and aggregate tokens/s at 1, 4, 16, 32 concurrent
   closed-loop streams, greedy, fixed output length (`infra.bench.workloads.run_level`); then greedy
   output of 16 prompts, each alone, then all 16 together (the CPU test's contract) on that engine;
2. breakdown: where a decode step's time goes (forward, host dispatch, per-row pick), float32 and bfloat16;
3. attn: the bfloat16 decode forward under PyTorch's SDPA backend switches, with a host profile;
4. trainer: a few LoRA steps through the trainer's own loop (`services.trainer.loop.run`);
5. bf16, bf16-nocudnn: (1) in bfloat16, and in bfloat16 with cuDNN attention off;
6. stack: nats-server -js, `python -m services.engine`, `python -m gateway` (`infra.bench.stack`),
   driven over HTTP/SSE and over NATS directly at 1 and 16 streams, as a ratio to (1)'s figures;
7. pytest: the engine's own tests, unchanged (their engines pick CUDA by themselves).

The model is the SmolLM2-135M-Instruct architecture built from its real config.json and tokenizer with
RANDOM weights (the real weights are too large to carry to the GPU machine). Throughput does not depend
on the weight values. So that every request runs to its fixed length, the embedding rows of the 17
special tokens (EOS among them) are zeroed: with tied embeddings their logits are then 0 while the best
of the other 49k random logits is positive, so greedy decoding never picks them (and never emits text
that decodes to nothing). See build_model for the init std and the trainer's model.

Writes results.json and summary.md into --out (default $OUT, else .gpu/out). See infra/gpu/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
SPEC_STREAM_TPS = 50.0  # tokens/s per stream
SPEC_TTFT_MS = 200.0
SPECIAL_TOKENS = 17  # SmolLM2: ids 0..16 are special (<|endoftext|>, <|im_start|>, <|im_end|>, ...)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
CHECK_PROMPTS = [f"Question number {i}: tell me about {'cats ' * (i % 5)}and dogs" for i in range(16)]


def say(text: str) -> None:
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


class Report:
    """Everything measured so far; written out after every phase so a killed run still leaves data."""

    def __init__(self, out: Path, args: argparse.Namespace) -> None:
        self.out = out
        self.started = time.monotonic()
        self.data: dict[str, Any] = {"args": vars(args) | {"out": str(out)}, "phases": {}, "skipped": {}}

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def save(self) -> None:
        self.data["elapsed_s"] = round(self.elapsed(), 1)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "results.json").write_text(json.dumps(self.data, indent=2, default=str))
        (self.out / "summary.md").write_text(render(self.data))


# --- facts and the model ---------------------------------------------------------------------------
def facts(device: str) -> dict[str, Any]:
    import torch
    import transformers

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu_count": os.cpu_count(),
        "device": device,
    }
    try:
        import peft

        info["peft"] = peft.__version__
    except ImportError:
        info["peft"] = None
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=torch.cuda.get_device_name(0),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            capability=f"{props.major}.{props.minor}",
            cuda=torch.version.cuda,
            tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
            bf16_supported=torch.cuda.is_bf16_supported(),
        )
    for cmd, key in ((["git", "rev-parse", "HEAD"], "git_head"), (["git", "status", "--short"], "git_status")):
        try:
            info[key] = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:
            info[key] = None
    return info


def build_model(src: Path, target: Path, *, layers: int, std: float = 0.0, zero_special: bool = True) -> dict[str, Any]:
    """SmolLM2's config + tokenizer, random float32 weights (seed 0; normal with std `std`, default the
    config's initializer_range 0.02), the special tokens' embedding rows zeroed if `zero_special`.

    With std 0.02 greedy decoding of a 30-layer random model collapses onto one repeated token, which
    makes an alone-vs-batched comparison nearly powerless; std 0.05 gives varied output (a different
    token at almost every step), so any rounding difference that flips an argmax shows. The zeroed rows
    make the hidden state of a leading <|im_start|> exactly 0, which gives NaN LoRA gradients: the
    trainer phase uses a model without them."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    started = time.monotonic()
    config = AutoConfig.from_pretrained(src)
    if layers:
        config.num_hidden_layers = layers
    if std:
        config.initializer_range = std
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model = model.to(torch.float32)
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    if zero_special:
        with torch.no_grad():
            emb[:SPECIAL_TOKENS] = 0
            head[:SPECIAL_TOKENS] = 0
    shutil.rmtree(target, ignore_errors=True)
    model.save_pretrained(target)
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy(src / name, target / name)
    return {
        "path": str(target),
        "params": sum(p.numel() for p in model.parameters()),
        "layers": config.num_hidden_layers,
        "tied_embeddings": emb.data_ptr() == head.data_ptr(),
        "weights": f"random (normal, std {config.initializer_range}, seed 0)"
        + ("; special-token rows zeroed" if zero_special else ""),
        "build_s": round(time.monotonic() - started, 1),
    }


# --- in-process engine -----------------------------------------------------------------------------
def _one(engine: Any) -> Callable[[str, int], Any]:
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
        one = _one(engine)
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


# --- where a decode step's time goes ---------------------------------------------------------------
async def breakdown_phase(model_dir: Path, dtype: str, device: str, args: argparse.Namespace) -> dict[str, Any]:
    """The engine as served, with timers around the batcher's decode step, the model's forward (dispatch
    on the host, then a device sync) and the per-row token pick. Reported per decode step, medians."""
    import torch

    from infra.bench.workloads import Workload, run_level
    from services.engine.transformers_engine import TransformersEngine

    engine = TransformersEngine(str(model_dir), max_model_len=8192, dtype=dtype, slots=args.slots, device=device)
    await engine.start()
    batcher: Any = engine._batcher
    cuda = device.startswith("cuda")
    rec: dict[str, list[float]] = {"step": [], "dispatch": [], "forward": [], "pick": []}
    picks: list[float] = []
    model = batcher.model
    forward, decode_step, pick = model.forward, batcher._decode_step, batcher._pick

    def timed_forward(*a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        out = forward(*a, **k)
        t1 = time.perf_counter()
        if cuda:
            torch.cuda.synchronize()
        if k.get("input_ids") is not None and k["input_ids"].shape[1] == 1:
            rec["dispatch"].append(t1 - t0)
            rec["forward"].append(time.perf_counter() - t0)
        return out

    def timed_pick(*a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        out = pick(*a, **k)
        picks.append(time.perf_counter() - t0)
        return out

    def timed_step() -> None:
        picks.clear()
        t0 = time.perf_counter()
        decode_step()
        rec["step"].append(time.perf_counter() - t0)
        rec["pick"].append(sum(picks))

    model.forward, batcher._decode_step, batcher._pick = timed_forward, timed_step, timed_pick
    out: dict[str, Any] = {"dtype": dtype, "levels": []}
    try:
        one = _one(engine)
        rows, tokens = ((1, 4), 8) if args.quick else ((1, 16), 64)
        await run_level("warm-up", one, rows[-1], Workload(16, (), (), (), 1, 1))
        for c in rows:
            for v in rec.values():
                v.clear()
            await run_level(f"breakdown {dtype}", one, c, Workload(tokens, (), (), (), 1, 2 if c == 1 else 1))
            ms = {k: round(statistics.median(v) * 1000, 2) for k, v in rec.items() if v}
            ms["other"] = round(ms["step"] - ms["forward"] - ms["pick"], 2)
            out["levels"].append({"rows": c, "steps": len(rec["step"])} | {f"{k}_ms": v for k, v in ms.items()})
    finally:
        await engine.close()
    return out


# --- attention backends: why a bfloat16 decode step can cost more than a float32 one --------------------
SDPA_VARIANTS = (
    ("float32", "default", ()),
    ("bfloat16", "default", ()),
    ("bfloat16", "default, shapes seen before", ()),
    ("bfloat16", "cuDNN attention off", ("cudnn",)),
    ("bfloat16", "cuDNN and flash off", ("cudnn", "flash")),
    ("bfloat16", "math only", ("cudnn", "flash", "mem_efficient")),
)


def attn_phase(model_dir: Path, device: str, args: argparse.Namespace) -> dict[str, Any]:
    """The model's decode forward as the batcher calls it (mask, position ids, cache; batch 1), timed per
    step with a sync, under PyTorch's SDPA backend switches. Every variant but "seen before" decodes at
    KV lengths no earlier variant used, so a backend that prepares per shape pays that cost in it."""
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    from services.engine.batcher import _cache_keyword

    cuda = device.startswith("cuda")
    steps = 6 if args.quick else 32
    flags = ("cudnn", "flash", "mem_efficient", "math")
    saved = {f: getattr(torch.backends.cuda, f"{f}_sdp_enabled")() for f in flags}
    out: dict[str, Any] = {"steps": steps, "backends_enabled_by_default": saved, "variants": []}
    models: dict[str, Any] = {}
    for dt in ("float32", "bfloat16"):
        loaded: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dt))
        models[dt] = loaded.to(device).eval()

    def decode(model: Any, prompt_len: int, profile: bool = False) -> tuple[list[float], str]:
        kw = _cache_keyword(model)
        cache = DynamicCache(config=model.config)
        ids = torch.randint(100, 40000, (1, prompt_len), device=device)
        with torch.inference_mode():
            model(input_ids=ids, **{kw: cache}, use_cache=True, logits_to_keep=1)
            mask = torch.ones((1, prompt_len), dtype=torch.long, device=device)
            times, table = [], ""
            prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if profile else None
            if prof is not None:
                prof.__enter__()
            for i in range(steps):
                mask = torch.nn.functional.pad(mask, (0, 1), value=1)
                pos = torch.tensor([[prompt_len + i]], device=device)
                t0 = time.perf_counter()
                logits = model(
                    input_ids=ids[:, -1:], attention_mask=mask, position_ids=pos, **{kw: cache}, use_cache=True
                )
                int(torch.argmax(logits.logits[0, -1]))
                times.append(time.perf_counter() - t0)
            if prof is not None:
                prof.__exit__(None, None, None)
                table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60)
        return times, table

    decode(models["bfloat16"], 16)  # first-call set-up
    decode(models["float32"], 16)
    try:
        for k, (dt, label, off) in enumerate(SDPA_VARIANTS):
            for f in flags:
                getattr(torch.backends.cuda, f"enable_{f}_sdp")(saved[f] and f not in off)
            start = 40 + 100 * (k - 1 if "seen" in label else k)
            times, _ = decode(models[dt], start)
            out["variants"].append(
                {
                    "dtype": dt,
                    "variant": label,
                    "kv_lengths": f"{start + 1}-{start + steps}",
                    "step_ms_median": round(statistics.median(times) * 1000, 2),
                    "step_ms_max": round(max(times) * 1000, 2),
                }
            )
        for f in flags:
            getattr(torch.backends.cuda, f"enable_{f}_sdp")(saved[f])
        out["profile_bfloat16_new_shapes"] = decode(models["bfloat16"], 40 + 100 * len(SDPA_VARIANTS), True)[1]
        out["profile_float32_new_shapes"] = decode(models["float32"], 40 + 100 * (len(SDPA_VARIANTS) + 1), True)[1]
    finally:
        for f in flags:
            getattr(torch.backends.cuda, f"enable_{f}_sdp")(saved[f])
        del models
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return out


# --- the full path: nats-server + worker + gateway ---------------------------------------------------
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


# --- trainer ---------------------------------------------------------------------------------------
def trainer_phase(model_dir: Path, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    from schemas.training import EffectiveLora, EventKind, HyperParams, Progress
    from services.trainer import loop

    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches".split()
    rows = []
    for i in range(args.train_batch * args.train_steps):
        answer = " ".join(words[(i + j) % len(words)] for j in range(args.train_words))
        rows.append({"instruction": f"Write sentence number {i} about animals.", "output": answer})
    root.mkdir(parents=True, exist_ok=True)
    dataset = root / "train.jsonl"
    dataset.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    hp = HyperParams(
        batch_size=args.train_batch,
        epochs=1,
        max_seq_length=args.train_seq,
        eval_split=0.0,
        save_steps=10**6,
        eval_steps=10**6,
    )
    plan = loop.Plan(
        job_id="gpu-check",
        model_path=str(model_dir),
        max_model_len=8192,
        dataset_file=dataset,
        output_path=root / "job",
        hp=hp,
        lora=EffectiveLora.merge(hp, None),
        device=args.device,
    )
    events: list[tuple[float, str, dict[str, Any]]] = []
    tokens: list[int] = []
    dtypes: list[str] = []

    class Control:
        def requested(self) -> None:
            return None

        def report(self, kind: EventKind, progress: Progress, message: str = "") -> None:
            if args.device.startswith("cuda"):
                import torch

                torch.cuda.synchronize()  # the loop synchronised already (float(loss)); cheap insurance
            events.append((time.monotonic(), kind, {"loss": progress.loss, "tps": progress.tokens_per_second}))

    collate = loop._Run._collate
    wrap = loop._Run._wrap

    def counting_collate(self: Any, batch: Any) -> dict[str, Any]:
        inputs = collate(self, batch)
        tokens.append(int(inputs["attention_mask"].sum()))
        return inputs

    def noting_wrap(self: Any, base: Any) -> Any:
        dtypes.append(str(next(base.parameters()).dtype))
        return wrap(self, base)

    loop._Run._collate = counting_collate  # type: ignore[method-assign]
    loop._Run._wrap = noting_wrap  # type: ignore[method-assign]
    started = time.monotonic()
    try:
        outcome = loop.run(plan, Control())
    finally:
        loop._Run._collate = collate  # type: ignore[method-assign]
        loop._Run._wrap = wrap  # type: ignore[method-assign]
    total_s = time.monotonic() - started
    steps = [e for e in events if e[1] == "step"]
    begin = next(e[0] for e in events if e[1] in ("started", "resumed"))
    times = [b[0] - a[0] for a, b in zip([(begin, "", {}), *steps], steps, strict=False)]
    measured = times[1:] or times
    toks = tokens[1 : len(times)] or tokens[: len(times)]
    # The loop's own rate after step k is sum(tokens)/sum(its per-step elapsed) over its window (<= 20
    # steps): back its per-step `elapsed` out of the successive rates to compare it with the wall clock.
    loop_tps = steps[-1][2]["tps"] if steps else None
    spent = [sum(tokens[: k + 1]) / e[2]["tps"] for k, e in enumerate(steps[:20]) if e[2]["tps"]]
    loop_elapsed = [b - a for a, b in zip([0.0, *spent], spent, strict=False)][1:]
    return {
        "result": outcome.result,
        "steps": len(steps),
        "batch": args.train_batch,
        "max_seq_length": args.train_seq,
        "model_dtype": dtypes[0] if dtypes else None,
        "lora": {
            "r": plan.lora.r,
            "alpha": plan.lora.lora_alpha,
            "targets": plan.lora.target_modules or "peft default",
        },
        "tokens_per_step": tokens,
        "first_step_s": round(times[0], 3) if times else None,
        "s_per_step_median": round(statistics.median(measured), 4) if measured else None,
        "wall_tokens_per_s": round(sum(toks) / sum(measured), 1) if measured else None,
        "loop_reported_tokens_per_s_last": loop_tps,
        "loop_own_s_per_step_median": round(statistics.median(loop_elapsed), 4) if loop_elapsed else None,
        "loss_first_last": [steps[0][2]["loss"], steps[-1][2]["loss"]] if steps else None,
        "losses": [e[2]["loss"] for e in steps],
        "total_s": round(total_s, 1),
        "adapter_saved": bool(outcome.adapter_path and outcome.adapter_path.exists()),
    }


# --- the project's own engine tests, on this device ---------------------------------------------------
PYTEST_FILES = ("tests/engine/test_transformers_engine.py", "tests/trainer/test_engine_adapters.py")


def pytest_phase(model_dir: Path, root: Path, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Run the engine's CPU tests unchanged; their engines use device "auto", which is CUDA where there is
    one. Their registry's default model (whose tokenizer the tests' tiny model takes) is the random one."""
    import torch

    root.mkdir(parents=True, exist_ok=True)
    registry = {
        "default": "smol",
        "models": {
            "smol": {"name": "smol", "engine": "transformers", "modelPath": str(model_dir), "maxModelLen": 8192}
        },
    }
    (root / "models.json").write_text(json.dumps(registry))
    env = dict(os.environ, CY_LLM_MODELS_FILE=str(root / "models.json"), PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    cmd = [
        sys.executable, "-m", "pytest", "-q", "-p", "pytest_asyncio.plugin", "-p", "no:cacheprovider",
        f"--basetemp={root / 'tmp'}", "--junitxml", str(root / "junit.xml"), *args.pytest_files,
    ]  # fmt: skip
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.pytest_timeout)
    (out / "pytest.log").write_text(proc.stdout + proc.stderr)
    tail = [line for line in proc.stdout.splitlines() if line.strip()][-1:]
    return {
        "files": list(args.pytest_files),
        "engine_device_auto": "cuda" if torch.cuda.is_available() else "cpu",
        "returncode": proc.returncode,
        "summary": tail[0] if tail else "",
        "failed": [line for line in proc.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))],
        "wall_s": round(time.monotonic() - started, 1),
    }


# --- the summary -----------------------------------------------------------------------------------
def _f(v: Any, nd: int = 1) -> str:
    return "-" if v is None else f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def render(data: dict[str, Any]) -> str:
    f = data.get("facts", {})
    lines = [
        "# GPU check (infra/gpu/check.py)",
        "",
        f"Device: {f.get('gpu', f.get('device'))}; torch {f.get('torch')}, transformers {f.get('transformers')}, "
        f"peft {f.get('peft')}, CUDA {f.get('cuda')}; python {f.get('python')}. Run took {data.get('elapsed_s')} s.",
        "",
    ]
    if "model" in data:
        m = data["model"]
        lines += [
            f"Model: SmolLM2-135M-Instruct architecture ({m['layers']} layers, {m['params'] / 1e6:.1f} M params), "
            f"**{m['weights']}**.",
            "",
        ]
    ph = data["phases"]
    inproc = [k for k in ph if k.startswith("inprocess")]
    if inproc:
        lines += [
            "## In-process engine (TransformersEngine + Batcher), greedy, fixed length",
            "",
            f"Spec: >= {SPEC_STREAM_TPS:g} tokens/s per stream, TTFT <= {SPEC_TTFT_MS:g} ms.",
            "",
            "| dtype | streams | requests | TTFT p50 ms | TTFT p99 ms | per-stream tok/s p50 | aggregate tok/s "
            "| all full length | spec |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
        ]
        for k in inproc:
            r = ph[k]
            for row in r.get("levels", []):
                label = r["dtype"] + (f" ({r['sdpa']})" if "sdpa" in r else "")
                ok = (row["stream_tps_p50"] or 0) >= SPEC_STREAM_TPS and (row["ttft_ms_p50"] or 1e9) <= SPEC_TTFT_MS
                lines.append(
                    f"| {label} | {row['concurrency']} | {row['requests']} | {_f(row['ttft_ms_p50'])} "
                    f"| {_f(row['ttft_ms_p99'])} | {_f(row['stream_tps_p50'])} | {_f(row['aggregate_tps'])} "
                    f"| {row['all_full_length']} | {'meets' if ok else 'MISSES'} |"
                )
        lines.append("")
        for k in inproc:
            r = ph[k]
            lines.append(
                f"- {r['dtype']}{' (' + r['sdpa'] + ')' if 'sdpa' in r else ''}: load {r.get('load_s')} s, "
                f"first request TTFT {r.get('first_request', {}).get('ttft_ms')} ms "
                f"(cold), slots {r['slots']}, {r['max_new_tokens']} new tokens, "
                f"peak GPU memory {r.get('max_memory_allocated_gib', '-')} GiB"
            )
            if "batch_invariance" in r:
                b = r["batch_invariance"]
                lines.append(
                    f"  - alone vs in a batch of {b['prompts']} ({b['max_new_tokens']} greedy tokens): "
                    f"{b['identical']}/{b['prompts']} identical; alone repeatable: {b['alone_repeatable']}; "
                    f"divergent (prompt: first token index): {b['first_divergent_token_by_prompt'] or 'none'}"
                )
        lines.append("")
    brk = [k for k in ph if k.startswith("breakdown")]
    if brk:
        lines += [
            "## Where a decode step goes (engine with timers; medians per step)",
            "",
            "forward = the model's forward incl. a device sync; dispatch = its host-side part (before the sync); "
            "pick = the per-row token choice (`Batcher._pick`, one `int()` sync per row); other = the rest of "
            "`_decode_step`.",
            "",
            "| dtype | rows | step ms | forward ms | of which host dispatch ms | pick ms (all rows) | other ms |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for k in brk:
            for row in ph[k]["levels"]:
                lines.append(
                    f"| {ph[k]['dtype']} | {row['rows']} | {row.get('step_ms')} | {row.get('forward_ms')} "
                    f"| {row.get('dispatch_ms')} | {row.get('pick_ms')} | {row.get('other_ms')} |"
                )
        lines.append("")
    if "attn" in ph:
        a = ph["attn"]
        lines += [
            "## Decode forward under SDPA backend switches (batch 1, synced per step)",
            "",
            f"Backends enabled by default: {a['backends_enabled_by_default']}.",
            "",
            "| dtype | SDPA backends | KV lengths | step ms median | step ms max |",
            "| --- | --- | --- | ---: | ---: |",
            *[
                f"| {v['dtype']} | {v['variant']} | {v['kv_lengths']} | {v['step_ms_median']} | {v['step_ms_max']} |"
                for v in a["variants"]
            ],
            "",
            "Host-side profile, bfloat16, default backends, new KV lengths (top ops by self CPU time):",
            "",
            "```",
            a.get("profile_bfloat16_new_shapes", ""),
            "```",
            "",
        ]
    if "stack" in ph:
        s = ph["stack"]
        base = {row["concurrency"]: row for row in ph.get("inprocess_float32", {}).get("levels", [])}
        lines += [
            "## Full path: nats-server + worker + gateway (float32), ratio to in-process float32 of this run",
            "",
            f"Stack ready after {s.get('ready_s')} s, slots {s['slots']}.",
            "",
            "| path | streams | TTFT p50 ms | per-stream tok/s p50 | aggregate tok/s | aggregate / in-process "
            "| TTFT / in-process | all full length |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for path in ("gateway", "nats"):
            for row in s.get(path, []):
                b = base.get(row["concurrency"], {})
                agg = (
                    row["aggregate_tps"] / b["aggregate_tps"]
                    if b.get("aggregate_tps") and row["aggregate_tps"]
                    else None
                )
                tt = row["ttft_ms_p50"] / b["ttft_ms_p50"] if b.get("ttft_ms_p50") and row["ttft_ms_p50"] else None
                lines.append(
                    f"| {path} | {row['concurrency']} | {_f(row['ttft_ms_p50'])} | {_f(row['stream_tps_p50'])} "
                    f"| {_f(row['aggregate_tps'])} | {_f(agg, 2)} | {_f(tt, 2)} | {row['all_full_length']} |"
                )
        lines.append("")
    if "trainer" in ph:
        t = ph["trainer"]
        lines += [
            "## Trainer (services/trainer/loop.py), LoRA",
            "",
            f"{t['steps']} steps, batch {t['batch']}, up to {t['max_seq_length']} tokens/row "
            f"({t['tokens_per_step'][:3]}... tokens/step), model dtype {t['model_dtype']}, LoRA {t['lora']}: "
            f"first step {t['first_step_s']} s, then median **{t['s_per_step_median']} s/step**, "
            f"**{t['wall_tokens_per_s']} tokens/s** (wall clock between step reports); the loop's own "
            f"tokens/s figure after the last step: {t['loop_reported_tokens_per_s_last']} (its window includes "
            f"the first step); the loop's own per-step time, backed out of its figures: "
            f"{t.get('loop_own_s_per_step_median')} s/step median. Loss {t['loss_first_last']}; "
            f"result {t['result']}, adapter saved {t['adapter_saved']}.",
            "",
        ]
    if "pytest" in ph:
        t = ph["pytest"]
        lines += [
            f"## The project's engine tests on this device (engine device auto = {t['engine_device_auto']})",
            "",
            f"`pytest {' '.join(t['files'])}`: {t['summary']} (exit {t['returncode']}, {t['wall_s']} s)",
            *[f"- {line}" for line in t["failed"]],
            "",
        ]
    for name, why in data["skipped"].items():
        lines.append(f"- skipped {name}: {why}")
    for name, err in data.get("errors", {}).items():
        lines.append(f"- FAILED {name}: {err.splitlines()[-1] if err else ''}")
    return "\n".join(lines) + "\n"


# --- main ------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m infra.gpu.check", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (for a smoke run)")
    p.add_argument("--quick", action="store_true", help="2-layer model, short outputs, few requests (CPU smoke)")
    p.add_argument("--src", type=Path, default=REPO / ".gpu" / "smol-src", help="config.json + tokenizer files")
    p.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "cy-gpu-check")
    p.add_argument(
        "--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else REPO / ".gpu" / "out"
    )
    p.add_argument("--budget-s", type=float, default=330, help="start no phase after this many seconds")
    p.add_argument(
        "--phases",
        default="inprocess,breakdown,attn,trainer,bf16,bf16-nocudnn,stack,pytest",
        help="comma-separated subset",
    )
    p.add_argument("--pytest-files", nargs="*", default=list(PYTEST_FILES), help="test files for the pytest phase")
    p.add_argument("--pytest-timeout", type=float, default=150)
    p.add_argument("--bf16-levels", default="", help="concurrency levels for bfloat16 (default: float32's)")
    p.add_argument("--std", type=float, default=0.05, help="init std of the engine's random model")
    p.add_argument("--nats-server", type=Path, default=REPO / ".gpu" / "nats-server")
    args = p.parse_args(argv)
    q = args.quick
    args.layers = 2 if q else 0
    args.slots = 32
    args.max_new = 16 if q else 128
    args.levels = [1, 4] if q else [1, 4, 16, 32]
    args.bf16_levels = [int(x) for x in args.bf16_levels.split(",")] if args.bf16_levels else args.levels
    args.stack_levels = [1, 4] if q else [1, 16]
    args.rounds, args.singles = (1, 2) if q else (2, 4)
    args.check_prompts, args.check_tokens = (4, 8) if q else (16, 24)
    args.stack_timeout = 240
    args.train_steps, args.train_batch, args.train_seq, args.train_words = (2, 2, 64, 40) if q else (8, 8, 512, 400)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from services.runtime import configure_logging

    configure_logging("gpu-check", level="warning")
    report = Report(args.out, args)
    data = report.data
    wanted = set(args.phases.split(","))
    if args.nats_server.exists():
        os.environ["PATH"] = f"{args.nats_server.resolve().parent}{os.pathsep}{os.environ.get('PATH', '')}"
    data["facts"] = facts(args.device)
    say(f"facts: {data['facts']}")
    model_dir, train_dir = args.work / "model", args.work / "model-train"
    data["model"] = build_model(args.src, model_dir, layers=args.layers, std=args.std)
    data["train_model"] = build_model(args.src, train_dir, layers=args.layers, zero_special=False)
    say(f"models: {data['model']} {data['train_model']}")
    report.save()

    def phase(name: str, fn: Callable[[], dict[str, Any]], needs: str) -> None:
        if needs not in wanted:
            data["skipped"][name] = "not asked for (--phases)"
        elif report.elapsed() > args.budget_s:
            data["skipped"][name] = f"time budget ({args.budget_s:g} s) spent before it could start"
        else:
            say(f"phase {name} ...")
            started = time.monotonic()
            try:
                data["phases"][name] = fn() | {"phase_s": round(time.monotonic() - started, 1)}
            except Exception:
                data.setdefault("errors", {})[name] = traceback.format_exc()
                say(f"phase {name} FAILED:\n{data['errors'][name]}")
            say(f"phase {name} done in {time.monotonic() - started:.1f} s")
        report.save()

    phase(
        "inprocess_float32", lambda: asyncio.run(inprocess_phase(model_dir, "float32", args.device, args)), "inprocess"
    )

    def breakdown(dtype: str) -> dict[str, Any]:
        return asyncio.run(breakdown_phase(model_dir, dtype, args.device, args))

    for dt in ("float32", "bfloat16"):
        phase(f"breakdown_{dt}", functools.partial(breakdown, dt), "breakdown")
    phase("attn", lambda: attn_phase(model_dir, args.device, args), "attn")

    phase("trainer", lambda: trainer_phase(train_dir, args.work / "trainer", args), "trainer")
    phase("inprocess_bfloat16", lambda: asyncio.run(inprocess_phase(model_dir, "bfloat16", args.device, args)), "bf16")

    def bf16_without_cudnn() -> dict[str, Any]:
        """The engine in bfloat16 with PyTorch's cuDNN attention backend switched off (process-wide)."""
        import torch

        enabled = torch.backends.cuda.cudnn_sdp_enabled()
        torch.backends.cuda.enable_cudnn_sdp(False)
        try:
            return asyncio.run(inprocess_phase(model_dir, "bfloat16", args.device, args)) | {"sdpa": "cuDNN off"}
        finally:
            torch.backends.cuda.enable_cudnn_sdp(enabled)

    phase("inprocess_bfloat16_nocudnn", bf16_without_cudnn, "bf16-nocudnn")
    missing = [m for m in ("nats", "quart", "hypercorn") if _missing(m)]
    if missing:
        data["skipped"]["stack"] = f"python packages missing: {missing}"
    elif shutil.which("nats-server") is None:
        data["skipped"]["stack"] = "no nats-server binary"
    else:
        phase("stack", lambda: stack_phase(model_dir, args.work / "stack", args, args.out), "stack")
    if _missing("pytest_asyncio"):
        data["skipped"]["pytest"] = "pytest-asyncio is not installed"
    else:
        phase("pytest", lambda: pytest_phase(model_dir, args.work / "pytest", args, args.out), "pytest")
    report.save()
    print(render(data))
    return 1 if data.get("errors") else 0


def _missing(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


if __name__ == "__main__":
    sys.exit(main())
