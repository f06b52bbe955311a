"""The auto-tuning ladder and the model's memory facts (pure Python: runs without vLLM)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from schemas.errors import CyError, ErrorCode
from services.engine import vllm_tuning as tuning
from tests.helpers import real_model_dir

GIB = tuning.GIB
SMALL = tuning.ModelFacts(params=100_000_000, dtype_bytes=4, kv_bytes_per_token=46_080, max_position_embeddings=8192)


def test_facts_come_from_the_model_files_not_its_name() -> None:
    facts = tuning.model_facts(real_model_dir(), "float32")
    # SmolLM2-135M: 30 layers x 3 KV heads x 64 dims x K and V x 4 bytes.
    assert facts.kv_bytes_per_token == 2 * 30 * 3 * 64 * 4
    assert 130_000_000 < facts.params < 140_000_000
    assert facts.max_position_embeddings == 8192
    assert tuning.model_facts(real_model_dir(), "bfloat16").kv_bytes_per_token == facts.kv_bytes_per_token // 2


def test_the_config_formula_matches_the_safetensors_count(tmp_path: Path) -> None:
    config = (real_model_dir() / "config.json").read_text()
    (tmp_path / "config.json").write_text(config)  # no weights: the count comes from the sizes
    estimated = tuning.model_facts(tmp_path, "float32").params
    exact = tuning.model_facts(real_model_dir(), "float32").params
    assert abs(estimated - exact) / exact < 0.01


def test_the_cpu_ladder_shrinks_the_kv_cache_at_every_step() -> None:
    first = tuning.first_rung(
        gpu_memory_utilization=0.9, max_model_len=8192, max_num_seqs=16, cpu=True, facts=SMALL, kv_override=None
    )
    rungs = list(tuning.ladder(first, cpu=True, facts=SMALL))
    assert rungs[0] == first
    assert [(r.max_model_len, r.max_num_seqs) for r in rungs] == [
        (8192, 16),
        (4096, 16),
        (2048, 16),
        (2048, 8),
        (2048, 4),
        (2048, 2),
        (2048, 1),
        (1024, 1),
        (512, 1),
        (256, 1),
    ]
    sizes = [r.kv_cache_bytes for r in rungs]
    assert all(a is not None and b is not None and b < a for a, b in itertools.pairwise(sizes))
    assert {r.gpu_memory_utilization for r in rungs} == {0.9}


def test_the_cuda_ladder_lowers_utilization_first_and_leaves_kv_to_vllm() -> None:
    first = tuning.first_rung(
        gpu_memory_utilization=0.9, max_model_len=4096, max_num_seqs=8, cpu=False, facts=SMALL, kv_override=None
    )
    rungs = list(tuning.ladder(first, cpu=False, facts=SMALL))
    assert [r.gpu_memory_utilization for r in rungs[:5]] == [0.9, 0.8, 0.7, 0.6, 0.5]
    assert rungs[5].max_model_len == 2048
    assert all(r.kv_cache_bytes is None for r in rungs)


def test_max_model_len_is_capped_by_the_model_context() -> None:
    first = tuning.first_rung(
        gpu_memory_utilization=0.9, max_model_len=100_000, max_num_seqs=1, cpu=True, facts=SMALL, kv_override=None
    )
    assert first.max_model_len == 8192


def test_an_explicit_kv_size_is_used_first_then_caps_the_ladder() -> None:
    first = tuning.first_rung(
        gpu_memory_utilization=0.9, max_model_len=2048, max_num_seqs=4, cpu=True, facts=SMALL, kv_override=1000 * GIB
    )
    rungs = list(tuning.ladder(first, cpu=True, facts=SMALL, kv_cap=1000 * GIB))
    assert rungs[0].kv_cache_bytes == 1000 * GIB
    assert rungs[1].kv_cache_bytes == SMALL.kv_bytes(2048, 2)


def test_shortfall_on_cpu_counts_weights_kv_and_overhead() -> None:
    rung = tuning.Rung(gpu_memory_utilization=0.9, max_model_len=2048, max_num_seqs=4, kv_cache_bytes=2 * GIB)
    need = SMALL.weight_bytes + 2 * GIB + tuning.OVERHEAD_BYTES
    assert tuning.shortfall(rung, SMALL, tuning.Memory(free=need, total=64 * GIB)) == ""
    assert "GiB free" in tuning.shortfall(rung, SMALL, tuning.Memory(free=need - 1, total=64 * GIB))
    assert tuning.shortfall(rung, None, tuning.Memory(free=0, total=0)) == ""


def test_shortfall_on_cuda_follows_vllms_utilization_rule() -> None:
    rung = tuning.Rung(gpu_memory_utilization=0.9, max_model_len=2048, max_num_seqs=4)
    assert "asks for" in tuning.shortfall(rung, SMALL, tuning.Memory(free=70 * GIB, total=80 * GIB))
    assert tuning.shortfall(rung, SMALL, tuning.Memory(free=79 * GIB, total=80 * GIB)) == ""


def _rungs() -> list[tuning.Rung]:
    first = tuning.first_rung(
        gpu_memory_utilization=0.9, max_model_len=4096, max_num_seqs=8, cpu=True, facts=SMALL, kv_override=None
    )
    return list(tuning.ladder(first, cpu=True, facts=SMALL))


async def test_the_ladder_skips_what_cannot_fit_and_starts_on_the_first_rung_that_does() -> None:
    rungs = _rungs()
    free = SMALL.weight_bytes + SMALL.kv_bytes(2048, 4) + tuning.OVERHEAD_BYTES
    tried: list[tuning.Rung] = []

    async def start(rung: tuning.Rung) -> str:
        tried.append(rung)
        return "engine"

    with capture_logs() as logs:
        engine, rung = await tuning.start_with_ladder(
            iter(rungs), start, facts=SMALL, memory=lambda: tuning.Memory(free=free, total=free), allow_auto_tuning=True
        )
    assert engine == "engine" and tried == [rung]
    assert (rung.max_model_len, rung.max_num_seqs) == (2048, 4)
    assert [e["event"] for e in logs] == ["auto_tuning_skip"] * 2 + ["auto_tuning_try"]


async def test_a_start_that_fails_for_memory_steps_down_and_retries() -> None:
    attempts: list[tuning.Rung] = []

    async def start(rung: tuning.Rung) -> str:
        attempts.append(rung)
        if len(attempts) < 3:
            raise RuntimeError("Engine core initialization failed. See root cause above.")
        return "engine"

    with capture_logs() as logs:
        _, rung = await tuning.start_with_ladder(
            iter(_rungs()), start, facts=SMALL, memory=lambda: None, allow_auto_tuning=True
        )
    assert rung == _rungs()[2] and len(attempts) == 3
    assert [e["event"] for e in logs].count("auto_tuning_start_failed") == 2


async def test_a_failure_that_is_not_about_memory_is_not_retried() -> None:
    async def start(rung: tuning.Rung) -> str:
        raise TypeError("unsupported architecture")

    with pytest.raises(TypeError):
        await tuning.start_with_ladder(iter(_rungs()), start, facts=SMALL, memory=lambda: None, allow_auto_tuning=True)


async def test_with_tuning_off_a_setting_that_cannot_fit_fails_fast_with_insufficient_resources() -> None:
    async def start(rung: tuning.Rung) -> str:
        raise AssertionError("must not try to start")

    with pytest.raises(CyError) as err:
        await tuning.start_with_ladder(
            iter(_rungs()),
            start,
            facts=SMALL,
            memory=lambda: tuning.Memory(free=GIB, total=GIB),
            allow_auto_tuning=False,
        )
    assert err.value.code == ErrorCode.INSUFFICIENT_RESOURCES
    assert "CY_LLM_ALLOW_AUTO_TUNING" in err.value.body.message


async def test_with_tuning_off_a_memory_failure_is_insufficient_resources() -> None:
    async def start(rung: tuning.Rung) -> str:
        raise MemoryError()

    with pytest.raises(CyError) as err:
        await tuning.start_with_ladder(iter(_rungs()), start, facts=SMALL, memory=lambda: None, allow_auto_tuning=False)
    assert err.value.code == ErrorCode.INSUFFICIENT_RESOURCES


async def test_an_exhausted_ladder_is_insufficient_resources() -> None:
    async def start(rung: tuning.Rung) -> str:
        raise AssertionError("nothing fits")

    with pytest.raises(CyError) as err:
        await tuning.start_with_ladder(
            iter(_rungs()), start, facts=SMALL, memory=lambda: tuning.Memory(free=1, total=1), allow_auto_tuning=True
        )
    assert err.value.code == ErrorCode.INSUFFICIENT_RESOURCES and "exhausted" in err.value.body.message
