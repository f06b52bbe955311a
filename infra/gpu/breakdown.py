"""Where a decode step's time goes: the engine with timers around its parts."""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

from infra.gpu.engine import client


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
        one = client(engine)
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
