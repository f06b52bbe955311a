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
that decodes to nothing). See infra/gpu/model.py (build_model) for the init std and the trainer's model.

Writes results.json and summary.md into --out (default $OUT, else .gpu/out). See infra/gpu/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from infra.gpu import REPO
from infra.gpu.attn import attn_phase
from infra.gpu.breakdown import breakdown_phase
from infra.gpu.engine import inprocess_phase
from infra.gpu.machine import facts
from infra.gpu.model import build_model
from infra.gpu.report import Report, render
from infra.gpu.stack import stack_phase
from infra.gpu.suite import PYTEST_FILES, pytest_phase
from infra.gpu.trainer import trainer_phase


def say(text: str) -> None:
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


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
    if args.nats_server.exists():
        os.environ["PATH"] = f"{args.nats_server.resolve().parent}{os.pathsep}{os.environ.get('PATH', '')}"
    data["facts"] = facts(args.device)
    say(f"facts: {data['facts']}")
    model_dir, train_dir = args.work / "model", args.work / "model-train"
    data["model"] = build_model(args.src, model_dir, layers=args.layers, std=args.std)
    data["train_model"] = build_model(args.src, train_dir, layers=args.layers, zero_special=False)
    say(f"models: {data['model']} {data['train_model']}")
    report.save()
    run_phases(_Phases(report, args), model_dir, train_dir, args)
    report.save()
    print(render(data))
    return 1 if data.get("errors") else 0


class _Phases:
    """Runs one phase at a time while it is asked for and the budget allows; saves the report after each."""

    def __init__(self, report: Report, args: argparse.Namespace) -> None:
        self.report, self.data = report, report.data
        self.budget_s = args.budget_s
        self.wanted = set(args.phases.split(","))

    def __call__(self, name: str, fn: Callable[[], dict[str, Any]], needs: str) -> None:
        data = self.data
        if needs not in self.wanted:
            data["skipped"][name] = "not asked for (--phases)"
        elif self.report.elapsed() > self.budget_s:
            data["skipped"][name] = f"time budget ({self.budget_s:g} s) spent before it could start"
        else:
            say(f"phase {name} ...")
            started = time.monotonic()
            try:
                data["phases"][name] = fn() | {"phase_s": round(time.monotonic() - started, 1)}
            except Exception:
                data.setdefault("errors", {})[name] = traceback.format_exc()
                say(f"phase {name} FAILED:\n{data['errors'][name]}")
            say(f"phase {name} done in {time.monotonic() - started:.1f} s")
        self.report.save()


def run_phases(phase: _Phases, model_dir: Path, train_dir: Path, args: argparse.Namespace) -> None:
    """The phases in their order (infra/gpu/README.md); a phase that cannot run here is noted as skipped."""
    skipped = phase.data["skipped"]

    def inprocess(dtype: str) -> dict[str, Any]:
        return asyncio.run(inprocess_phase(model_dir, dtype, args.device, args))

    def breakdown(dtype: str) -> dict[str, Any]:
        return asyncio.run(breakdown_phase(model_dir, dtype, args.device, args))

    phase("inprocess_float32", functools.partial(inprocess, "float32"), "inprocess")
    for dt in ("float32", "bfloat16"):
        phase(f"breakdown_{dt}", functools.partial(breakdown, dt), "breakdown")
    phase("attn", lambda: attn_phase(model_dir, args.device, args), "attn")

    phase("trainer", lambda: trainer_phase(train_dir, args.work / "trainer", args), "trainer")
    phase("inprocess_bfloat16", functools.partial(inprocess, "bfloat16"), "bf16")
    phase("inprocess_bfloat16_nocudnn", functools.partial(_bf16_without_cudnn, inprocess), "bf16-nocudnn")
    missing = [m for m in ("nats", "quart", "hypercorn") if _missing(m)]
    if missing:
        skipped["stack"] = f"python packages missing: {missing}"
    elif shutil.which("nats-server") is None:
        skipped["stack"] = "no nats-server binary"
    else:
        phase("stack", lambda: stack_phase(model_dir, args.work / "stack", args, args.out), "stack")
    if _missing("pytest_asyncio"):
        skipped["pytest"] = "pytest-asyncio is not installed"
    else:
        phase("pytest", lambda: pytest_phase(model_dir, args.work / "pytest", args, args.out), "pytest")


def _bf16_without_cudnn(inprocess: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
    """The engine in bfloat16 with PyTorch's cuDNN attention backend switched off (process-wide)."""
    import torch

    enabled = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        return inprocess("bfloat16") | {"sdpa": "cuDNN off"}
    finally:
        torch.backends.cuda.enable_cudnn_sdp(enabled)


def _missing(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


if __name__ == "__main__":
    sys.exit(main())
