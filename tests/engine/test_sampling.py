"""Sampling follows the requested distribution (penalties, temperature, top-k, top-p, seed)."""

import torch

from schemas.inference import GenerationParams
from services.engine.sampling import make_generator, pick_token

NONE = torch.tensor([], dtype=torch.long)
LOGITS = torch.tensor([2.0, 1.0, 0.0, -1.0])


def frequencies(params: GenerationParams, logits: torch.Tensor = LOGITS, n: int = 8000) -> torch.Tensor:
    gen = make_generator(params, torch.device("cpu"))
    picks = torch.tensor([pick_token(logits, params, gen, NONE, NONE) for _ in range(n)])
    return torch.bincount(picks, minlength=logits.shape[0]).float() / n


def test_plain_sampling_matches_the_softmax() -> None:
    freq = frequencies(GenerationParams(temperature=1.0, top_p=1.0, seed=3))
    assert torch.allclose(freq, torch.softmax(LOGITS, 0), atol=0.02)


def test_top_p_keeps_only_the_nucleus_renormalised() -> None:
    freq = frequencies(GenerationParams(temperature=1.0, top_p=0.7, seed=3))
    p = torch.softmax(LOGITS, 0)
    assert freq[2] == 0 and freq[3] == 0
    assert abs(float(freq[0]) - float(p[0] / (p[0] + p[1]))) < 0.02


def test_top_k_keeps_only_the_k_best() -> None:
    freq = frequencies(GenerationParams(temperature=1.0, top_p=1.0, top_k=1, seed=3))
    assert freq[0] == 1.0


def test_a_flat_distribution_wider_than_the_candidate_set_still_samples_its_whole_nucleus() -> None:
    logits = torch.zeros(5000)
    freq = frequencies(GenerationParams(temperature=1.0, top_p=0.99, seed=1), logits, n=4000)
    assert int((freq > 0).sum()) > 2000  # far beyond the 1024 candidates of the fast path


def test_greedy_ignores_the_generator_and_takes_the_argmax() -> None:
    assert pick_token(LOGITS, GenerationParams(temperature=0), None, NONE, NONE) == 0


def test_presence_penalty_moves_probability_away_from_generated_tokens() -> None:
    params = GenerationParams(temperature=0, presence_penalty=2.0)
    assert pick_token(torch.tensor([1.0, 0.5]), params, None, NONE, torch.tensor([0])) == 1
