"""Caption quality against reference captions (BLEU, ROUGE-L) and the optional critic-score hook.

- BLEU-1..4: sacreBLEU corpus BLEU (13a tokeniser, case-insensitive like the COCO caption toolkit, any number of
  references per caption). Figures are sacreBLEU's, not pycocoevalcap's: tokenisation and smoothing differ, so
  compare them only with other sacreBLEU figures.
- ROUGE-L: Google's `rouge-score` F-measure of the longest common subsequence, the best reference per caption,
  averaged over captions.
- Critic: a judge model rates every caption 0-100. capdpo's own is a VLM judge that sees the image and the reference
  captions (`capdpo.evaluation.critic`: `--critic vlm`, default model LLaVA-Critic-7B, local or through an
  OpenAI-compatible endpoint); any other function with the `CaptionCritic` signature plugs in the same way
  (`--critic package.module:function`, options from `--critic-config`).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from capdpo.errors import ConfigError


@dataclass(frozen=True)
class CriticRequest:
    """One caption for a critic to rate."""

    image_id: int
    image: str | None  # path of the image file when the images folder is known, else None
    caption: str
    references: list[str]


CaptionCritic = Callable[..., Sequence[float | None]]
"""`critic(requests: list[CriticRequest], **options) -> scores`: one score in [0, 100] per request, in order, or
None where the judge's reply could not be read (counted and reported as `Critic_unparsed`, never dropped silently)."""


def bleu_scores(captions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus BLEU-1..4 (0-100) of captions against their references (any number per caption, at least one)."""
    from sacrebleu.metrics import BLEU

    if len(captions) != len(references) or any(not refs for refs in references):
        raise ValueError("every caption needs at least one reference")
    width = max(len(refs) for refs in references)
    # sacreBLEU takes reference *streams*; a caption with fewer references pads its streams with None.
    streams = [[refs[k] if k < len(refs) else None for refs in references] for k in range(width)]
    out = {}
    for order in (1, 2, 3, 4):
        score = BLEU(lowercase=True, max_ngram_order=order).corpus_score(list(captions), streams)
        out[f"BLEU-{order}"] = round(score.score, 2)
    return out


def rouge_l_scores(captions: Sequence[str], references: Sequence[Sequence[str]]) -> list[float]:
    """ROUGE-L F-measure (0-100) of each caption against its best reference."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return [
        scorer.score_multi(list(refs), caption)["rougeL"].fmeasure * 100
        for caption, refs in zip(captions, references, strict=True)
    ]


def text_metrics(captions: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[dict[str, float], list[float]]:
    """BLEU-1..4 and mean ROUGE-L (rounded to 2 decimals), plus the per-caption ROUGE-L."""
    per_caption = rouge_l_scores(captions, references)
    metrics = bleu_scores(captions, references)
    metrics["ROUGE-L"] = round(sum(per_caption) / len(per_caption), 2) if per_caption else 0.0
    return metrics, per_caption


BUILTIN_CRITIC = "capdpo.evaluation.critic:vlm_critic"
CRITIC_NAMES = {"vlm": BUILTIN_CRITIC, "llava-critic": BUILTIN_CRITIC}  # --critic NAME for capdpo's own critic


def critic_spec(spec: str) -> str:
    """`package.module:function` of a critic given by that or by the name of a built-in (`CRITIC_NAMES`)."""
    return CRITIC_NAMES.get(spec, spec)


def load_critic(spec: str) -> CaptionCritic:
    """Import a critic given as `package.module:function`, or a built-in by name (`vlm`, `llava-critic`)."""
    spec = critic_spec(spec)
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(
            f"--critic: '{spec}' should look like package.module:function, or name a built-in critic "
            f"({', '.join(CRITIC_NAMES)})"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"--critic: cannot import {module_name} ({err})") from None
    critic = getattr(module, attr, None)
    if not callable(critic):
        raise ConfigError(f"--critic: {module_name} has no function '{attr}'")
    return critic


def critic_scores(
    critic: CaptionCritic, requests: list[CriticRequest], options: dict[str, Any] | None = None
) -> tuple[dict[str, float | int], list[float | None]]:
    """Run a critic; return {"Critic": mean of the readable scores, "Critic_unparsed": count} and the scores."""
    scores = list(critic(requests, **(options or {})))
    if len(scores) != len(requests):
        raise ConfigError(f"--critic: returned {len(scores)} scores for {len(requests)} captions")
    for score in scores:
        valid = score is None or (
            isinstance(score, (int, float))
            and not isinstance(score, bool)
            and math.isfinite(score)
            and 0 <= score <= 100
        )
        if not valid:
            raise ConfigError(f"--critic: returned {score!r}; scores must be numbers in [0, 100] or None")
    readable = [float(s) for s in scores if s is not None]
    mean = round(sum(readable) / len(readable), 2) if readable else None
    return {"Critic": mean, "Critic_unparsed": len(scores) - len(readable)}, scores  # type: ignore[dict-item]
