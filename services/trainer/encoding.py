"""Training examples as token ids: each conversation through the base model's chat template (the same one the
engine applies to `/api/v1/inference` prompts; a fixed prompt format without one), labels on the assistant tokens
only."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from services.training.datasets import Conversation, DatasetError, Example

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]

    @property
    def trained_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


def _template_ids(tokenizer: Any, messages: Conversation, *, generation_prompt: bool) -> list[int]:
    ids = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=generation_prompt, return_dict=False
    )
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)


def _plain_ids(tokenizer: Any, messages: Conversation, *, generation_prompt: bool) -> list[int]:
    """A fixed prompt format for tokenizers without a chat template."""
    text = "".join(f"### {m['role'].capitalize()}:\n{m['content']}\n\n" for m in messages)
    ids = list(tokenizer(text + ("### Assistant:\n" if generation_prompt else ""))["input_ids"])
    if not generation_prompt and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids


def encode(example: Example, tokenizer: Any, max_len: int) -> Encoded | None:
    """Token ids and labels (assistant turns only), truncated to `max_len`; None when truncation leaves
    no assistant token. Raises DatasetError when the chat template rejects the conversation."""
    render = _template_ids if getattr(tokenizer, "chat_template", None) else _plain_ids
    messages = example.messages
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    try:
        ids = render(tokenizer, messages[: turns[-1] + 1], generation_prompt=False)
        labels = [IGNORE_INDEX] * len(ids)
        for i in turns:
            # Templates are incremental (a conversation's ids start with those of its prefix); the answer
            # is what the turn adds after the generation prompt.
            start = _common_prefix(render(tokenizer, messages[:i], generation_prompt=True), ids)
            end = _common_prefix(render(tokenizer, messages[: i + 1], generation_prompt=False), ids)
            labels[start:end] = ids[start:end]
    except Exception as exc:
        raise DatasetError(f"the chat template rejected this conversation ({exc})", row=example.row) from exc
    encoded = Encoded(ids[:max_len], labels[:max_len])
    return encoded if encoded.trained_tokens else None


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
