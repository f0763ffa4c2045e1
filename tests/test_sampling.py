"""Sampling: seed exercise 5.1 counts, Burkov's temperature table, top-k/top-p masks, penalties, greedy equivalence
(exercise 5.3), seeded reproducibility and validation."""

from __future__ import annotations

import math

import pytest
import torch

from engine.sampling import (
    GenerationConfig,
    apply_penalties,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    build_generator,
    sample,
    sample_rows,
    token_counts,
)

# Raschka ch. 5 toy vocabulary: {"closer": 0, ..., "pizza": 6, "toward": 7, "you": 8}
TOY_LOGITS = torch.tensor([[4.51, 0.89, -1.90, 6.75, 1.63, -1.62, -1.89, 6.28, 1.79]])
PIZZA = 6


def _draws(temperature: float, n: int = 1000) -> torch.Tensor:
    torch.manual_seed(123)
    cfg = GenerationConfig(temperature=temperature)
    return torch.cat([sample(TOY_LOGITS, cfg) for _ in range(n)]).flatten()


def test_exercise_5_1_pizza_counts():
    assert int((_draws(0.1) == PIZZA).sum()) == 0
    # softmax(logits / 5)[pizza] is the "true probability 4.3%"
    assert float(torch.softmax(TOY_LOGITS[0] / 5, dim=0)[PIZZA]) == pytest.approx(0.0430, abs=5e-5)
    # With torch.manual_seed(123) and one multinomial draw per call (the book's print_sampled_tokens), torch 2.13
    # reproduces the book's count exactly: 32 of 1000 (3.2%).
    assert int((_draws(5.0) == PIZZA).sum()) == 32


def test_exercise_5_1_temperature_0_is_never_pizza():
    cfg = GenerationConfig(temperature=0.0)
    assert all(int(sample(TOY_LOGITS, cfg)) == 3 for _ in range(20))  # "forward", the argmax


@pytest.mark.parametrize("temperature, expected", [
    (0.5, [0.98, 0.02, 0.00]),
    (1.0, [0.87, 0.12, 0.02]),
    (2.0, [0.67, 0.24, 0.09]),
])
def test_burkov_temperature_table(temperature, expected):
    probs = torch.softmax(apply_temperature(torch.tensor([[4.0, 2.0, 0.0]]), temperature), dim=-1)[0]
    assert [round(float(p), 2) for p in probs] == expected


def test_top_k_masks_to_minus_inf():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0], [0.0, -1.0, 9.0, 8.0, 7.0]])
    out = apply_top_k(logits, 3)
    assert torch.equal(torch.isinf(out), torch.tensor([[True, False, False, False, True],
                                                        [True, True, False, False, False]]))
    assert torch.equal(out[torch.isfinite(out)], logits[torch.isfinite(out)])
    probs = torch.softmax(out, dim=-1)
    assert float(probs[0, 0]) == 0.0 and float(probs[0, 4]) == 0.0
    assert torch.equal(apply_top_k(logits, None), logits)
    assert torch.equal(apply_top_k(logits, 0), logits)
    assert torch.equal(apply_top_k(logits, 99), logits)


def test_top_p_boundary():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda p: torch.isfinite(apply_top_p(logits, p))[0].tolist()  # noqa: E731
    assert kept(0.4) == [True, False, False, False]   # the top token alone crosses 0.4
    assert kept(0.6) == [True, True, False, False]    # 0.5 < 0.6: the crossing token (0.3) is kept
    assert kept(0.85) == [True, True, True, False]
    assert kept(0.99) == [True, True, True, True]
    assert kept(1e-9) == [True, False, False, False]  # at least one token survives
    assert torch.equal(apply_top_p(logits, 1.0), logits)
    shuffled = logits[:, [2, 0, 3, 1]]  # the mask follows the tokens, not their positions
    assert torch.isfinite(apply_top_p(shuffled, 0.6))[0].tolist() == [False, True, False, True]


def test_penalties():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    counts = token_counts([[0, 1, 0]], 1, 4)
    assert counts.tolist() == [[2.0, 1.0, 0.0, 0.0]]
    rep = apply_penalties(logits, counts, repetition_penalty=2.0)
    assert rep.tolist() == [[1.0, -4.0, 1.0, 0.5]]  # CTRL: divide positive, multiply negative, only seen tokens
    freq = apply_penalties(logits, counts, frequency_penalty=0.5)
    assert freq.tolist() == [[1.0, -2.5, 1.0, 0.5]]  # o[j] - alpha * count(j)
    pres = apply_penalties(logits, counts, presence_penalty=0.7)
    assert torch.allclose(pres, torch.tensor([[1.3, -2.7, 1.0, 0.5]]))  # o[j] - gamma if j occurred
    # penalties change the greedy choice
    cfg = GenerationConfig(temperature=0, frequency_penalty=1.0)
    assert int(sample(logits, cfg, generated_ids=[[0]])) == 0
    assert int(sample(logits, cfg, generated_ids=[[0, 0]])) == 2
    assert torch.equal(token_counts(torch.tensor([[3, 3, 1]]), 1, 4), torch.tensor([[0.0, 1.0, 0.0, 2.0]]))


def test_greedy_equivalences_exercise_5_3():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    argmax = torch.argmax(logits, dim=-1, keepdim=True)
    assert torch.equal(sample(logits, GenerationConfig(temperature=0.0)), argmax)
    assert torch.equal(sample(logits, GenerationConfig(temperature=1.5, top_k=1)), argmax)
    assert torch.equal(sample(logits, GenerationConfig(temperature=0.7, top_p=1e-6)), argmax)
    assert sample(logits, GenerationConfig()).shape == (4, 1)
    assert sample(logits, GenerationConfig()).dtype == torch.long


def test_seeded_reproducibility():
    logits = torch.randn(3, 100)
    cfg = GenerationConfig(temperature=1.0, top_k=50, top_p=0.9, seed=7)

    def run(seed: int) -> list[torch.Tensor]:
        gen = build_generator(seed)
        torch.manual_seed(seed + 1000)  # the global RNG must not matter when a generator is given
        return [sample(logits, cfg, gen) for _ in range(20)]

    a, b, c = run(7), run(7), run(8)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))
    assert build_generator(None) is None


def test_sampling_respects_filters():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]])).repeat(2000, 1)
    gen = build_generator(0)
    ids = sample(logits, GenerationConfig(temperature=1.0, top_k=2), gen).flatten()
    assert set(ids.tolist()) == {0, 1}
    ids = sample(logits, GenerationConfig(temperature=1.0, top_p=0.65), gen).flatten()
    assert set(ids.tolist()) == {0, 1}
    freq = float((ids == 0).float().mean())
    assert math.isclose(freq, 0.4 / 0.7, abs_tol=0.04)  # renormalised over the nucleus


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.97])
def test_fast_nucleus_draws_only_from_the_reference_nucleus(top_p):
    """sample() avoids sorting the vocabulary; its draws must stay inside apply_top_p's nucleus (V = 5000, with a
    nucleus of hundreds to thousands of tokens, so the candidate set has to grow)."""
    logits = torch.randn(2, 5000, generator=torch.Generator().manual_seed(3)) * 0.5
    cfg = GenerationConfig(temperature=0.9, top_p=top_p)
    allowed = torch.isfinite(apply_top_p(apply_temperature(logits, 0.9), top_p))
    gen = build_generator(0)
    draws = torch.cat([sample(logits, cfg, gen) for _ in range(300)], dim=1)  # (2, 300)
    for row in range(2):
        assert bool(allowed[row, draws[row]].all())
    assert len(set(draws[0].tolist())) > (1 if top_p == 0.05 else 100)


def test_sample_rows_per_row_configs():
    torch.manual_seed(0)
    logits = torch.randn(3, 30)
    cfgs = [GenerationConfig(), GenerationConfig(temperature=1.0, seed=1), GenerationConfig(top_k=1)]
    gens = [None, build_generator(1), None]
    out = sample_rows(logits, cfgs, gens)
    assert out.shape == (3, 1)
    assert int(out[0]) == int(logits[0].argmax()) and int(out[2]) == int(logits[2].argmax())
    expected = sample(logits[1:2], cfgs[1], build_generator(1))
    assert int(out[1]) == int(expected)
    with pytest.raises(ValueError, match="2 configs for 3 rows"):
        sample_rows(logits, cfgs[:2])


@pytest.mark.parametrize("kwargs, match", [
    ({"temperature": -0.1}, "temperature.*-0.1"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p.*0.0"),
    ({"top_p": 1.5}, "top_p.*1.5"),
    ({"top_k": -1}, "top_k.*-1"),
    ({"top_k": 2.5}, "top_k"),
    ({"max_new_tokens": 0}, "max_new_tokens.*0"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"frequency_penalty": float("inf")}, "frequency_penalty"),
    ({"seed": "x"}, "seed"),
    ({"stop": ("",)}, "stop"),
])
def test_bad_values_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GenerationConfig(**kwargs)


def test_config_defaults_and_from_dict():
    cfg = GenerationConfig()
    assert (cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, cfg.greedy) == (256, 0.0, None, 1.0, True)
    cfg = GenerationConfig.from_dict({"temperature": 0.7, "top_p": 0.9}, stop=["\n\n"])
    assert cfg.temperature == 0.7 and cfg.stop == ("\n\n",) and not cfg.greedy
    with pytest.raises(ValueError, match="tempurature"):
        GenerationConfig.from_dict({"tempurature": 0.7})
    with pytest.raises(Exception):
        cfg.temperature = 1.0  # frozen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_argmax_helper_is_torch_argmax(dtype) -> None:
    """sampling.argmax (our op for float32/bf16 on the CPU, torch.argmax otherwise) picks what torch.argmax picks,
    ties and all; greedy sampling goes through it."""
    from engine.sampling import argmax

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 1000, generator=g).to(dtype)
    logits[1, 10] = logits[1, 900] = logits[1].max() + 1  # a tie: the first one
    expected = torch.argmax(logits, dim=-1, keepdim=True)
    assert torch.equal(argmax(logits), expected)
    assert torch.equal(sample(logits, GenerationConfig(temperature=0.0)), expected)
