"""Next-token selection for one sequence, honouring every generation parameter.

Kept per row (not per batch) so each request has its own temperature, penalties and seeded RNG:
the same seed and input give the same output whatever else shares the batch.
"""

from __future__ import annotations

import torch

from schemas.inference import GenerationParams


def make_generator(params: GenerationParams, device: torch.device) -> torch.Generator | None:
    if params.temperature == 0:
        return None
    gen = torch.Generator(device=device)
    if params.seed is not None:
        gen.manual_seed(params.seed)
    else:
        gen.seed()
    return gen


def apply_penalties(
    logits: torch.Tensor, params: GenerationParams, context: torch.Tensor, generated: torch.Tensor
) -> torch.Tensor:
    """HF-style repetition penalty over prompt+output; OpenAI-style presence/frequency over the output."""
    if params.repetition_penalty != 1.0 and context.numel():
        seen = logits.gather(0, context)
        seen = torch.where(seen < 0, seen * params.repetition_penalty, seen / params.repetition_penalty)
        logits = logits.scatter(0, context, seen)
    if (params.presence_penalty or params.frequency_penalty) and generated.numel():
        counts = torch.bincount(generated, minlength=logits.shape[0]).to(logits.dtype)
        logits = logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def pick_token(
    logits: torch.Tensor,
    params: GenerationParams,
    generator: torch.Generator | None,
    context: torch.Tensor,
    generated: torch.Tensor,
) -> int:
    """Choose the next token from one row of logits (shape [vocab]). temperature 0 = greedy."""
    logits = apply_penalties(logits.float(), params, context, generated)
    if params.temperature == 0 or generator is None:
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[0]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least the best token).
        drop = cumulative - sorted_probs > params.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))
