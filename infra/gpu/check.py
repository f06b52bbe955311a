"""`python -m infra.gpu.check`: the project's own engine and trainer on a CUDA GPU, in one short run.

CI has no GPU, so this is the one place that measures and checks the CUDA path. In order of priority
(a phase starts only while the time budget allows; results are written after every phase):

1. in-process engine (TransformersEngine + Batcher, no NATS/HTTP), float32 as the registry serves it:
   one warm-up, then single-stream TTFT and decode tokens/s and aggregate tokens/s at 1, 4, 16, 32
   concurrent closed-loop streams, greedy, fixed output length (`infra.bench.workloads.run_level`);
2. greedy output of 16 prompts, each alone, then all 16 together (the CPU test's contract) on that engine;
3. the full path: nats-server -js, `python -m services.engine`, `python -m gateway` (`infra.bench.stack`),
   driven over HTTP/SSE and over NATS directly at 1 and 16 streams, as a ratio to (1)'s figures;
4. a few LoRA steps through the trainer's own loop (`services.trainer.loop.run`), s/step and tokens/s;
5. (1) and (2) again in bfloat16.

The model is the SmolLM2-135M-Instruct architecture built from its real config.json and tokenizer with
RANDOM weights (the real weights are too large to carry to the GPU machine). Throughput does not depend
on the weight values. So that every request runs to its fixed length, the embedding rows of the 17
special tokens (EOS among them) are zeroed: with tied embeddings their logits are then 0 while the best
of the other 49k random logits is positive, so greedy decoding never picks them (and never emits text
that decodes to nothing).

Writes results.json and summary.md into --out (default $OUT, else .gpu/out). See infra/gpu/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
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


def build_model(src: Path, target: Path, *, layers: int) -> dict[str, Any]:
    """SmolLM2's config + tokenizer, random float32 weights (seed 0), special-token rows zeroed."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    started = time.monotonic()
    config = AutoConfig.from_pretrained(src)
    if layers:
        config.num_hidden_layers = layers
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model = model.to(torch.float32)
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
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
        "weights": "random (normal, std=initializer_range, seed 0); special-token rows zeroed",
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

    result: dict[str, Any] = {"dtype": dtype, "slots": args.slots, "max_new_tokens": args.max_new}
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
        await run_level("warm-up", one, max(args.levels), warm)
        workload = Workload(args.max_new, (), (), (), rounds=args.rounds, single_requests=args.singles)
        result["levels"] = []
        for c in args.levels:
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
                ok = (row["stream_tps_p50"] or 0) >= SPEC_STREAM_TPS and (row["ttft_ms_p50"] or 1e9) <= SPEC_TTFT_MS
                lines.append(
                    f"| {r['dtype']} | {row['concurrency']} | {row['requests']} | {_f(row['ttft_ms_p50'])} "
                    f"| {_f(row['ttft_ms_p99'])} | {_f(row['stream_tps_p50'])} | {_f(row['aggregate_tps'])} "
                    f"| {row['all_full_length']} | {'meets' if ok else 'MISSES'} |"
                )
        lines.append("")
        for k in inproc:
            r = ph[k]
            lines.append(
                f"- {r['dtype']}: load {r.get('load_s')} s, "
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
    p.add_argument("--phases", default="inprocess,stack,trainer,bf16,pytest", help="comma-separated subset")
    p.add_argument("--pytest-files", nargs="*", default=list(PYTEST_FILES), help="test files for the pytest phase")
    p.add_argument("--pytest-timeout", type=float, default=150)
    p.add_argument("--nats-server", type=Path, default=REPO / ".gpu" / "nats-server")
    args = p.parse_args(argv)
    q = args.quick
    args.layers = 2 if q else 0
    args.slots = 32
    args.max_new = 16 if q else 128
    args.levels = [1, 4] if q else [1, 4, 16, 32]
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
    data["model"] = build_model(args.src, args.work / "model", layers=args.layers)
    say(f"model: {data['model']}")
    report.save()
    model_dir = args.work / "model"

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
    missing = [m for m in ("nats", "quart", "hypercorn") if _missing(m)]
    if missing:
        data["skipped"]["stack"] = f"python packages missing: {missing}"
    elif shutil.which("nats-server") is None:
        data["skipped"]["stack"] = "no nats-server binary"
    else:
        phase("stack", lambda: stack_phase(model_dir, args.work / "stack", args, args.out), "stack")
    phase("trainer", lambda: trainer_phase(model_dir, args.work / "trainer", args), "trainer")
    phase("inprocess_bfloat16", lambda: asyncio.run(inprocess_phase(model_dir, "bfloat16", args.device, args)), "bf16")
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
