"""Turn a run's raw figures into the stdout table (with the ratios), the JSON file and the PNG plot.

Absolute figures drift with the machine and with whatever else runs on it; the ratios against the
baselines measured in the same run are what the table leads with.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TARGETS = ("in-process", "nats", "gateway", "gateway-vllm", "peer")
LABELS = {
    "in-process": "in-process engine",
    "nats": "direct NATS",
    "gateway": "gateway (HTTP/SSE)",
    "gateway-vllm": "gateway, cpu-vllm worker",
    "peer": "transformers serve --cb",
}

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
    """Per concurrency level: our overheads against the in-process floor, us against the peer, and the
    cpu-vllm worker against the transformers one (both through their own gateway)."""
    t = by_target(results)
    inproc, gw, nats, peer, vllm = (t.get(k, {}) for k in ("in-process", "gateway", "nats", "peer", "gateway-vllm"))
    rows = []
    for c in sorted(set(gw) | set(nats) | set(peer) | set(vllm)):
        base = inproc.get(c, {})
        g, n, p, v = gw.get(c, {}), nats.get(c, {}), peer.get(c, {}), vllm.get(c, {})
        rows.append(
            {
                "concurrency": c,
                "gateway_over_inprocess_agg_tps": _div(g.get("aggregate_tps"), base.get("aggregate_tps")),
                "gateway_over_inprocess_stream_tps": _div(g.get("stream_tps_p50"), base.get("stream_tps_p50")),
                "gateway_minus_inprocess_ttft_ms": _sub(g.get("ttft_ms_p50"), base.get("ttft_ms_p50")),
                "nats_over_inprocess_agg_tps": _div(n.get("aggregate_tps"), base.get("aggregate_tps")),
                "nats_minus_inprocess_ttft_ms": _sub(n.get("ttft_ms_p50"), base.get("ttft_ms_p50")),
                "gateway_minus_nats_ttft_ms": _sub(g.get("ttft_ms_p50"), n.get("ttft_ms_p50")),
                "gateway_over_peer_agg_tps": _div(g.get("aggregate_tps"), p.get("aggregate_tps")),
                "gateway_over_peer_ttft": _div(g.get("ttft_ms_p50"), p.get("ttft_ms_p50")),
                "vllm_over_transformers_agg_tps": _div(v.get("aggregate_tps"), g.get("aggregate_tps")),
                "vllm_over_transformers_stream_tps": _div(v.get("stream_tps_p50"), g.get("stream_tps_p50")),
                "vllm_minus_transformers_ttft_ms": _sub(v.get("ttft_ms_p50"), g.get("ttft_ms_p50")),
            }
        )
    return rows


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
    parts = [
        f"CY-LLM bench ({results['mode']}): {results['model_id']}, {work['max_new_tokens']} new tokens per request, "
        f"greedy, chat prompts; worker slots {results['slots']}; "
        f"torch threads {results.get('threads') or 'default (' + str(facts['torch_threads']) + ')'}"
        + (
            f"; gateway queue timeout {results['gateway_queue_timeout_s']:g} s"
            if results.get("gateway_queue_timeout_s")
            else ""
        ),
        f"machine: {facts['cpu_model']}, {facts['cores']} cores, torch {facts['torch']}, "
        f"transformers {facts['transformers']}, commit {facts['git_commit'][:10]}{dirty}",
    ]
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
    if len(workers) > 1:
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
            "the figures below are distorted, ratios included (torch's threads stall when a core is taken): "
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
            _f(r["gateway_over_inprocess_agg_tps"], ".2f"),
            _f(r["gateway_over_inprocess_stream_tps"], ".2f"),
            _f(r["gateway_minus_inprocess_ttft_ms"], "+.0f"),
            _f(r["nats_over_inprocess_agg_tps"], ".2f"),
            _f(r["nats_minus_inprocess_ttft_ms"], "+.0f"),
            _f(r["gateway_minus_nats_ttft_ms"], "+.0f"),
            _f(r["gateway_over_peer_agg_tps"], ".2f"),
            _f(r["gateway_over_peer_ttft"], ".2f"),
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
                "gw/inproc agg",
                "gw/inproc stream",
                "gw-inproc TTFT",
                "nats/inproc agg",
                "nats-inproc TTFT",
                "gw-nats TTFT",
                "gw/peer agg",
                "gw/peer TTFT",
                *(["vllm/tf agg", "vllm-tf TTFT"] if with_vllm else []),
            ],
            rrows,
        ),
        "  agg = aggregate tokens/s, stream = per-stream decode tokens/s (p50), TTFT differences in ms (p50),",
        "  gw = through the gateway (HTTP/SSE), nats = direct NATS publisher, peer = transformers serve --cb",
        *(
            [
                "  vllm/tf = the cpu-vllm worker against the transformers worker, each behind its own gateway "
                "(gw = tf), same slots"
            ]
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
                    _f(s["ttft_ms_p99"], ".0f"),
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
                "TTFT p99 ms",
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
                f"  levels above {results['slots']} streams: our worker (and the in-process engine) run at most "
                f"{results['slots']} sequences at once (CY_LLM_SLOTS); the rest wait in the queue, and TTFT shows it"
            ]
            if max(results["workload"]["levels"]) > results["slots"]
            else []
        ),
    ]
    gw1 = t.get("gateway", {}).get(1)
    if gw1:
        tps, ttft = gw1["stream_tps_p50"], gw1["ttft_ms_p50"]
        parts.append(
            f"\nSpec targets through the gateway, 1 stream: >= 50 tok/s per stream: {_f(tps, '.1f')} "
            f"({'met' if tps and tps >= 50 else 'missed'}); TTFT <= 200 ms: {_f(ttft, '.0f')} ms "
            f"({'met' if ttft is not None and ttft <= 200 else 'missed'})"
        )
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
            ("stack_ready_s", "our stack: launch -> model ready behind the gateway"),
            ("stack_first_token_s", "-> first token"),
            ("vllm_ready_s", "cpu-vllm stack: launch -> model ready"),
            ("vllm_first_token_s", "-> first token"),
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
    """Aggregate tokens/s and TTFT p50 (p99 dashed) against concurrency, one line per target."""
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
        ax_ttft.plot(xs, [levels[c]["ttft_ms_p99"] for c in xs], linestyle="--", color=line.get_color(), alpha=0.5)
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
    ax_ttft.set_ylabel("time to first token, ms (p50 solid, p99 dashed)")
    ax_ttft.set_yscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    ax_ttft.yaxis.set_major_formatter(plain)
    ax_ttft.yaxis.set_minor_formatter(plain)
    ax_ttft.set_title("TTFT")
    facts = results["facts"]
    who = "CY-LLM (transformers and cpu-vllm workers)" if "gateway-vllm" in t else "CY-LLM"
    peer = " vs transformers serve" if "peer" in t else ""
    fig.suptitle(
        f"{who}{peer}: {results['model_id']}, {results['workload']['max_new_tokens']} tokens, "
        f"{facts['cpu_model']} x{facts['cores']} ({results['mode']})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
