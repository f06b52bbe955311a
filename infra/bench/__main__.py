"""`just bench [--quick] [--no-transformers] [--profile [STREAMS]] [--vllm [PYTHON]]`: the performance report.

Every stack names its worker's engine (CY_LLM_ENGINE), so the figures never depend on what the registry's
"auto" picks on this machine. Starts, one after the other (so each start is timed on its own):
  1. the in-process transformers engine (the floor of the transformers stack: no NATS, no HTTP), in a
     subprocess of its own;
  2. our stack as production runs it on a CPU (nats-server + a cpu-openvino worker + gateway, separate
     processes), measured through the gateway and through a direct NATS publisher;
  3. unless --no-transformers: a second stack whose worker runs CY_LLM_ENGINE=transformers (same slots,
     same gateway settings), the engine cpu-openvino replaced;
  4. with --vllm: a third stack whose worker runs the cpu-vllm engine from the vLLM venv (see
     infra/bench/vllm_stack.py for its settings; the first start compiles for minutes);
  5. the peer, `transformers serve --continuous-batching`, on the same model folder.
Then, for each concurrency level in turn, runs every target at that level back to back (in-process,
direct NATS, gateway with cpu-openvino, gateway with transformers, gateway with cpu-vllm, peer): same
prompts, greedy decoding, fixed output length. Interleaving by level puts the figures that are compared
close together in time. On a machine shared with other work that is not enough (the engines' threads
stall whenever another process takes a core), so every level also reports how many cores other processes
took while it ran: trust the levels where that is near 0.
Writes bench-results/bench-<time>-<mode>.{json,png} plus a folder with every component's log, and
prints the table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
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
from infra.bench.nats_load import connect, connect_publisher, nats_request, worker_info
from infra.bench.peer import PeerServer, missing_requirements, peer_request
from infra.bench.profile import Profiler
from infra.bench.report import DEFAULT_ENGINE, TRANSFORMERS_TARGET
from infra.bench.stack import PUBLISHER, QUEUE_TIMEOUT_S, QUIET_ENV, RATE_LIMIT_ENV, Stack, StackError
from infra.bench.workloads import FULL, PROMPTS, QUICK, OneRequest, TokenCounter, Workload, run_level
from services.runtime import REPO_ROOT

LevelRunner = Callable[[int], Awaitable[dict[str, Any]]]


def stage(text: str) -> None:
    print(f"[bench] {text}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="just bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer levels and requests, shorter outputs (<5 min)")
    parser.add_argument(
        "--levels", help="concurrency levels (every target; direct NATS only at those also in 1,16), e.g. 1,8,16,32"
    )
    parser.add_argument("--max-new-tokens", type=int, help="output length per request")
    parser.add_argument("--slots", type=int, default=int(os.environ.get("CY_LLM_SLOTS", "32")), help="worker slots")
    parser.add_argument("--no-peer", action="store_true", help="skip `transformers serve`")
    parser.add_argument(
        "--no-transformers",
        action="store_true",
        help="skip the second stack whose worker runs CY_LLM_ENGINE=transformers (the in-process floor, "
        "a transformers engine too, still runs)",
    )
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
        "(gateway and the cpu-openvino worker's asyncio process, not its OpenVINO engine process; kept out "
        "of the tables) and print where the time went",
    )
    parser.add_argument(
        "--engine-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment variable for every engine process (workers, in-process, peer), e.g. "
        "OMP_WAIT_POLICY=PASSIVE; CY_LLM_ENGINE is set per stack and cannot be changed here",
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
            await self._start_transformers(stack)
            await self._start_vllm(stack)
            self._check_slots()
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
        stage("starting 1/5: in-process transformers engine (the floor of the transformers stack)")
        target = InProcessTarget(self.workload, self.args.slots, dict(os.environ, **QUIET_ENV, **self.env))
        await stack.enter_async_context(target)
        self.startup["inprocess_load_s"] = target.load_s
        self.targets["in-process"] = (self.workload.inprocess_levels, target.level)
        assert target.proc is not None
        self.pids["in-process"] = {"engine": target.proc.pid}

    async def _launch(
        self,
        stack: contextlib.AsyncExitStack,
        name: str,
        folder: str,
        engine: str,
        *,
        worker_python: str | None = None,
        worker_env: dict[str, str] | None = None,
        timeout: float = 300,
    ) -> tuple[Stack, OneRequest]:
        """Start one stack whose worker runs `engine`, wait for its first token, check that the worker
        announced that engine. Raises StackError (the stack is stopped by then)."""
        ours = Stack(
            self.run_dir / folder,
            model_id=self.model_id,
            slots=self.args.slots,
            engine=engine,
            env=self.env,
            worker_python=worker_python,
            worker_env=worker_env,
        )
        stack.callback(ours.stop)
        try:
            ours.start(timeout=timeout)  # blocking on purpose: nothing else runs, children come from the main thread
        except StackError:
            ours.stop()
            raise
        client = await stack.enter_async_context(make_client(max(self.workload.levels)))
        gateway = gateway_request(client, ours.base_url, ours.api_key, self.counter)
        first = await gateway(PROMPTS[0], 8)  # includes the worker's first forward pass
        self.startup[f"{name}_ready_s"] = ours.ready_s
        self.startup[f"{name}_first_token_s"] = (ours.ready_s or 0) + (first.ttft or 0)
        stage(f"    model ready behind the {engine} stack's gateway after {ours.ready_s:.1f} s")
        observer = await connect(ours.nats_url, ours.token)
        try:
            self.workers[name] = info = await worker_info(observer, "bench-1")
        finally:
            await observer.drain()
        if info.get("engine") != engine:
            ours.stop()
            raise StackError(
                f"the worker announced engine {info.get('engine')!r}, not {engine!r}", ours.root / "worker.log"
            )
        self.pids[name] = {
            "engine": ours.pid("worker"),  # with its children: OpenVINO's and vLLM's engine processes
            "gateway": ours.pid("gateway"),
            "nats-server": ours.pid("nats"),
        }
        return ours, gateway

    def _add_gateway(self, name: str, gateway: OneRequest) -> None:
        async def level(c: int) -> dict[str, Any]:
            return (await run_level(name, gateway, c, self.workload)).to_json()

        self.targets[name] = (self.workload.levels, level)

    async def _start_ours(self, stack: contextlib.AsyncExitStack) -> None:
        stage(f"starting 2/5: our stack as in production: nats-server + {DEFAULT_ENGINE} worker + gateway")
        ours, gateway = await self._launch(stack, "gateway", "stack", DEFAULT_ENGINE)
        nc = await connect_publisher(ours.nats_url, PUBLISHER, ours.publisher_password)
        stack.push_async_callback(nc.drain)
        direct = nats_request(nc, self.model_id, self.counter, owner=PUBLISHER)

        async def nats_level(c: int) -> dict[str, Any]:
            return (await run_level("nats", direct, c, self.workload)).to_json()

        async def profiled_repeat(c: int) -> None:
            """The level again under py-spy, kept out of the tables (sampling costs CPU)."""
            pids = {"gateway": ours.pid("gateway"), "worker": ours.pid("worker")}
            with Profiler(pids, self.run_dir / "profile", gil={"worker-gil": ours.pid("worker")}) as prof:
                profiled = await run_level("gateway, py-spy", gateway, c, self.workload)
            self.profile = {"streams": c, "level": profiled.summary(), **prof.summaries()}

        self.profiled_repeat = profiled_repeat
        self.targets["nats"] = (self.workload.nats_levels, nats_level)
        self._add_gateway("gateway", gateway)
        self.pids["nats"] = self.pids["gateway"]

    async def _start_transformers(self, stack: contextlib.AsyncExitStack) -> None:
        """The same stack with a transformers worker (the engine before cpu-openvino); skipped when it fails."""
        if self.args.no_transformers:
            self.skipped[TRANSFORMERS_TARGET] = "--no-transformers"
            return
        stage("starting 3/5: a second stack with a transformers worker (same slots, same gateway settings)")
        try:
            _, gateway = await self._launch(stack, TRANSFORMERS_TARGET, "stack-transformers", "transformers")
        except StackError as exc:
            self.skipped[TRANSFORMERS_TARGET] = f"the transformers stack did not start: {exc}"
            stage(f"    {self.skipped[TRANSFORMERS_TARGET]}")
            return
        self._add_gateway(TRANSFORMERS_TARGET, gateway)

    async def _start_vllm(self, stack: contextlib.AsyncExitStack) -> None:
        """The same stack with a cpu-vllm worker from the vLLM venv; skipped (with the reason) when that fails."""
        if not self.args.vllm:
            return
        python = self.args.vllm
        versions, why = vllm_stack.probe(python)
        if why:
            self.skipped[vllm_stack.TARGET] = why
            stage(f"skipping 4/5: {why}")
            return
        omp = os.environ.get("OMP_NUM_THREADS", "")
        threads = self.args.threads or (int(omp) if omp.isdigit() else os.cpu_count() or 1)
        env = vllm_stack.worker_env(python, threads, self.env)
        self.vllm = {"python": python, **versions, "env": vllm_stack.reported_env(env)}
        stage(
            f"starting 4/5: a third stack with a cpu-vllm worker (vllm {versions.get('vllm')}, {python}); "
            f"a first start compiles the model for minutes (up to {vllm_stack.START_TIMEOUT_S:g} s allowed)"
        )
        try:
            _, gateway = await self._launch(
                stack,
                vllm_stack.TARGET,
                "stack-vllm",
                "cpu-vllm",
                worker_python=python,
                worker_env=env,
                timeout=vllm_stack.START_TIMEOUT_S,
            )
        except StackError as exc:
            self.skipped[vllm_stack.TARGET] = f"the cpu-vllm stack did not start: {exc}"
            stage(f"    {self.skipped[vllm_stack.TARGET]}")
            return
        self._add_gateway(vllm_stack.TARGET, gateway)

    def _check_slots(self) -> None:
        slots = {name: info.get("slots") for name, info in self.workers.items()}
        if len(set(slots.values())) > 1:
            stage(f"    warning: the workers run different slot counts after start: {slots}")

    async def _start_peer(self, stack: contextlib.AsyncExitStack) -> None:
        missing = missing_requirements()
        if self.args.no_peer or missing:
            pip = f"`transformers serve` needs {', '.join(missing)} (pip install {' '.join(missing)})"
            self.skipped["peer"] = "--no-peer" if self.args.no_peer else pip
            return
        stage("starting 5/5: peer: transformers serve --continuous-batching on the same model folder")
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
    given = sys.argv[1:] if argv is None else argv
    if "--workload=persona" in given or ("--workload", "persona") in itertools.pairwise(given):
        from infra.bench import persona  # the game workload: a bench of its own (infra/bench/persona.py)

        return persona.main(given)
    args = parse_args(argv)
    exit_on_sigterm()
    workload = build_workload(args)
    mode = "quick" if args.quick else "full"
    run_dir = args.out / time.strftime(f"bench-%Y%m%d-%H%M%S-{mode}")
    run_dir.mkdir(parents=True, exist_ok=True)

    from services.engine.engines import openvino_weights
    from services.models.files import ensure_model, ensure_openvino
    from services.models.registry import load_registry

    resolved = load_registry().resolve("default")
    assert resolved is not None  # load_registry checks that the default model exists
    model_id, spec = resolved
    model_dir = ensure_model(spec)
    # The export (~40 s the first time) is not part of the cpu-openvino stack's start time.
    ensure_openvino(spec, openvino_weights())
    facts = machine_facts()
    watch, others = CpuWatch(), OtherProcesses()
    watch.start()
    others.start()
    bench = Bench(args, workload, run_dir, model_id, model_dir)
    interrupted = ""
    try:
        asyncio.run(bench.run())
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: every target is stopped by now
        if not bench.levels:
            raise
        # On a busy shared machine a run can take far longer than planned: keep the levels that finished.
        interrupted = f"interrupted ({exc or 'Ctrl-C'}) after {len(bench.levels)} target-levels"
        stage(f"{interrupted}; reporting those")
    facts["loadavg_at_end"] = os.getloadavg()
    results: dict[str, Any] = {
        "mode": mode,
        "model_id": model_id,
        "model_dir": str(model_dir),
        "slots": args.slots,
        "threads": args.threads,
        "engine_env": bench.env,
        "gateway_queue_timeout_s": float(QUEUE_TIMEOUT_S),
        "gateway_rate_limits": RATE_LIMIT_ENV,
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
    if interrupted:
        results["interrupted"] = interrupted
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
    return 130 if interrupted else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except StackError as exc:
        print(f"[bench] failed: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
