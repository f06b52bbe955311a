"""The prefix-cache mirror (services/engine/prefix_cache.py) against OpenVINO GenAI's real pipeline.

The pipeline does not say how many prompt tokens it took from its cache, but it shows it: a request alone in
the pipeline, with a prefill budget of B tokens a step, gets its first token after ceil((prompt - cached) / B)
steps. With B = 4 that pins the cached count to within 4 tokens, so the mirror's count must give exactly the
steps measured, through hits, partial blocks, conversations that continue, and a full cache overwriting blocks.
"""

from __future__ import annotations

import importlib.util
import math
import random
from collections.abc import Iterator
from typing import Any

import pytest

from services.engine import openvino_process as proc
from services.engine.prefix_cache import PrefixCache

BUDGET = 4  # prompt tokens per step: the pipeline's steps measure the cached count to within 4 tokens
BLOCKS = 14  # a small KV cache (448 tokens), so that the tests fill it and blocks get overwritten

needs_openvino = pytest.mark.skipif(
    importlib.util.find_spec("openvino_genai") is None, reason="openvino-genai is not installed"
)


# --- the mirror alone --------------------------------------------------------------------------------------
def test_a_fresh_prompt_has_no_cached_tokens_and_a_repeat_has_its_full_blocks() -> None:
    cache = PrefixCache(num_blocks=100, block_size=4)
    prompt = list(range(10, 20))
    assert cache.admit(1, prompt) == 0
    cache.extend(1, [50])  # first token: the prompt is in the cache
    cache.extend(1, [51])  # the first token is too; the last block is now keyed by 11 tokens
    cache.release(1)
    assert cache.admit(2, prompt) == 8  # blocks of 4 and 8 tokens; the third block differs (10 vs 11 tokens)
    assert (cache.queries, cache.hits) == (20, 8)


def test_a_whole_prompt_hit_still_computes_its_last_token() -> None:
    cache = PrefixCache(num_blocks=100, block_size=4)
    prompt = list(range(10, 20))
    cache.admit(1, prompt)
    cache.extend(1, [50])  # one token and done: the cache holds exactly the prompt
    cache.release(1)
    assert cache.admit(2, prompt) == 9


def test_blocks_never_reused_are_overwritten_before_reused_ones() -> None:
    cache = PrefixCache(num_blocks=4, block_size=4)
    a, b, c = list(range(100, 108)), list(range(200, 208)), list(range(300, 308))
    for seq_id, prompt in ((1, a), (2, a), (3, b)):  # a is reused once, b never
        cache.admit(seq_id, prompt)
        cache.extend(seq_id, [1])
        cache.release(seq_id)
    cache.admit(4, c)  # no free block left: two cached ones are overwritten
    cache.extend(4, [1])
    cache.release(4)
    assert cache.admit(5, b) == 0
    assert cache.admit(6, a) == 7


def test_the_block_measure_reads_whole_blocks_and_refuses_anything_else() -> None:
    assert proc.measure_blocks(64, [0.05, 0.075, 0.075]) == (4000, 32)
    assert proc.measure_blocks(64, [100 * 2 / 14, 100 * 3 / 14]) == (14, 32)
    assert proc.measure_blocks(64, [0.05, 0.05]) is None  # a block size that does not divide 64
    assert proc.measure_blocks(64, [0.05]) is None


# --- the mirror against the pipeline -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipeline() -> Iterator[tuple[Any, PrefixCache]]:
    """A real pipeline on the bundled SmolLM2 (int8), a KV cache of BLOCKS blocks, and its mirror."""
    if importlib.util.find_spec("openvino_genai") is None:
        pytest.skip("openvino-genai is not installed")
    import openvino_genai as ov_genai

    from services.models.files import ensure_openvino
    from services.models.registry import load_registry

    registry = load_registry()
    scheduler = ov_genai.SchedulerConfig()
    scheduler.num_kv_blocks = BLOCKS
    scheduler.max_num_seqs = BUDGET
    scheduler.max_num_batched_tokens = BUDGET
    scheduler.dynamic_split_fuse = True
    scheduler.enable_prefix_caching = True
    model_dir = ensure_openvino(registry.models[registry.default], "int8")
    pipe = ov_genai.ContinuousBatchingPipeline(str(model_dir), scheduler, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    cache = proc._warm_up(pipe)
    assert cache is not None
    yield pipe, cache


class _Runner:
    def __init__(self, pipe: Any, cache: PrefixCache) -> None:
        self.pipe, self.cache = pipe, cache
        self.ids = iter(range(1, 1_000_000))
        self.history: list[list[int]] = []

    def run(self, prompt: list[int], new_tokens: int) -> tuple[int, int]:
        """Run one request alone: (cached tokens by the mirror, steps the pipeline took to the first token)."""
        import numpy as np
        import openvino as ov

        request_id = next(self.ids)
        add = proc.Add(request_id, prompt, new_tokens, 0.0, 1.0, 0, 1.0, 0.0, 0.0, 0)
        config = proc.generation_config(add)
        config.ignore_eos = True
        cached = self.cache.admit(request_id, prompt)
        handle = self.pipe.add_request(request_id, ov.Tensor(np.asarray([prompt], dtype=np.int64)), config)
        steps, first, generated = 0, 0, []
        while self.pipe.has_non_finished_requests():
            self.pipe.step()
            steps += 1
            tokens = [t for out in handle.read().values() for t in out.generated_ids] if handle.can_read() else []
            if tokens and not first:
                first = steps
            generated += tokens
            self.cache.extend(request_id, tokens)
        self.cache.release(request_id)
        self.history.append(prompt + generated)
        return cached, first

    def check(self, prompt: list[int], new_tokens: int = 3) -> int:
        cached, steps = self.run(prompt, new_tokens)
        assert steps == math.ceil((len(prompt) - cached) / BUDGET), (len(prompt), cached, steps)
        return cached


@pytest.mark.slow
@needs_openvino
def test_the_measure_at_start_finds_the_pipelines_block_count_and_its_cpu_block_size(
    pipeline: tuple[Any, PrefixCache],
) -> None:
    _, cache = pipeline
    assert (cache.num_blocks, cache.block_size) == (BLOCKS, 32)


@pytest.mark.slow
@needs_openvino
def test_the_mirrors_cached_count_is_what_the_pipeline_skips_when_it_prefills(
    pipeline: tuple[Any, PrefixCache],
) -> None:
    runner = _Runner(*pipeline)
    rng = random.Random(7)

    def fresh(n: int) -> list[int]:
        return [rng.randrange(300, 40000) for _ in range(n)]

    story = fresh(150)
    assert runner.check(story) == 0
    assert runner.check(story) == 128  # 4 full blocks; its fifth block is keyed by 150 + 2 generated tokens
    once = fresh(90)
    runner.check(once, new_tokens=1)  # one token: the cache then holds exactly this prompt
    assert runner.check(once) == 89  # the whole prompt but its last token, which gives the logits
    assert runner.check(story[:100] + fresh(30)) == 96  # a shared prefix: its full blocks
    turn = runner.history[-1] + fresh(20)  # a conversation goes on: its prompt, answer and more
    assert runner.check(turn) >= 128
    for _ in range(3):  # fresh prompts fill the 14 blocks: cached blocks get overwritten
        assert runner.check(fresh(140)) == 0
    for _ in range(25):  # and any mix, old and new, keeps matching the pipeline
        kind = rng.choice(["fresh", "repeat", "prefix", "continue"])
        past = rng.choice(runner.history)
        prompt = {
            "fresh": lambda: fresh(rng.randrange(5, 200)),
            "repeat": lambda: past[: rng.randrange(5, 200)],  # noqa: B023
            "prefix": lambda: past[: rng.randrange(1, len(past))] + fresh(rng.randrange(1, 60)),  # noqa: B023
            "continue": lambda: past + fresh(rng.randrange(1, 40)),  # noqa: B023
        }[kind]()[:250]
        runner.check(prompt, new_tokens=rng.randrange(1, 8))
    assert 0 < runner.cache.hits < runner.cache.queries
