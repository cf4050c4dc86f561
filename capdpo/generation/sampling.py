"""Reproducible sampling: every row samples from a pure function of (its seed, the step, the token id).

Each row samples with Gumbel-max noise drawn from a counter-based hash of (request seed, step, token id), so a
description does not depend on which other requests shared its batch, on a crash and resume, on the batch size or
on the number of GPUs. `filter_scores` applies temperature, top-k and top-p; adding `gumbel_noise` and taking the
argmax is then an exact sample from the filtered softmax (the Gumbel-max trick). `SeededSampler` does this inside
`transformers.generate`; the static decoder calls the same functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from capdpo.jsonl import stable_id

_MASK32 = 0xFFFFFFFF


@dataclass
class Generation:
    """Sampling settings. temperature 0 is greedy decoding."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0

    @classmethod
    def from_section(cls, section: Any) -> Generation:
        """Sampling settings of a config section that has these fields (describe, variants)."""
        return cls(**{f: getattr(section, f) for f in cls.__dataclass_fields__})


def seed_of(*parts: Any) -> int:
    """A 32-bit seed from anything hashable into a stable id."""
    return int(stable_id(*parts)[:8], 16)


def _mul32(x: Any, c: int) -> Any:
    # (x * c) mod 2**32 in int64 without overflow: split x into 16-bit halves.
    lo = (x & 0xFFFF) * c
    hi = ((x >> 16) * c) & 0xFFFF
    return (lo + (hi << 16)) & _MASK32


def _hash32(x: Any) -> Any:
    # A strong 32-bit integer mixer (xorshift-multiply), vectorised on int64 tensors holding values < 2**32.
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def gumbel_noise(seeds: Any, step: int, vocab_size: int) -> Any:
    """Standard Gumbel noise [len(seeds), vocab_size], a pure function of (seed, step, token id)."""
    import torch

    seeds = seeds.to(torch.int64) & _MASK32
    row = _hash32(_hash32(seeds) ^ (step & _MASK32))
    idx = _mul32(torch.arange(vocab_size, device=seeds.device, dtype=torch.int64), 0x9E3779B1)
    bits = _hash32(row[:, None] ^ idx[None, :])
    uniform = ((bits >> 8).to(torch.float64) + 0.5) / float(1 << 24)
    return -torch.log(-torch.log(uniform)).to(torch.float32)


def filter_scores(scores: Any, gen: Generation) -> Any:
    """Temperature, top-k and top-p on [B, V] float32 scores (no host synchronisation)."""
    import torch

    scores = scores / gen.temperature
    if gen.top_k and gen.top_k < scores.shape[-1]:
        kth = torch.topk(scores, gen.top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if gen.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
        probs = sorted_scores.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the top token always stays)
        drop_sorted = (probs.cumsum(-1) - probs) >= gen.top_p
        scores = scores.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return scores


def sampled_scores(scores: Any, seeds: Any, step: Any, gen: Generation, backend: str | None = None) -> Any:
    """`filter_scores` plus `gumbel_noise` for step `step` (an int or a 0-d tensor): the argmax of the result is a
    sample. `backend` (e.g. "inductor", for CUDA): the noise and its addition run as one compiled elementwise kernel
    instead of ~20 passes over [B, V] (the same integer hash and float64 logs, so the same values; the top-k/top-p
    filter stays eager, as a compiled softmax and cumsum would sum in another order)."""
    scores = filter_scores(scores, gen)
    if backend is None:
        return _add_noise(scores, seeds, step)
    from capdpo.models.patches import compiled_or_eager

    return compiled_or_eager(_add_noise, backend)(scores, seeds, step)


def _add_noise(scores: Any, seeds: Any, step: Any) -> Any:
    return scores + gumbel_noise(seeds, step, scores.shape[-1])


def repetition_penalty(scores: Any, seen: Any, penalty: float) -> Any:
    """transformers' RepetitionPenaltyLogitsProcessor rule, on a [B, V] mask of the tokens seen so far."""
    import torch

    penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen, penalised, scores)


class SeededSampler:
    """A logits processor that turns greedy decoding into per-row reproducible sampling (see the module doc)."""

    def __init__(self, seeds: Sequence[int], prompt_length: int, gen: Generation, device: Any) -> None:
        import torch

        self.seeds = torch.tensor(list(seeds), dtype=torch.int64, device=device)
        self.prompt_length = prompt_length
        self.gen = gen

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        step = input_ids.shape[1] - self.prompt_length
        return sampled_scores(scores.float(), self.seeds[: scores.shape[0]], step, self.gen)
