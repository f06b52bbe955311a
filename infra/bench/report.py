"""Turn a run's raw figures into the stdout table (with the ratios), the JSON file and the PNG plot.

Absolute figures drift with the machine and with whatever else runs on it; the ratios against the
baselines measured in the same run are what the table leads with: the production default (cpu-openvino
behind the gateway) against the transformers engine behind its own gateway and against the peer, and each
path's overhead against a target that runs the same engine.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DEFAULT_ENGINE = "cpu-openvino"  # what production runs on a CPU: the "gateway" and "nats" targets' worker
TRANSFORMERS_TARGET = "gateway-transformers"
TARGETS = ("in-process", "nats", "gateway", TRANSFORMERS_TARGET, "gateway-vllm", "peer")
LABELS = {
    "in-process": "in-process transformers",
    "nats": "direct NATS, cpu-openvino",
    "gateway": "gateway, cpu-openvino",
    TRANSFORMERS_TARGET: "gateway, transformers",
    "gateway-vllm": "gateway, cpu-vllm",
    "peer": "transformers serve --cb",
}
# The acceptance figures for the default engine through the gateway (all from the same run).
GOAL_STREAM_TPS_1 = 50.0  # tokens/s per stream at 1 stream, at least
GOAL_TTFT_MS_1 = 200.0  # TTFT p50 at 1 stream, at most
GOAL_TTFT_MS_16 = 300.0  # TTFT p50 at 16 streams, at most
GOAL_OVER_TRANSFORMERS = 2.5  # aggregate tokens/s against the transformers worker at 8 and 32 streams
GOAL_OVER_PEER = 3.0  # ... and against `transformers serve`
GOAL_RATIO_LEVELS = (8, 32)

Summary = dict[str, Any]


def by_target(results: dict[str, Any]) -> dict[str, dict[int, Summary]]:
    out: dict[str, dict[int, Summary]] = {}
    for level in results["levels"]:
        out.setdefault(level["target"], {})[level["concurrency"]] = level["summary"]
    return out


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _sub(a: float | None, b: float | None) -> float | None:
    return a - b if a is not None and b is not None else None


def ratios(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per concurrency level: the cpu-openvino gateway against the transformers gateway and the peer; each
    path's overhead against a target with the same engine (transformers gateway / in-process transformers,
    cpu-openvino gateway / direct NATS); the cpu-vllm worker against the transformers one."""
    t = by_target(results)
    inproc, ov, nats, tf, peer, vllm = (
        t.get(k, {}) for k in ("in-process", "gateway", "nats", TRANSFORMERS_TARGET, "peer", "gateway-vllm")
    )
    rows = []
    for c in sorted(set(ov) | set(nats) | set(tf) | set(peer) | set(vllm)):
        base = inproc.get(c, {})
        g, n, f, p, v = ov.get(c, {}), nats.get(c, {}), tf.get(c, {}), peer.get(c, {}), vllm.get(c, {})
        rows.append(
            {
                "concurrency": c,
                "openvino_over_transformers_agg_tps": _div(g.get("aggregate_tps"), f.get("aggregate_tps")),
                "openvino_over_transformers_stream_tps": _div(g.get("stream_tps_p50"), f.get("stream_tps_p50")),
                "openvino_over_transformers_ttft": _div(g.get("ttft_ms_p50"), f.get("ttft_ms_p50")),
                "openvino_over_peer_agg_tps": _div(g.get("aggregate_tps"), p.get("aggregate_tps")),
                "openvino_over_peer_ttft": _div(g.get("ttft_ms_p50"), p.get("ttft_ms_p50")),
                "transformers_gw_over_inprocess_agg_tps": _div(f.get("aggregate_tps"), base.get("aggregate_tps")),
                "transformers_gw_minus_inprocess_ttft_ms": _sub(f.get("ttft_ms_p50"), base.get("ttft_ms_p50")),
                "transformers_over_peer_agg_tps": _div(f.get("aggregate_tps"), p.get("aggregate_tps")),
                "gateway_over_nats_agg_tps": _div(g.get("aggregate_tps"), n.get("aggregate_tps")),
                "gateway_minus_nats_ttft_ms": _sub(g.get("ttft_ms_p50"), n.get("ttft_ms_p50")),
                "vllm_over_transformers_agg_tps": _div(v.get("aggregate_tps"), f.get("aggregate_tps")),
                "vllm_over_transformers_stream_tps": _div(v.get("stream_tps_p50"), f.get("stream_tps_p50")),
                "vllm_minus_transformers_ttft_ms": _sub(v.get("ttft_ms_p50"), f.get("ttft_ms_p50")),
            }
        )
    return rows


def goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The acceptance figures for cpu-openvino through the gateway: what was measured, the bound, met or not
    (None where a side was not measured)."""
    t = by_target(results)
    ov = t.get("gateway", {})
    by_level = {r["concurrency"]: r for r in ratios(results)}
    out: list[dict[str, Any]] = []

    def add(what: str, value: float | None, bound: float, at_least: bool, unit: str) -> None:
        met = None if value is None else (value >= bound if at_least else value <= bound)
        out.append({"goal": what, "value": value, "bound": bound, "at_least": at_least, "unit": unit, "met": met})

    one = ov.get(1, {})
    add("1 stream: tokens/s per stream (p50)", one.get("stream_tps_p50"), GOAL_STREAM_TPS_1, True, "tok/s")
    add("1 stream: TTFT p50", one.get("ttft_ms_p50"), GOAL_TTFT_MS_1, False, "ms")
    for c in GOAL_RATIO_LEVELS:
        r = by_level.get(c, {})
        add(
            f"{c} streams: aggregate / transformers worker",
            r.get("openvino_over_transformers_agg_tps"),
            GOAL_OVER_TRANSFORMERS,
            True,
            "x",
        )
        add(
            f"{c} streams: aggregate / transformers serve",
            r.get("openvino_over_peer_agg_tps"),
            GOAL_OVER_PEER,
            True,
            "x",
        )
    add("16 streams: TTFT p50", ov.get(16, {}).get("ttft_ms_p50"), GOAL_TTFT_MS_16, False, "ms")
    return out


def _f(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _grid(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = "  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(header, widths, strict=True)))
    out = [line, "-" * len(line)]
    for r in rows:
        out.append("  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths, strict=True))))
    return "\n".join(out)


def table(results: dict[str, Any]) -> str:
    """The human-readable report: context line, ratios first, then the absolute figures."""
    facts, work = results["facts"], results["workload"]
    dirty = " (dirty)" if facts["git_dirty"] else ""
    threads = results.get("threads") or f"default ({facts['torch_threads']})"
    parts = [
        f"CY-LLM bench ({results['mode']}): {results['model_id']}, {work['max_new_tokens']} new tokens per request, "
        f"greedy, chat prompts; worker slots {results['slots']}; "
        f"torch threads (transformers engine, peer) {threads}"
        + (
            f"; gateway queue timeout {results['gateway_queue_timeout_s']:g} s"
            if results.get("gateway_queue_timeout_s")
            else ""
        )
        + (
            "; gateway rate limits " + " ".join(f"{k}={v}" for k, v in results["gateway_rate_limits"].items())
            if results.get("gateway_rate_limits")
            else ""
        ),
        f"machine: {facts['cpu_model']}, {facts['cores']} cores, torch {facts['torch']}, "
        f"transformers {facts['transformers']}, openvino-genai {facts.get('openvino_genai')}, "
        f"commit {facts['git_commit'][:10]}{dirty}",
    ]
    if results.get("interrupted"):
        parts.append(f"INCOMPLETE: {results['interrupted']}; the levels below are the ones that finished")
    if results.get("engine_env"):
        parts.append("engine environment: " + " ".join(f"{k}={v}" for k, v in results["engine_env"].items()))
    vllm = results.get("vllm")
    if vllm:
        parts.append(
            f"cpu-vllm worker: vllm {vllm.get('vllm')}, torch {vllm.get('torch')}, transformers "
            f"{vllm.get('transformers')} ({vllm['python']}); "
            + " ".join(f"{k}={v}" for k, v in vllm.get("env", {}).items())
        )
    workers = results.get("workers") or {}
    if workers:
        parts.append(
            "workers after start: "
            + "; ".join(
                f"{LABELS.get(name, name)}: engine {w.get('engine')}, slots {w.get('slots')}, "
                f"max_model_len {w.get('max_model_len')}"
                for name, w in workers.items()
            )
        )
    other = results.get("other_load")
    if other and "other_cpu_s" in other:
        busy = other["other_cores_avg"] > 0.2
        verdict = (
            "the figures below are distorted, ratios included (the engines' threads stall when a core is taken): "
            "rerun on a quiet machine or compare levels with a low 'other load'"
            if busy
            else "a quiet machine"
        )
        parts.append(
            f"other processes used {other['other_cpu_s']} CPU-s during the {other['wall_s']} s run "
            f"(~{other['other_cores_avg']} of {facts['cores']} cores on average): {verdict}"
        )
        for label, cpu in other.get("top_processes", []):
            parts.append(f"  {cpu:7.1f} CPU-s  {label}")
    with_vllm = "gateway-vllm" in by_target(results)
    rrows = [
        [
            str(r["concurrency"]),
            _f(r["openvino_over_transformers_agg_tps"], ".2f"),
            _f(r["openvino_over_transformers_stream_tps"], ".2f"),
            _f(r["openvino_over_transformers_ttft"], ".2f"),
            _f(r["openvino_over_peer_agg_tps"], ".2f"),
            _f(r["openvino_over_peer_ttft"], ".2f"),
            _f(r["transformers_over_peer_agg_tps"], ".2f"),
            _f(r["transformers_gw_over_inprocess_agg_tps"], ".2f"),
            _f(r["transformers_gw_minus_inprocess_ttft_ms"], "+.0f"),
            _f(r["gateway_over_nats_agg_tps"], ".2f"),
            _f(r["gateway_minus_nats_ttft_ms"], "+.0f"),
            *(
                [_f(r["vllm_over_transformers_agg_tps"], ".2f"), _f(r["vllm_minus_transformers_ttft_ms"], "+.0f")]
                if with_vllm
                else []
            ),
        ]
        for r in ratios(results)
        if any(v is not None for k, v in r.items() if k != "concurrency")
    ]
    parts += [
        "",
        "Ratios (same run, same machine; '-' = a side not measured at that level)",
        _grid(
            [
                "streams",
                "ov/tf agg",
                "ov/tf stream",
                "ov/tf TTFT",
                "ov/peer agg",
                "ov/peer TTFT",
                "tf/peer agg",
                "tf gw/inproc agg",
                "tf gw-inproc TTFT",
                "ov gw/nats agg",
                "ov gw-nats TTFT",
                *(["vllm/tf agg", "vllm-tf TTFT"] if with_vllm else []),
            ],
            rrows,
        ),
        "  ov = gateway with the cpu-openvino worker (production default), tf = gateway with the transformers",
        "  worker (same slots and gateway settings), peer = transformers serve --cb, inproc = the transformers",
        "  engine in-process (tf's floor), nats = a direct NATS publisher to the cpu-openvino stack;",
        "  agg = aggregate tokens/s, stream = per-stream decode tokens/s (p50), TTFT = p50 (a ratio, or a",
        "  difference in ms where signed)",
        *(
            ["  vllm/tf = the cpu-vllm worker against the transformers worker, each behind its own gateway"]
            if with_vllm
            else []
        ),
    ]
    t = by_target(results)
    cpu_by = {(lv["target"], lv["concurrency"]): lv.get("cpu_s") or {} for lv in results["levels"]}
    arows = []
    for target in TARGETS:
        for c, s in sorted(t.get(target, {}).items()):
            arows.append(
                [
                    LABELS[target],
                    str(c),
                    f"{s['requests'] - s['errors']}/{s['requests']}",
                    _f(s["ttft_ms_p50"], ".0f"),
                    _f(s.get("ttft_ms_p95"), ".0f"),
                    _f(s["stream_tps_p50"], ".1f"),
                    _f(s["aggregate_tps"], ".1f"),
                    "-" if s.get("queued_ms_p50") is None else f"{s['queued_ms_p50']:.0f}/{s['queued_ms_p99']:.0f}",
                    ",".join(f"{k}:{v}" for k, v in sorted(s["finish_reasons"].items())),
                    _f(cpu_by.get((target, c), {}).get("other_cores"), ".2f"),
                    _f(cpu_by.get((target, c), {}).get("idle_targets_cores"), ".2f"),
                ]
            )
    parts += [
        "",
        "Absolute figures",
        _grid(
            [
                "target",
                "streams",
                "ok",
                "TTFT p50 ms",
                "TTFT p95 ms",
                "tok/s/stream p50",
                "agg tok/s",
                "queued ms",
                "finish",
                "other load",
                "idle ours",
            ],
            arows,
        ),
        "  queued = p50/p99 wait until a worker accepted the request (seen by the direct NATS client only)",
        "  other load = cores that other users' processes took on average while that level ran",
        "  idle ours = cores that this bench's other targets (idle meanwhile) took on average while that level ran",
        *(
            [
                f"  levels above {results['slots']} streams: our workers (and the in-process engine) run at most "
                f"{results['slots']} sequences at once (CY_LLM_SLOTS); the rest wait in the queue, and TTFT shows it"
            ]
            if max(results["workload"]["levels"]) > results["slots"]
            else []
        ),
    ]
    checks = goals(results)
    if any(g["value"] is not None for g in checks):
        parts += ["", "Acceptance figures, cpu-openvino through the gateway (same run)"]
        for g in checks:
            verdict = "not measured" if g["met"] is None else "met" if g["met"] else "MISSED"
            unit = "x" if g["unit"] == "x" else f" {g['unit']}"
            fmt = ".2f" if g["unit"] == "x" else ".1f" if g["unit"] == "tok/s" else ".0f"
            bound = f"{'>=' if g['at_least'] else '<='} {g['bound']:g}{unit}"
            value = "-" if g["value"] is None else f"{g['value']:{fmt}}{unit}"
            parts.append(f"  {g['goal']:<42} {bound:>11}: {value:>11}  {verdict}")
    crows = []
    for level in results["levels"]:
        cpu, tokens = level.get("cpu_s") or {}, level["summary"]["completion_tokens"]
        if not cpu or not tokens:
            continue
        per = {k: v * 1000 / tokens for k, v in cpu.items()}
        crows.append(
            [LABELS[level["target"]], str(level["concurrency"])]
            + [_f(per.get(k), ".1f") for k in ("engine", "gateway", "nats-server", "client")]
        )
    if crows:
        parts += [
            "",
            "CPU time per generated token, ms (engine = worker, in-process engine or peer server; client = this bench)",
            _grid(["target", "streams", "engine", "gateway", "nats-server", "client"], crows),
        ]
    st = results.get("startup", {})
    start_bits = [
        f"{label} {st[key]:.1f}"
        for key, label in (
            ("gateway_ready_s", "cpu-openvino stack: launch -> model ready behind the gateway"),
            ("gateway_first_token_s", "-> first token"),
            (f"{TRANSFORMERS_TARGET}_ready_s", "transformers stack: launch -> model ready"),
            (f"{TRANSFORMERS_TARGET}_first_token_s", "-> first token"),
            ("gateway-vllm_ready_s", "cpu-vllm stack: launch -> model ready"),
            ("gateway-vllm_first_token_s", "-> first token"),
            ("peer_ready_s", "peer: launch -> /health"),
            ("peer_first_token_s", "-> first token"),
            ("inprocess_load_s", "in-process engine load"),
        )
        if st.get(key) is not None
    ]
    if start_bits:
        parts += ["", "Start (s): " + "; ".join(start_bits)]
    for name, why in results.get("skipped", {}).items():
        parts.append(f"skipped {name}: {why}")
    return "\n".join(parts)


def profile_text(profile: dict[str, Any]) -> str:
    """Where the gateway's and the worker's samples went while `streams` streams ran."""
    level = profile.get("level") or {}
    parts = [
        f"\nProfile (py-spy at 100 Hz, a repeat of the {profile['streams']}-stream gateway level kept out of the "
        f"tables: {_f(level.get('aggregate_tps'), '.1f')} tok/s under the profiler)"
    ]
    for name, prof in profile.items():
        if not isinstance(prof, dict) or "samples" not in prof:
            continue
        threads = ", ".join(f"{t} {p}%" for t, p in list(prof["threads_pct"].items())[:4])
        parts.append(f"{name}: {prof['samples']} samples; threads: {threads}")
        parts.append("  self:      " + "; ".join(f"{f} {p}%" for f, p in prof["self_pct"][:6]))
        parts.append("  inclusive: " + "; ".join(f"{f} {p}%" for f, p in prof["inclusive_pct"][:8]))
        parts.append(f"  stacks:    {prof['file']}")
    return "\n".join(parts)


def write_json(results: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps({**results, "ratios": ratios(results)}, indent=1, default=str))


def plot(results: dict[str, Any], path: Path) -> bool:
    """Aggregate tokens/s and TTFT p50 (p95 dashed) against concurrency, one line per target."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return False
    t = by_target(results)
    fig, (ax_tps, ax_ttft) = plt.subplots(1, 2, figsize=(12, 4.8))
    for target in TARGETS:
        levels = t.get(target, {})
        if not levels:
            continue
        xs = sorted(levels)
        tps = [levels[c]["aggregate_tps"] for c in xs]
        line = ax_tps.plot(xs, tps, marker="o", label=LABELS[target])[0]
        ax_ttft.plot(
            xs, [levels[c]["ttft_ms_p50"] for c in xs], marker="o", color=line.get_color(), label=LABELS[target]
        )
        p95 = [levels[c].get("ttft_ms_p95", levels[c]["ttft_ms_p99"]) for c in xs]
        ax_ttft.plot(xs, p95, linestyle="--", color=line.get_color(), alpha=0.5)
    ticks = sorted({c for levels in t.values() for c in levels})
    for ax in (ax_tps, ax_ttft):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(c) for c in ticks])
        ax.minorticks_off()
        ax.set_xlabel("concurrent streams")
        ax.grid(True, alpha=0.3)
        ax.legend()
    ax_tps.set_ylabel("aggregate tokens/s")
    ax_tps.set_title("Throughput")
    ax_ttft.set_ylabel("time to first token, ms (p50 solid, p95 dashed)")
    ax_ttft.set_yscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    ax_ttft.yaxis.set_major_formatter(plain)
    ax_ttft.yaxis.set_minor_formatter(plain)
    ax_ttft.set_title("TTFT")
    facts = results["facts"]
    engines = [
        e
        for target, e in (
            ("gateway", "cpu-openvino"),
            (TRANSFORMERS_TARGET, "transformers"),
            ("gateway-vllm", "cpu-vllm"),
        )
        if target in t
    ]
    who = f"CY-LLM ({', '.join(engines)} workers)" if engines else "CY-LLM"
    peer = " vs transformers serve" if "peer" in t else ""
    fig.suptitle(
        f"{who}{peer}: {results['model_id']}, {results['workload']['max_new_tokens']} tokens, "
        f"{facts['cpu_model']} x{facts['cores']} ({results['mode']})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
