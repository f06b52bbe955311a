"""Attention backends: why a bfloat16 decode step can cost more than a float32 one."""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from pathlib import Path
from typing import Any

SDPA_VARIANTS = (
    ("float32", "default", ()),
    ("bfloat16", "default", ()),
    ("bfloat16", "default, shapes seen before", ()),
    ("bfloat16", "cuDNN attention off", ("cudnn",)),
    ("bfloat16", "cuDNN and flash off", ("cudnn", "flash")),
    ("bfloat16", "math only", ("cudnn", "flash", "mem_efficient")),
)


def attn_phase(model_dir: Path, device: str, args: argparse.Namespace) -> dict[str, Any]:
    """The model's decode forward as the batcher calls it (mask, position ids, cache; batch 1), timed per
    step with a sync, under PyTorch's SDPA backend switches. Every variant but "seen before" decodes at
    KV lengths no earlier variant used, so a backend that prepares per shape pays that cost in it."""
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    from services.engine.batcher import _cache_keyword

    cuda = device.startswith("cuda")
    steps = 6 if args.quick else 32
    flags = ("cudnn", "flash", "mem_efficient", "math")
    saved = {f: getattr(torch.backends.cuda, f"{f}_sdp_enabled")() for f in flags}
    out: dict[str, Any] = {"steps": steps, "backends_enabled_by_default": saved, "variants": []}
    models: dict[str, Any] = {}
    for dt in ("float32", "bfloat16"):
        loaded: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dt))
        models[dt] = loaded.to(device).eval()

    def decode(model: Any, prompt_len: int, profile: bool = False) -> tuple[list[float], str]:
        kw = _cache_keyword(model)
        cache = DynamicCache(config=model.config)
        ids = torch.randint(100, 40000, (1, prompt_len), device=device)
        with torch.inference_mode():
            model(input_ids=ids, **{kw: cache}, use_cache=True, logits_to_keep=1)
            mask = torch.ones((1, prompt_len), dtype=torch.long, device=device)
            times, table = [], ""
            prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if profile else None
            if prof is not None:
                prof.__enter__()
            for i in range(steps):
                mask = torch.nn.functional.pad(mask, (0, 1), value=1)
                pos = torch.tensor([[prompt_len + i]], device=device)
                t0 = time.perf_counter()
                logits = model(
                    input_ids=ids[:, -1:], attention_mask=mask, position_ids=pos, **{kw: cache}, use_cache=True
                )
                int(torch.argmax(logits.logits[0, -1]))
                times.append(time.perf_counter() - t0)
            if prof is not None:
                prof.__exit__(None, None, None)
                table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60)
        return times, table

    decode(models["bfloat16"], 16)  # first-call set-up
    decode(models["float32"], 16)
    try:
        for k, (dt, label, off) in enumerate(SDPA_VARIANTS):
            for f in flags:
                getattr(torch.backends.cuda, f"enable_{f}_sdp")(saved[f] and f not in off)
            start = 40 + 100 * (k - 1 if "seen" in label else k)
            times, _ = decode(models[dt], start)
            out["variants"].append(
                {
                    "dtype": dt,
                    "variant": label,
                    "kv_lengths": f"{start + 1}-{start + steps}",
                    "step_ms_median": round(statistics.median(times) * 1000, 2),
                    "step_ms_max": round(max(times) * 1000, 2),
                }
            )
        for f in flags:
            getattr(torch.backends.cuda, f"enable_{f}_sdp")(saved[f])
        out["profile_bfloat16_new_shapes"] = decode(models["bfloat16"], 40 + 100 * len(SDPA_VARIANTS), True)[1]
        out["profile_float32_new_shapes"] = decode(models["float32"], 40 + 100 * (len(SDPA_VARIANTS) + 1), True)[1]
    finally:
        for f in flags:
            getattr(torch.backends.cuda, f"enable_{f}_sdp")(saved[f])
        del models
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return out
