"""The fp32 reference: plain transformers (+ peft) greedy decoding of a request, outside every engine."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from schemas.inference import GenerateRequest
from tests.helpers import real_model_dir


@functools.cache
def _base() -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = real_model_dir()
    return AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval()


def _prompt_ids(request: GenerateRequest) -> list[int]:
    tokenizer, _ = _base()
    assert request.messages is not None
    ids = tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in request.messages],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    return list(ids)


def reference_greedy(request: GenerateRequest, *, adapter_path: Path | None) -> str:
    """The text transformers' `generate` (greedy, fp32) gives for `request`'s messages, with the LoRA adapter at
    `adapter_path` applied when one is given."""
    import torch
    from peft import PeftModel

    tokenizer, model = _base()
    prompt = torch.tensor([_prompt_ids(request)])
    with torch.inference_mode():
        if adapter_path is not None:
            peft = PeftModel.from_pretrained(model, str(adapter_path))
            try:
                out = peft.generate(prompt, max_new_tokens=request.generation.max_new_tokens, do_sample=False)
            finally:
                model = peft.unload()  # the cached base model stays plain
        else:
            out = model.generate(prompt, max_new_tokens=request.generation.max_new_tokens, do_sample=False)
    return str(tokenizer.decode(out[0, prompt.shape[1] :], skip_special_tokens=True))


def reference_logprobs(request: GenerateRequest, token_ids: list[int]) -> list[float]:
    """The raw log-softmax (fp32 transformers) of each of `token_ids` generated after `request`'s prompt."""
    import torch

    _, model = _base()
    prompt = _prompt_ids(request)
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + token_ids])).logits[0]
    logprobs = torch.log_softmax(logits.float(), -1)
    return [logprobs[len(prompt) - 1 + i, t].item() for i, t in enumerate(token_ids)]
