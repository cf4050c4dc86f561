"""Config section of stage 4 (`validate`): how the weak model scores candidates."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from capdpo.config import option
from capdpo.errors import ConfigError
from capdpo.generation.config import BackendConfig
from capdpo.validation.methods import METHODS


@dataclass
class ValidateConfig(BackendConfig):
    """Stage 4: the weak model scores every candidate against its image."""

    section: ClassVar[str] = "validate"

    methods: list[str] = option(
        f"Scoring methods: {', '.join(METHODS)} (combined by weighted mean).", factory=lambda: ["yesno"]
    )
    weights: list[float] = option("One weight per method (default: equal).", factory=list)
    yesno_prompt: str = option(
        "Question for `yesno`; {sentence} is the candidate.",
        "Is the following sentence an accurate description of this image? Sentence: {sentence}\nAnswer yes or no.",
    )
    rating_prompt: str = option(
        "Question for `rating`; {sentence} is the candidate.",
        "Rate how accurately the following sentence describes this image, from 0 (completely wrong) to 100 "
        "(completely accurate). Sentence: {sentence}\nAnswer with the number only.",
    )
    pairwise_prompt: str = option(
        "Question for `pairwise`; {a} and {b} are the two candidates.",
        "Which sentence describes this image more accurately?\nA: {a}\nB: {b}\nAnswer A or B.",
    )
    batch_size: int = option("Prompts per forward pass; halves on CUDA out-of-memory.", 32)
    shared_prefix: bool = option(
        "Run each image and the shared start of the instruction once, then score all its candidates' suffixes "
        "on that cache (same scores, much faster). false: one full forward per prompt.",
        True,
    )
    server_top_logprobs: int = option(
        "openai backend: top log-probabilities asked for the answer's first token (the OpenAI API allows 20, "
        "vLLM up to its --max-logprobs); yes/no mass outside them is not counted.",
        20,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.backend != "local" and "rating" in self.methods:
            raise ConfigError(
                "validate.methods: rating reads each number's probability token by token, which needs the model in "
                "this process (backend: local); through a server use yesno or pairwise"
            )
        if self.server_top_logprobs < 1:
            raise ConfigError("validate.server_top_logprobs: must be >= 1")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ConfigError(f"validate.methods: {unknown or 'empty'} — choose from {', '.join(METHODS)}")
        if len(set(self.methods)) != len(self.methods):
            raise ConfigError("validate.methods: a method is listed twice")
        if self.weights and len(self.weights) != len(self.methods):
            raise ConfigError(f"validate.weights: {len(self.weights)} weights for {len(self.methods)} methods")
        if any(w < 0 for w in self.weights) or (self.weights and sum(self.weights) <= 0):
            raise ConfigError("validate.weights: must be >= 0 and not all zero")
        for name in ("yesno_prompt", "rating_prompt"):
            if "{sentence}" not in getattr(self, name):
                raise ConfigError(f"validate.{name}: must contain {{sentence}}")
        if "{a}" not in self.pairwise_prompt or "{b}" not in self.pairwise_prompt:
            raise ConfigError("validate.pairwise_prompt: must contain {a} and {b}")
        if self.batch_size < 1:
            raise ConfigError("validate.batch_size: must be >= 1")
