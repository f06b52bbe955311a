"""`just bench [--quick] [--profile [STREAMS]] [--vllm [PYTHON]]`: the performance report.

Starts, one after the other (so each start is timed on its own):
  1. the in-process engine (the floor: no NATS, no HTTP), in a subprocess of its own;
  2. our stack (nats-server + worker + gateway, separate processes, as in production);
  3. with --vllm: a second stack whose worker runs the cpu-vllm engine from the vLLM venv (see
     infra/bench/vllm_stack.py for its settings; the first start compiles for minutes);
  4. the peer, `transformers serve --continuous-batching`, on the same model folder.
Then, for each concurrency level in turn, runs every target at that level back to back (in-process,
direct NATS, gateway, gateway with the cpu-vllm worker, peer): same prompts, greedy decoding, fixed output
length. Interleaving by level puts the figures that are compared close together in time. On a machine
shared with other work that is not enough (torch's two threads stall whenever another process takes a
core), so every level also reports how many cores other processes took while it ran: trust the levels
where that is near 0.
Writes bench-results/bench-<time>-<mode>.{json,png} plus a folder with every component's log, and
prints the table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from infra.bench import report, vllm_stack
from infra.bench._children import exit_on_sigterm
from infra.bench._sse import make_client
from infra.bench.facts import CpuWatch, OtherProcesses, ProcessCpu, machine_facts
from infra.bench.gateway_load import gateway_request
from infra.bench.inprocess import InProcessTarget
from infra.bench.nats_load import connect, nats_request, worker_info
from infra.bench.peer import PeerServer, missing_requirements, peer_request
from infra.bench.profile import Profiler
from infra.bench.stack import QUEUE_TIMEOUT_S, QUIET_ENV, Stack, StackError
from infra.bench.workloads import FULL, PROMPTS, QUICK, TokenCounter, Workload, run_level
from services.runtime import REPO_ROOT

LevelRunner = Callable[[int], Awaitable[dict[str, Any]]]


def stage(text: str) -> None:
    print(f"[bench] {text}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="just bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer levels and requests, shorter outputs (<5 min)")
    parser.add_argument("--levels", help="concurrency levels (in-process, gateway, peer), e.g. 1,4,16,32")
    parser.add_argument("--max-new-tokens", type=int, help="output length per request")
    parser.add_argument("--slots", type=int, default=int(os.environ.get("CY_LLM_SLOTS", "32")), help="worker slots")
    parser.add_argument("--no-peer", action="store_true", help="skip `transformers serve`")
    parser.add_argument(
        "--vllm",
        nargs="?",
        const=vllm_stack.default_python(),
        metavar="PYTHON",
        help="also measure a stack whose worker runs CY_LLM_ENGINE=cpu-vllm on this interpreter "
        f"(default {vllm_stack.default_python()}, from `bash infra/vllm_venv.sh`), same slots; "
        "OMP_NUM_THREADS = cores, VLLM_CPU_OMP_THREADS_BIND=nobind, CY_LLM_VLLM_ENABLE_LORA=false (torch.compile "
        "on) unless --engine-env says otherwise (infra/bench/vllm_stack.py says why)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="torch threads for every engine (OMP_NUM_THREADS); default: torch's own choice, as in production",
    )
    parser.add_argument(
        "--profile",
        type=int,
        metavar="STREAMS",
        nargs="?",
        const=16,
        help="after the gateway level with STREAMS streams (default 16), run it once more under py-spy "
        "(gateway and worker; kept out of the tables) and print where the time went",
    )
    parser.add_argument(
        "--engine-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment variable for every engine process (worker, in-process, peer), e.g. OMP_WAIT_POLICY=PASSIVE",
    )
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench-results", help="results folder")
    args = parser.parse_args(argv)
    if args.vllm:
        args.vllm = str(Path(args.vllm).expanduser())
    return args


def build_workload(args: argparse.Namespace) -> Workload:
    workload = QUICK if args.quick else FULL
    if args.levels:
        levels = tuple(int(x) for x in args.levels.split(","))
        nats_levels = tuple(c for c in workload.nats_levels if c in levels) or levels[:1]
        workload = dataclasses.replace(workload, levels=levels, inprocess_levels=levels, nats_levels=nats_levels)
    if args.max_new_tokens:
        workload = dataclasses.replace(workload, max_new_tokens=args.max_new_tokens)
    if args.profile and args.profile not in workload.levels:
        workload = dataclasses.replace(workload, levels=tuple(sorted({*workload.levels, args.profile})))
    return workload


class Bench:
    """Starts the targets, runs the levels interleaved, collects everything into `results`."""

    def __init__(self, args: argparse.Namespace, workload: Workload, run_dir: Path, model_id: str, model_dir: Path):
        self.args, self.workload, self.run_dir = args, workload, run_dir
        self.model_id, self.model_dir = model_id, model_dir
        self.counter = TokenCounter(model_dir)
        self.targets: dict[str, tuple[tuple[int, ...], LevelRunner]] = {}
        self.pids: dict[str, dict[str, int]] = {}
        self.startup: dict[str, float | None] = {}
        self.skipped: dict[str, str] = {}
        self.levels: list[dict[str, Any]] = []
        self.profile: dict[str, Any] = {}
        self.profiled_repeat: Callable[[int], Awaitable[None]] | None = None
        self.workers: dict[str, dict[str, Any]] = {}
        self.vllm: dict[str, Any] = {}
        self.env = dict(item.split("=", 1) for item in args.engine_env)
        if args.threads:
            self.env["OMP_NUM_THREADS"] = str(args.threads)

    async def run(self) -> None:
        async with contextlib.AsyncExitStack() as stack:
            await self._start_inprocess(stack)
            await self._start_ours(stack)
            await self._start_vllm(stack)
            await self._start_peer(stack)
            w = self.workload
            stage(f"measuring: {w.max_new_tokens} new tokens per request, levels {sorted(self._all_levels())}")
            for c in sorted(self._all_levels()):
                for name, (levels, runner) in self.targets.items():
                    if c in levels:
                        self.levels.append(await self._level(name, runner, c))
                    if name == "gateway" and c == self.args.profile and self.profiled_repeat is not None:
                        await self.profiled_repeat(c)
            stage("stopping")

    async def _level(self, name: str, runner: LevelRunner, concurrency: int) -> dict[str, Any]:
        """One level of one target, with the CPU time each of the target's processes spent on it."""
        ours = sorted({pid for pids in self.pids.values() for pid in pids.values()})
        cpu = ProcessCpu(self.pids.get(name, {}), ours)
        cpu.start()
        level = await runner(concurrency)
        level["cpu_s"] = cpu.stop()
        return level

    def _all_levels(self) -> set[int]:
        return {c for levels, _ in self.targets.values() for c in levels}

    async def _start_inprocess(self, stack: contextlib.AsyncExitStack) -> None:
        stage("starting 1/4: in-process engine (the floor)")
        target = InProcessTarget(self.workload, self.args.slots, dict(os.environ, **QUIET_ENV, **self.env))
        await stack.enter_async_context(target)
        self.startup["inprocess_load_s"] = target.load_s
        self.targets["in-process"] = (self.workload.inprocess_levels, target.level)
        assert target.proc is not None
        self.pids["in-process"] = {"engine": target.proc.pid}

    async def _start_ours(self, stack: contextlib.AsyncExitStack) -> None:
        stage("starting 2/4: our stack: nats-server + worker + gateway (separate processes)")
        ours = Stack(self.run_dir / "stack", model_id=self.model_id, slots=self.args.slots, env=self.env)
        stack.callback(ours.stop)
        ours.start()  # blocking on purpose: nothing else runs yet, and children must come from the main thread
        client = await stack.enter_async_context(make_client(max(self.workload.levels)))
        gateway = gateway_request(client, ours.base_url, ours.api_key, self.counter)
        first = await gateway(PROMPTS[0], 8)  # includes the worker's first forward pass
        self.startup["stack_ready_s"] = ours.ready_s
        self.startup["stack_first_token_s"] = (ours.ready_s or 0) + (first.ttft or 0)
        stage(f"    model ready behind the gateway after {ours.ready_s:.1f} s")
        nc = await connect(ours.nats_url, ours.token)
        stack.push_async_callback(nc.drain)
        self.workers["gateway"] = await worker_info(nc, "bench-1")
        direct = nats_request(nc, self.model_id, self.counter)

        async def nats_level(c: int) -> dict[str, Any]:
            return (await run_level("nats", direct, c, self.workload)).to_json()

        async def gateway_level(c: int) -> dict[str, Any]:
            return (await run_level("gateway", gateway, c, self.workload)).to_json()

        async def profiled_repeat(c: int) -> None:
            """The level again under py-spy, kept out of the tables (sampling costs CPU)."""
            pids = {"gateway": ours.pid("gateway"), "worker": ours.pid("worker")}
            with Profiler(pids, self.run_dir / "profile", gil={"worker-gil": ours.pid("worker")}) as prof:
                profiled = await run_level("gateway, py-spy", gateway, c, self.workload)
            self.profile = {"streams": c, "level": profiled.summary(), **prof.summaries()}

        self.profiled_repeat = profiled_repeat
        self.targets["nats"] = (self.workload.nats_levels, nats_level)
        self.targets["gateway"] = (self.workload.levels, gateway_level)
        pids = {"engine": ours.pid("worker"), "gateway": ours.pid("gateway"), "nats-server": ours.pid("nats")}
        self.pids["nats"] = self.pids["gateway"] = pids

    async def _start_vllm(self, stack: contextlib.AsyncExitStack) -> None:
        """The same stack with a cpu-vllm worker from the vLLM venv; skipped (with the reason) when that fails."""
        if not self.args.vllm:
            return
        python = self.args.vllm
        versions, why = vllm_stack.probe(python)
        if why:
            self.skipped[vllm_stack.TARGET] = why
            stage(f"skipping 3/4: {why}")
            return
        omp = os.environ.get("OMP_NUM_THREADS", "")
        threads = self.args.threads or (int(omp) if omp.isdigit() else os.cpu_count() or 1)
        env = vllm_stack.worker_env(python, threads, self.env)
        self.vllm = {"python": python, **versions, "env": vllm_stack.reported_env(env)}
        stage(
            f"starting 3/4: a second stack with a cpu-vllm worker (vllm {versions.get('vllm')}, {python}); "
            f"a first start compiles the model for minutes (up to {vllm_stack.START_TIMEOUT_S:g} s allowed)"
        )
        root = self.run_dir / "stack-vllm"
        vstack = Stack(
            root, model_id=self.model_id, slots=self.args.slots, env=self.env, worker_python=python, worker_env=env
        )
        stack.callback(vstack.stop)
        try:
            vstack.start(timeout=vllm_stack.START_TIMEOUT_S)  # blocking on purpose, as for our stack
        except StackError as exc:
            vstack.stop()
            self.skipped[vllm_stack.TARGET] = f"the cpu-vllm stack did not start: {exc}"
            stage(f"    {self.skipped[vllm_stack.TARGET]}")
            return
        client = await stack.enter_async_context(make_client(max(self.workload.levels)))
        gateway = gateway_request(client, vstack.base_url, vstack.api_key, self.counter)
        first = await gateway(PROMPTS[0], 8)
        self.startup["vllm_ready_s"] = vstack.ready_s
        self.startup["vllm_first_token_s"] = (vstack.ready_s or 0) + (first.ttft or 0)
        stage(f"    model ready behind the cpu-vllm stack's gateway after {vstack.ready_s:.1f} s")
        nc = await connect(vstack.nats_url, vstack.token)
        self.workers[vllm_stack.TARGET] = await worker_info(nc, "bench-1")
        await nc.drain()
        slots = {name: info.get("slots") for name, info in self.workers.items()}
        if len(set(slots.values())) > 1:
            stage(f"    warning: the workers run different slot counts after start: {slots}")

        async def vllm_level(c: int) -> dict[str, Any]:
            return (await run_level(vllm_stack.TARGET, gateway, c, self.workload)).to_json()

        self.targets[vllm_stack.TARGET] = (self.workload.levels, vllm_level)
        self.pids[vllm_stack.TARGET] = {
            "engine": vstack.pid("worker"),  # with vLLM's engine process (its child)
            "gateway": vstack.pid("gateway"),
            "nats-server": vstack.pid("nats"),
        }

    async def _start_peer(self, stack: contextlib.AsyncExitStack) -> None:
        missing = missing_requirements()
        if self.args.no_peer or missing:
            pip = f"`transformers serve` needs {', '.join(missing)} (pip install {' '.join(missing)})"
            self.skipped["peer"] = "--no-peer" if self.args.no_peer else pip
            return
        stage("starting 4/4: peer: transformers serve --continuous-batching on the same model folder")
        w = self.workload
        peer = PeerServer(
            self.run_dir / "peer",
            self.model_dir,
            max_streams=max(w.levels),
            max_tokens_per_stream=128 + w.max_new_tokens,
            env=self.env,
        )
        stack.callback(peer.stop)
        peer.start()  # blocking on purpose, as for our stack
        client = await stack.enter_async_context(make_client(max(w.levels)))
        one = peer_request(client, peer, self.counter)
        first = await one(PROMPTS[0], 8)  # its continuous-batching manager starts on the first request
        self.startup["peer_ready_s"] = peer.ready_s
        self.startup["peer_first_token_s"] = (peer.ready_s or 0) + (first.ttft or 0)

        async def peer_level(c: int) -> dict[str, Any]:
            return (await run_level("peer", one, c, self.workload)).to_json()

        self.targets["peer"] = (w.levels, peer_level)
        assert peer.proc is not None
        self.pids["peer"] = {"engine": peer.proc.pid}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    exit_on_sigterm()
    workload = build_workload(args)
    mode = "quick" if args.quick else "full"
    run_dir = args.out / time.strftime(f"bench-%Y%m%d-%H%M%S-{mode}")
    run_dir.mkdir(parents=True, exist_ok=True)

    from infra.model_files import ensure_model
    from services.engine.registry import load_registry

    resolved = load_registry().resolve("default")
    assert resolved is not None  # load_registry checks that the default model exists
    model_id, spec = resolved
    model_dir = ensure_model(spec)
    facts = machine_facts()
    watch, others = CpuWatch(), OtherProcesses()
    watch.start()
    others.start()
    bench = Bench(args, workload, run_dir, model_id, model_dir)
    asyncio.run(bench.run())
    facts["loadavg_at_end"] = os.getloadavg()
    results: dict[str, Any] = {
        "mode": mode,
        "model_id": model_id,
        "model_dir": str(model_dir),
        "slots": args.slots,
        "threads": args.threads,
        "engine_env": bench.env,
        "gateway_queue_timeout_s": float(QUEUE_TIMEOUT_S),
        "workload": dataclasses.asdict(workload),
        "prompts": list(PROMPTS),
        "facts": facts,
        "other_load": {**(watch.stop() or {}), "top_processes": others.stop()},
        "startup": bench.startup,
        "levels": bench.levels,
        "skipped": bench.skipped,
        "workers": bench.workers,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if bench.profile:
        results["profile"] = bench.profile
    if bench.vllm:
        results["vllm"] = bench.vllm
    json_path, png_path = run_dir.with_suffix(".json"), run_dir.with_suffix(".png")
    report.write_json(results, json_path)
    plotted = report.plot(results, png_path)
    print(report.table(results))
    if bench.profile:
        print(report.profile_text(bench.profile))
    print(f"\nraw figures: {json_path}")
    print(f"plot:        {png_path}" if plotted else "plot:        skipped (pip install matplotlib)")
    print(f"logs:        {run_dir}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except StackError as exc:
        print(f"[bench] failed: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
