"""`python -m services.trainer.bench`: LoRA training step time and tokens/s on this machine.

Runs the same kind of step as the trainer (peft LoRA, AdamW, grad clipping) on batches of exactly
`--batch` x `--seq` tokens and prints the median step time. Defaults: the registry's default model,
batch 4 x 128 tokens, the spec's LoRA defaults (r=64, alpha=16, dropout 0.05, peft's target modules).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from infra.model_files import ensure_model
    from services.engine.registry import load_registry

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="default")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6, help="measured steps (after one warm-up step)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--targets", default="", help="comma-separated target modules (default: peft's)")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    resolved = load_registry().resolve(args.model)
    if resolved is None:
        raise SystemExit(f"unknown model {args.model!r}")
    model_id, spec = resolved
    base = AutoModelForCausalLM.from_pretrained(ensure_model(spec), dtype=torch.float32)
    targets = args.targets.split(",") if args.targets else None
    config = LoraConfig(r=args.rank, lora_alpha=16, lora_dropout=0.05, target_modules=targets, task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4)
    torch.manual_seed(0)
    vocab = model.config.vocab_size
    times: list[float] = []
    for step in range(args.steps + 1):
        ids = torch.randint(0, vocab, (args.batch, args.seq))
        started = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:  # the first step warms up allocators and kernels
            times.append(time.perf_counter() - started)
    median = statistics.median(times)
    tokens = args.batch * args.seq
    print(
        f"{model_id}: LoRA r={args.rank} ({sum(p.numel() for p in params) / 1e6:.2f} M trainable), "
        f"batch {args.batch} x {args.seq} tokens, {torch.get_num_threads()} threads: "
        f"median {median:.2f} s/step (min {min(times):.2f}, max {max(times):.2f}), {tokens / median:.0f} tokens/s"
    )


if __name__ == "__main__":
    main()
