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


# Nucleus/top-k sampling looks at the best CANDIDATES tokens first (topk is ~40x cheaper than sorting a
# 49k vocabulary on CPU); it falls back to the full sort only when they hold less than top_p of the mass.
CANDIDATES = 1024


def _sample(probs: torch.Tensor, generator: torch.Generator) -> int:
    """Draw an index with probability proportional to `probs` (exponential race: argmax p/E, E ~ Exp(1)).

    Same distribution as torch.multinomial, several times faster on a CPU for one row.
    """
    race = torch.empty_like(probs).exponential_(generator=generator)
    return int(torch.argmax(probs / race))


def pick_token(
    logits: torch.Tensor,
    params: GenerationParams,
    generator: torch.Generator | None,
    context: torch.Tensor,
    generated: torch.Tensor,
) -> int:
    """Choose the next token from one row of logits (shape [vocab]). temperature 0 = greedy.

    Order as in transformers: penalties, temperature, top-k, then top-p over the renormalised rest.
    """
    logits = apply_penalties(logits.float(), params, context, generated)
    if params.temperature == 0 or generator is None:
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    vocab = logits.shape[0]
    top_k = params.top_k if 0 < params.top_k < vocab else 0
    if not top_k and params.top_p >= 1.0:
        return _sample(torch.softmax(logits, dim=-1), generator)
    values, order = torch.topk(logits, top_k or min(vocab, CANDIDATES))
    if top_k:
        probs = torch.softmax(values, dim=-1)
    else:
        probs = torch.exp(values - torch.logsumexp(logits, dim=0))
        if float(probs.sum()) < params.top_p:  # a very flat distribution: the nucleus is wider
            values, order = torch.sort(logits, descending=True)
            probs = torch.softmax(values, dim=-1)
    if params.top_p < 1.0:
        probs = probs / probs.sum()
        cumulative = torch.cumsum(probs, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least the best token).
        probs = probs.masked_fill(cumulative - probs > params.top_p, 0.0)
    return int(order[_sample(probs, generator)])
