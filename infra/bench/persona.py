"""The game workload (issue 21): P players, each T turns with one NPC, over 2 workers, per routing mode.

`just bench --workload persona [--players 32] [--turns 6] [--workers 2] [--modes shared,session]` (or
`python -m infra.bench.persona ...`) starts, once per routing mode, a stack of its own (nats-server, the
gateway, `--workers` cpu-openvino workers with the machine's cores split between them) and plays:
every player at once, each sending its turns one after the other through `/v1/chat/completions` (streamed,
`user` = the player): the NPC's shared ~1,200-token persona as the system message, the player's history so
far, a new line. Modes: `shared` is CY_LLM_SESSION_ROUTING=false (any free worker takes the next request),
`session` the cache-aware routing (gateway/session_router.py).

Reported per mode: TTFT p50/p95 of turn 1 and of turns >= 2 (and per turn), the share of the prompt tokens
of turns >= 2 that the engines served from their prefix cache (`usage.prompt_tokens_details.cached_tokens`,
when the engine reports it), the requests each worker served (its Prometheus counter) and their skew
(max - min over the mean), and the ratio of the session mode's turn >= 2 TTFT p50 to the shared mode's,
measured in the same run. Writes bench-results/persona-<time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from infra.bench._sse import make_client, sse_events
from infra.bench.stack import Stack

REPO_ROOT = Path(__file__).resolve().parents[2]
_WORDS = (
    "ancient harbor lantern guild silver river mountain forge shadow oath merchant tavern rumor dragon "
    "winter market scholar temple ruin caravan storm garden library captain knight witch bridge valley"
).split()


def persona(sentences: int = 90, seed: int = 7) -> str:
    """The NPC's persona and world notes: deterministic prose of ~1,200 tokens."""
    rng = random.Random(seed)
    lines = ["You are Maren, the innkeeper of the Gilded Anchor. Stay in character and answer briefly."]
    for n in range(sentences):
        words = " ".join(rng.choice(_WORDS) for _ in range(9))
        lines.append(f"Lore {n}: the {words}.")
    return "\n".join(lines)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def play(
    client: Any, stack: Stack, player: str, turns: int, system: str, max_tokens: int, rows: list[dict[str, Any]]
) -> None:
    history: list[dict[str, str]] = [{"role": "system", "content": system}]
    headers = {"Authorization": f"Bearer {stack.api_key}"}
    url = f"http://127.0.0.1:{stack.lite_port}/v1/chat/completions"
    for turn in range(1, turns + 1):
        history.append({"role": "user", "content": f"{player} asks (turn {turn}): what news from the harbor?"})
        body = {
            "model": stack.model_id,
            "messages": history,
            "max_tokens": max_tokens,
            "temperature": 0,
            "user": player,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        sent = time.perf_counter()
        ttft: float | None = None
        text: list[str] = []
        usage: dict[str, Any] = {}
        async for event in sse_events(client, url, body, headers):
            for choice in event.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content") or ""
                if piece and ttft is None:
                    ttft = time.perf_counter() - sent
                text.append(piece)
            usage = event.get("usage") or usage
        history.append({"role": "assistant", "content": "".join(text)})
        details = usage.get("prompt_tokens_details") or {}
        rows.append(
            {
                "player": player,
                "turn": turn,
                "ttft_s": ttft if ttft is not None else time.perf_counter() - sent,
                "prompt_tokens": int(usage.get("prompt_tokens", 0)),
                "cached_tokens": details.get("cached_tokens"),
            }
        )


def served_per_worker(stack: Stack) -> dict[str, float]:
    """Requests each worker finished, from its Prometheus counter."""
    served: dict[str, float] = {}
    for name, port in zip(stack.worker_names, stack.metrics_ports, strict=True):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            total = 0.0
            for line in resp.read().decode().splitlines():
                if line.startswith("cy_llm:generation_requests_total{"):
                    total += float(line.rsplit(" ", 1)[1])
        served[name] = total
    return served


async def run_mode(mode: str, args: argparse.Namespace, root: Path, model_id: str) -> dict[str, Any]:
    threads = max(1, (os.cpu_count() or 2) // args.workers)
    stack = Stack(
        root / mode,
        model_id=model_id,
        slots=args.slots,
        engine="cpu-openvino",
        env={"CY_LLM_SESSION_ROUTING": "true" if mode == "session" else "false"},
        worker_env={"CY_LLM_ENGINE_THREADS": str(threads)},
        workers=args.workers,
    )
    stack.start(timeout=600)
    try:
        system = persona()
        async with make_client(args.players) as client:
            # Every worker up and warm (a hinted request waits for its worker): none of the players pays that.
            for n in range(1, args.workers + 1):
                warm = {
                    "modelId": model_id,
                    "prompt": "hello",
                    "workerHint": f"bench-{n}",
                    "generation": {"maxNewTokens": 2},
                }
                r = await client.post(
                    f"{stack.base_url}/api/v1/inference", json=warm, headers={"X-API-Key": stack.api_key}
                )
                r.raise_for_status()
            before = served_per_worker(stack)
            rows: list[dict[str, Any]] = []
            started = time.perf_counter()
            await asyncio.gather(
                *(
                    play(client, stack, f"player-{i}", args.turns, system, args.max_tokens, rows)
                    for i in range(args.players)
                )
            )
            wall = time.perf_counter() - started
        after = served_per_worker(stack)
    finally:
        stack.stop()
    served = {name: after[name] - before[name] for name in after}
    mean = statistics.mean(served.values()) or 1.0
    later = [r for r in rows if r["turn"] >= 2]
    cached = [r for r in later if r["cached_tokens"] is not None]
    by_turn = {
        t: round(percentile([r["ttft_s"] for r in rows if r["turn"] == t], 0.5) * 1000)
        for t in range(1, args.turns + 1)
    }
    return {
        "mode": mode,
        "wall_s": round(wall, 1),
        "ttft_turn1_p50_ms": round(percentile([r["ttft_s"] for r in rows if r["turn"] == 1], 0.5) * 1000),
        "ttft_turn1_p95_ms": round(percentile([r["ttft_s"] for r in rows if r["turn"] == 1], 0.95) * 1000),
        "ttft_later_p50_ms": round(percentile([r["ttft_s"] for r in later], 0.5) * 1000),
        "ttft_later_p95_ms": round(percentile([r["ttft_s"] for r in later], 0.95) * 1000),
        "ttft_p50_ms_by_turn": by_turn,
        "cached_share_later": (
            round(sum(r["cached_tokens"] for r in cached) / max(1, sum(r["prompt_tokens"] for r in cached)), 3)
            if cached
            else None
        ),
        "served_per_worker": served,
        "skew": round((max(served.values()) - min(served.values())) / mean, 3),
        "rows": rows,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="just bench --workload persona", description=__doc__.split("\n")[0])
    parser.add_argument("--workload", default="persona", choices=["persona"])
    parser.add_argument("--players", type=int, default=32)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--slots", type=int, default=16, help="slots per worker")
    parser.add_argument("--max-tokens", type=int, default=16, help="answer length per turn")
    parser.add_argument("--modes", default="shared,session")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench-results")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from services.engine.engines import openvino_weights
    from services.models.files import ensure_model, ensure_openvino
    from services.models.registry import load_registry

    resolved = load_registry().resolve("default")
    assert resolved is not None
    model_id, spec = resolved
    ensure_model(spec)
    ensure_openvino(spec, openvino_weights())  # the export is not part of any mode's time
    results = []
    with tempfile.TemporaryDirectory(prefix="cy-persona-") as tmp:
        for mode in args.modes.split(","):
            results.append(asyncio.run(run_mode(mode, args, Path(tmp), model_id)))
    print(
        f"\npersona workload: {args.players} players x {args.turns} turns, {args.workers} workers, "
        f"{args.max_tokens} tokens per answer"
    )
    print(f"{'mode':8} {'turn1 p50/p95 ms':>17} {'turns>=2 p50/p95 ms':>20} {'cached>=2':>9} {'skew':>5}  per worker")
    for r in results:
        share = "n/a" if r["cached_share_later"] is None else f"{r['cached_share_later']:.0%}"
        print(
            f"{r['mode']:8} {r['ttft_turn1_p50_ms']:>8}/{r['ttft_turn1_p95_ms']:<8} "
            f"{r['ttft_later_p50_ms']:>10}/{r['ttft_later_p95_ms']:<9} {share:>9} {r['skew']:>5.0%}  "
            f"{r['served_per_worker']}  by turn p50: {r['ttft_p50_ms_by_turn']}"
        )
    modes = {r["mode"]: r for r in results}
    if {"shared", "session"} <= modes.keys():
        ratio = modes["session"]["ttft_later_p50_ms"] / max(1, modes["shared"]["ttft_later_p50_ms"])
        print(f"session / shared, TTFT p50 of turns >= 2 (same run): {ratio:.2f}x")
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / time.strftime("persona-%Y%m%d-%H%M%S.json")
    out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=1))
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
