"""The trainer: a few LoRA steps through its own loop, timed by the wall clock."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any


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
