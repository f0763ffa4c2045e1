"""Sampling: runtime generation settings and pure functions from next-token logits to token ids.

The pipeline for logits ``(B, V)`` is, in this order (litgpt generate/base.py; Burkov sec. 5.4):

1. penalties on the tokens generated so far: CTRL's repetition penalty (Keskar et al. 2019: a positive logit is
   divided by the penalty, a negative one multiplied), then Burkov's frequency penalty ``o[j] -= alpha * count(j)``
   and presence penalty ``o[j] -= gamma`` if ``j`` occurred (seed c2);
2. greedy shortcut: ``temperature == 0`` or ``top_k == 1`` is exactly ``argmax`` (the seed's exercise 5.3);
3. top-k: keep the ``k`` largest logits, set the rest to ``-inf`` (Raschka ch. 5);
4. temperature: ``logits / T`` (T < 1 sharpens, T > 1 flattens);
5. top-p (nucleus): keep the smallest set of most likely tokens whose probability reaches ``p``; the token that
   crosses ``p`` is kept (HF/vLLM convention), and at least one token always survives;
6. softmax in float32 and ``torch.multinomial`` with an optional seeded ``torch.Generator``.

Top-k and temperature commute (both keep the order of logits), so 3-4 equals the seed's "temperature, then top-k".
Top-p comes after temperature because the nucleus depends on the scaled distribution.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch

from engine import kernels


@dataclass(frozen=True)
class GenerationConfig:
    """Runtime generation settings (validated on construction; ``ValueError`` names the bad value).

    Attributes:
        max_new_tokens: upper bound on generated tokens (>= 1).
        temperature: 0 means greedy; otherwise > 0.
        top_k: keep the k most likely tokens; None or 0 disables it, 1 is greedy.
        top_p: nucleus mass in (0, 1]; 1 disables it.
        repetition_penalty: CTRL-style, > 0; 1 disables it, > 1 discourages repeats.
        frequency_penalty: subtracted once per earlier occurrence of a token; 0 disables it.
        presence_penalty: subtracted once if a token occurred at all; 0 disables it.
        seed: seed for a per-request ``torch.Generator``; None uses torch's global RNG.
        stop: extra stop strings (added to the prompt format's own).
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif not isinstance(self.stop, tuple):
            object.__setattr__(self, "stop", tuple(self.stop))
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if not _is_real(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 0):
            raise ValueError(f"top_k must be None or an int >= 0 (0 = off), got {self.top_k!r}")
        if not _is_real(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_real(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty!r}")
        for name in ("frequency_penalty", "presence_penalty"):
            if not _is_real(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be None or an int, got {self.seed!r}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got {s!r}")

    @property
    def greedy(self) -> bool:
        """True when sampling is exactly argmax (temperature 0 or top_k 1)."""
        return self.temperature == 0 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, **overrides: Any) -> GenerationConfig:
        """Build from a manifest ``generation`` dict (unknown keys are an error), with keyword overrides."""
        data = {**(data or {}), **overrides}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown generation settings {unknown}; known settings are {sorted(known)}")
        return cls(**data)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def build_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A seeded generator for one request, or None (use torch's global RNG)."""
    if seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def token_counts(generated_ids: torch.Tensor | Sequence[Sequence[int]], batch: int, vocab: int,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """(B, V) float counts of each id in each row of ``generated_ids`` ((B, L) tensor or ragged lists)."""
    counts = torch.zeros(batch, vocab, device=device)
    if isinstance(generated_ids, torch.Tensor):
        if generated_ids.numel():
            ids = generated_ids.to(device=device, dtype=torch.long).reshape(batch, -1)
            counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=counts.dtype))
        return counts
    if len(generated_ids) != batch:
        raise ValueError(f"generated_ids has {len(generated_ids)} rows but logits have {batch}")
    for row, ids in enumerate(generated_ids):
        if len(ids):
            idx = torch.as_tensor(ids, dtype=torch.long, device=device)
            counts[row].scatter_add_(0, idx, torch.ones_like(idx, dtype=counts.dtype))
    return counts


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, *, repetition_penalty: float = 1.0,
                    frequency_penalty: float = 0.0, presence_penalty: float = 0.0) -> torch.Tensor:
    """Penalise tokens that already occurred.

    Args:
        logits: (B, V).
        counts: (B, V) occurrences of each token so far (see :func:`token_counts`).
        repetition_penalty: CTRL: where count > 0, a positive logit is divided by it, a negative one multiplied.
        frequency_penalty: ``logit -= frequency_penalty * count``.
        presence_penalty: ``logit -= presence_penalty`` where count > 0.

    Returns:
        New (B, V) logits.
    """
    seen = counts > 0
    if repetition_penalty != 1.0:
        penalised = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if frequency_penalty:
        logits = logits - frequency_penalty * counts
    if presence_penalty:
        logits = logits - presence_penalty * seen.to(logits.dtype)
    return logits


def apply_top_k(logits: torch.Tensor, top_k: int | None) -> torch.Tensor:
    """Keep the ``top_k`` largest logits per row (ties with the k-th are kept), set the rest to -inf."""
    if not top_k or top_k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits / temperature`` (temperature > 0; 0 is handled as greedy before this)."""
    if temperature <= 0:
        raise ValueError(f"apply_temperature needs temperature > 0, got {temperature}; use argmax for 0")
    return logits if temperature == 1.0 else logits / temperature


def apply_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filter: keep the most likely tokens until their probability reaches ``top_p``.

    A token is kept when the probability mass of the tokens ranked above it is below ``top_p``, so the token that
    crosses ``top_p`` stays and the top token always survives.
    """
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # (B, V) mass ranked strictly above each token
    drop_sorted = mass_before >= top_p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def logits_to_probs(logits: torch.Tensor, cfg: GenerationConfig) -> torch.Tensor:
    """Top-k -> temperature -> top-p -> softmax, in float32; ``cfg`` must not be greedy."""
    logits = apply_top_k(logits.float(), cfg.top_k)
    logits = apply_temperature(logits, cfg.temperature)
    logits = apply_top_p(logits, cfg.top_p)
    return torch.softmax(logits, dim=-1)


def sample(logits: torch.Tensor, cfg: GenerationConfig, generator: torch.Generator | None = None,
           generated_ids: torch.Tensor | Sequence[Sequence[int]] | None = None) -> torch.Tensor:
    """Pick the next token of every row.

    Args:
        logits: (B, V) next-token logits (any float dtype; computed in float32).
        cfg: the generation settings (all rows share them; see :func:`sample_rows` for per-row settings).
        generator: seeded RNG for reproducible sampling; None uses torch's global RNG.
        generated_ids: tokens generated so far per row, for the penalties ((B, L) tensor or ragged lists).

    Returns:
        (B, 1) int64 token ids.
    """
    if logits.dim() != 2:
        raise ValueError(f"sample expects logits of shape (B, V), got {tuple(logits.shape)}")
    logits = logits.float()
    if cfg.has_penalties and generated_ids is not None:
        counts = token_counts(generated_ids, logits.shape[0], logits.shape[1], logits.device)
        logits = apply_penalties(logits, counts, repetition_penalty=cfg.repetition_penalty,
                                 frequency_penalty=cfg.frequency_penalty, presence_penalty=cfg.presence_penalty)
    if cfg.greedy:
        return argmax(logits)
    # The fast paths below draw from exactly the distribution logits_to_probs describes, without sorting V logits.
    if cfg.top_k and cfg.top_k < logits.shape[-1]:
        # temperature, top-p and softmax then work on k values instead of V
        values, indices = torch.topk(logits, cfg.top_k, dim=-1)  # (B, k), sorted descending
        probs = torch.softmax(apply_top_p(apply_temperature(values, cfg.temperature), cfg.top_p), dim=-1)
        return indices.gather(-1, torch.multinomial(probs, num_samples=1, generator=generator))
    probs = torch.softmax(apply_temperature(logits, cfg.temperature), dim=-1)
    if cfg.top_p < 1.0:
        return _sample_nucleus(probs, cfg.top_p, generator)
    return torch.multinomial(probs, num_samples=1, generator=generator)


def _sample_nucleus(probs: torch.Tensor, top_p: float, generator: torch.Generator | None,
                    first_k: int = 256) -> torch.Tensor:
    """Top-p sampling that sorts only as many candidates as the nucleus needs.

    The nucleus is a prefix of the tokens sorted by probability, so once the ``k`` most likely tokens hold at least
    ``top_p`` of the mass the nucleus lies among them; ``k`` grows 4x until that holds (or covers the vocabulary).
    """
    V = probs.shape[-1]
    k = min(first_k, V)
    while True:
        values, indices = torch.topk(probs, k, dim=-1)  # (B, k), sorted descending
        if k == V or bool((values.sum(-1) >= top_p).all()):
            break
        k = min(4 * k, V)
    mass_before = torch.cumsum(values, dim=-1) - values
    keep = mass_before < top_p
    keep[..., 0] = True
    choice = torch.multinomial(values * keep, num_samples=1, generator=generator)  # weights need not sum to 1
    return indices.gather(-1, choice)


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """``torch.argmax(logits, dim=-1, keepdim=True)`` for (B, V) logits: our vectorized op on the CPU (PyTorch's
    reduces element by element, ~42 us for a 49k vocabulary, a greedy decode step's largest cost outside the model
    after the head), the same indices (first of equal maxima, a NaN counts as the largest)."""
    if logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.bfloat16) and logits.dim() == 2 \
            and logits.shape[-1] > 0 and kernels.available():
        return torch.ops.scratchchat.argmax(logits)
    return torch.argmax(logits, dim=-1, keepdim=True)


def sample_rows(logits: torch.Tensor, cfgs: Sequence[GenerationConfig],
                generators: Sequence[torch.Generator | None] | None = None,
                generated_ids: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
    """Like :func:`sample` but every row has its own settings and generator (the batched scheduler's case).

    Rows that are greedy without penalties share one argmax; the others are sampled one row at a time.

    Returns:
        (B, 1) int64 token ids.
    """
    B = logits.shape[0]
    if len(cfgs) != B:
        raise ValueError(f"got {len(cfgs)} configs for {B} rows")
    generators = generators if generators is not None else [None] * B
    out = argmax(logits)  # greedy rows are done already
    for row, cfg in enumerate(cfgs):
        if cfg.greedy and not cfg.has_penalties:
            continue
        ids = [generated_ids[row]] if generated_ids is not None else None
        out[row] = sample(logits[row : row + 1], cfg, generators[row], ids)[0]
    return out
