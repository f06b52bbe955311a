"""results.json and summary.md: what the check measured, saved after every phase."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

SPEC_STREAM_TPS = 50.0  # tokens/s per stream
SPEC_TTFT_MS = 200.0


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
    for section in (_inprocess, _breakdown, _attn, _stack, _trainer, _pytest):
        lines += section(ph)
    for name, why in data["skipped"].items():
        lines.append(f"- skipped {name}: {why}")
    for name, err in data.get("errors", {}).items():
        lines.append(f"- FAILED {name}: {err.splitlines()[-1] if err else ''}")
    return "\n".join(lines) + "\n"


def _table(head: list[str], columns: str, align: str, rows: list[str]) -> list[str]:
    """A section: its heading and text lines, then a markdown table and a blank line."""
    return [*head, columns, align, *rows, ""]


def _inprocess(ph: dict[str, Any]) -> list[str]:
    inproc = [k for k in ph if k.startswith("inprocess")]
    if not inproc:
        return []
    rows = []
    for k in inproc:
        r = ph[k]
        for row in r.get("levels", []):
            label = r["dtype"] + (f" ({r['sdpa']})" if "sdpa" in r else "")
            ok = (row["stream_tps_p50"] or 0) >= SPEC_STREAM_TPS and (row["ttft_ms_p50"] or 1e9) <= SPEC_TTFT_MS
            rows.append(
                f"| {label} | {row['concurrency']} | {row['requests']} | {_f(row['ttft_ms_p50'])} "
                f"| {_f(row['ttft_ms_p99'])} | {_f(row['stream_tps_p50'])} | {_f(row['aggregate_tps'])} "
                f"| {row['all_full_length']} | {'meets' if ok else 'MISSES'} |"
            )
    lines = _table(
        [
            "## In-process engine (TransformersEngine + Batcher), greedy, fixed length",
            "",
            f"Spec: >= {SPEC_STREAM_TPS:g} tokens/s per stream, TTFT <= {SPEC_TTFT_MS:g} ms.",
            "",
        ],
        "| dtype | streams | requests | TTFT p50 ms | TTFT p99 ms | per-stream tok/s p50 | aggregate tok/s "
        "| all full length | spec |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
        rows,
    )
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
    return [*lines, ""]


def _breakdown(ph: dict[str, Any]) -> list[str]:
    brk = [k for k in ph if k.startswith("breakdown")]
    if not brk:
        return []
    return _table(
        [
            "## Where a decode step goes (engine with timers; medians per step)",
            "",
            "forward = the model's forward incl. a device sync; dispatch = its host-side part (before the sync); "
            "pick = the per-row token choice (`Batcher._pick`, one `int()` sync per row); other = the rest of "
            "`_decode_step`.",
            "",
        ],
        "| dtype | rows | step ms | forward ms | of which host dispatch ms | pick ms (all rows) | other ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        [
            f"| {ph[k]['dtype']} | {row['rows']} | {row.get('step_ms')} | {row.get('forward_ms')} "
            f"| {row.get('dispatch_ms')} | {row.get('pick_ms')} | {row.get('other_ms')} |"
            for k in brk
            for row in ph[k]["levels"]
        ],
    )


def _attn(ph: dict[str, Any]) -> list[str]:
    if "attn" not in ph:
        return []
    a = ph["attn"]
    table = _table(
        [
            "## Decode forward under SDPA backend switches (batch 1, synced per step)",
            "",
            f"Backends enabled by default: {a['backends_enabled_by_default']}.",
            "",
        ],
        "| dtype | SDPA backends | KV lengths | step ms median | step ms max |",
        "| --- | --- | --- | ---: | ---: |",
        [
            f"| {v['dtype']} | {v['variant']} | {v['kv_lengths']} | {v['step_ms_median']} | {v['step_ms_max']} |"
            for v in a["variants"]
        ],
    )
    return [
        *table,
        "Host-side profile, bfloat16, default backends, new KV lengths (top ops by self CPU time):",
        "",
        "```",
        a.get("profile_bfloat16_new_shapes", ""),
        "```",
        "",
    ]


def _ratio(a: Any, b: Any) -> float | None:
    return a / b if b and a else None


def _stack(ph: dict[str, Any]) -> list[str]:
    if "stack" not in ph:
        return []
    s = ph["stack"]
    base = {row["concurrency"]: row for row in ph.get("inprocess_float32", {}).get("levels", [])}
    rows = []
    for path in ("gateway", "nats"):
        for row in s.get(path, []):
            b = base.get(row["concurrency"], {})
            agg = _ratio(row["aggregate_tps"], b.get("aggregate_tps"))
            tt = _ratio(row["ttft_ms_p50"], b.get("ttft_ms_p50"))
            rows.append(
                f"| {path} | {row['concurrency']} | {_f(row['ttft_ms_p50'])} | {_f(row['stream_tps_p50'])} "
                f"| {_f(row['aggregate_tps'])} | {_f(agg, 2)} | {_f(tt, 2)} | {row['all_full_length']} |"
            )
    return _table(
        [
            "## Full path: nats-server + worker + gateway (float32), ratio to in-process float32 of this run",
            "",
            f"Stack ready after {s.get('ready_s')} s, slots {s['slots']}.",
            "",
        ],
        "| path | streams | TTFT p50 ms | per-stream tok/s p50 | aggregate tok/s | aggregate / in-process "
        "| TTFT / in-process | all full length |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        rows,
    )


def _trainer(ph: dict[str, Any]) -> list[str]:
    if "trainer" not in ph:
        return []
    t = ph["trainer"]
    return [
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


def _pytest(ph: dict[str, Any]) -> list[str]:
    if "pytest" not in ph:
        return []
    t = ph["pytest"]
    return [
        f"## The project's engine tests on this device (engine device auto = {t['engine_device_auto']})",
        "",
        f"`pytest {' '.join(t['files'])}`: {t['summary']} (exit {t['returncode']}, {t['wall_s']} s)",
        *[f"- {line}" for line in t["failed"]],
        "",
    ]
