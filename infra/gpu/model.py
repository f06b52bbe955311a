"""The check's model: SmolLM2-135M-Instruct's config and tokenizer with random weights."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

SPECIAL_TOKENS = 17  # SmolLM2: ids 0..16 are special (<|endoftext|>, <|im_start|>, <|im_end|>, ...)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def build_model(src: Path, target: Path, *, layers: int, std: float = 0.0, zero_special: bool = True) -> dict[str, Any]:
    """SmolLM2's config + tokenizer, random float32 weights (seed 0; normal with std `std`, default the
    config's initializer_range 0.02), the special tokens' embedding rows zeroed if `zero_special`.

    With std 0.02 greedy decoding of a 30-layer random model collapses onto one repeated token, which
    makes an alone-vs-batched comparison nearly powerless; std 0.05 gives varied output (a different
    token at almost every step), so any rounding difference that flips an argmax shows. The zeroed rows
    make the hidden state of a leading <|im_start|> exactly 0, which gives NaN LoRA gradients: the
    trainer phase uses a model without them."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    started = time.monotonic()
    config = AutoConfig.from_pretrained(src)
    if layers:
        config.num_hidden_layers = layers
    if std:
        config.initializer_range = std
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model = model.to(torch.float32)
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    if zero_special:
        with torch.no_grad():
            emb[:SPECIAL_TOKENS] = 0
            head[:SPECIAL_TOKENS] = 0
    shutil.rmtree(target, ignore_errors=True)
    model.save_pretrained(target)
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy(src / name, target / name)
    return {
        "path": str(target),
        "params": sum(p.numel() for p in model.parameters()),
        "layers": config.num_hidden_layers,
        "tied_embeddings": emb.data_ptr() == head.data_ptr(),
        "weights": f"random (normal, std {config.initializer_range}, seed 0)"
        + ("; special-token rows zeroed" if zero_special else ""),
        "build_s": round(time.monotonic() - started, 1),
    }
