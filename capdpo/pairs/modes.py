"""Pair-building modes: how one scored sentence's best and worst candidates become a chosen and a rejected
completion. Stage 5 looks the configured `pairs.mode` up in `MODES`.

To add a mode, write a function `(context, index, chosen, rejected) -> Completions` and register it below; the
config accepts every name in `MODES`, and a pair's `mode` field records it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Completions:
    """A pair's two completions and the assistant text before them (part of the prompt)."""

    assistant_prefix: str
    chosen: str
    rejected: str


def context_completions(context: list[str], index: int, chosen: str, rejected: str) -> Completions:
    """The whole description with sentence `index` replaced: the completion answers the description prompt."""
    before, after = context[:index], context[index + 1 :]
    return Completions("", " ".join([*before, chosen, *after]), " ".join([*before, rejected, *after]))


def sentence_completions(context: list[str], index: int, chosen: str, rejected: str) -> Completions:
    """Single sentences after the description so far (`assistant_prefix`, part of the prompt)."""
    return Completions(" ".join(context[:index]), chosen, rejected)


@dataclass(frozen=True)
class PairMode:
    """A registered mode: what it builds, in a few words, and the function that builds it."""

    summary: str
    completions: Callable[[list[str], int, str, str], Completions]


MODES: dict[str, PairMode] = {
    "context": PairMode("full descriptions differing in one sentence", context_completions),
    "sentence": PairMode("single sentences after the description so far", sentence_completions),
}
