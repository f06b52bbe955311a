"""Dataset rows as token ids: labels on the assistant turns only, the prompt as the engine renders it."""

from __future__ import annotations

from transformers import AutoTokenizer

from services.models.registry import Registry
from services.trainer.encoding import IGNORE_INDEX, encode
from services.training.datasets import Example


def test_only_assistant_tokens_carry_labels_and_the_template_matches_inference(registry: Registry) -> None:
    tokenizer = AutoTokenizer.from_pretrained(registry.models["tiny"].model_path)
    example = Example(1, [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A!"}])
    encoded = encode(example, tokenizer, 256)
    assert encoded is not None
    learned = str(tokenizer.decode([t for t in encoded.labels if t != IGNORE_INDEX]))
    assert learned.startswith("A!<|im_end|>")
    # The prompt part is exactly what the engine feeds the model for a chat request.
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Q?"}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert encoded.input_ids[: len(prompt)] == list(prompt)
    assert all(t == IGNORE_INDEX for t in encoded.labels[: len(prompt)])


def test_every_assistant_turn_of_a_conversation_is_learned(registry: Registry) -> None:
    tokenizer = AutoTokenizer.from_pretrained(registry.models["tiny"].model_path)
    turns = [("user", "one"), ("assistant", "uno"), ("user", "two"), ("assistant", "dos")]
    example = Example(1, [{"role": r, "content": c} for r, c in turns])
    encoded = encode(example, tokenizer, 256)
    assert encoded is not None
    learned = tokenizer.decode([t for t in encoded.labels if t != IGNORE_INDEX])
    assert "uno" in learned and "dos" in learned and "one" not in learned and "two" not in learned


def test_a_row_truncated_before_its_answer_is_dropped(registry: Registry) -> None:
    tokenizer = AutoTokenizer.from_pretrained(registry.models["tiny"].model_path)
    example = Example(1, [{"role": "user", "content": "word " * 50}, {"role": "assistant", "content": "x"}])
    assert encode(example, tokenizer, 32) is None
