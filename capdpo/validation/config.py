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
    claims_prompt: str = option(
        "Question for `claims`, asked once per claim; {question} is the claim's yes/no question.",
        "{question} Answer yes or no.",
    )
    claims_combine: str = option(
        "How `claims` combines a candidate's claim scores: min, mean, or false_count (1 / (1 + claims judged "
        "false), RLAIF-V's count).",
        "min",
    )
    claims_threshold: float = option("`claims`: a claim scoring below this is judged false (false_count).", 0.5)
    claims_max: int = option("`claims`: at most this many claims per sentence (0: all).", 8)
    claims_decomposer: str = option(
        "Who splits sentences into claims: 'strong' (the run's strong model), 'weak', 'rules' (word lists, no "
        "model), or a model path / hub id; a model's answer without a usable question falls back to the rules.",
        "strong",
    )
    claims_base_url: str = option(
        "`claims`: an OpenAI-compatible endpoint that decomposes instead of a local model (e.g. "
        "http://127.0.0.1:8000/v1); claims_decomposer then names the served model.",
        "",
    )
    claims_key_env: str = option("`claims`: environment variable holding that endpoint's API key.", "")
    claims_decompose_prompt: str = option(
        "Instruction for the claim decomposer; {sentence} is the candidate.",
        "Split the following sentence into atomic claims: each object, count, attribute and relation it states. "
        "Write each claim as a yes/no question about the image, one per line, nothing else.\nSentence: {sentence}",
    )
    claims_max_new_tokens: int = option("`claims`: token limit of the decomposer's answer.", 160)
    batch_size: int = option("Prompts per forward pass; halves on CUDA out-of-memory.", 32)
    shared_prefix: bool = option(
        "Run each image and the shared start of the instruction once, then score all its candidates' suffixes "
        "on that cache (same scores, much faster). false: one full forward per prompt.",
        True,
    )
    images_per_pass: int = option(
        "shared_prefix: images whose shared prefixes run in one forward pass; their candidates' suffixes then run "
        "batch_size at a time (bench/validate.py on an H100 with the 3B: the fastest shape of each run had 32).",
        32,
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
        if self.claims_combine not in ("min", "mean", "false_count"):
            raise ConfigError(f"validate.claims_combine: {self.claims_combine!r} — choose min, mean or false_count")
        if "{question}" not in self.claims_prompt:
            raise ConfigError("validate.claims_prompt: must contain {question}")
        if "{sentence}" not in self.claims_decompose_prompt:
            raise ConfigError("validate.claims_decompose_prompt: must contain {sentence}")
        if not 0 < self.claims_threshold < 1:
            raise ConfigError("validate.claims_threshold: must be between 0 and 1")
        if self.claims_max < 0 or self.claims_max_new_tokens < 1:
            raise ConfigError("validate.claims_max / claims_max_new_tokens: must be >= 0 / >= 1")
        if not self.claims_decomposer:
            raise ConfigError("validate.claims_decomposer: give strong, weak, rules or a model")
        if self.claims_base_url and not self.claims_base_url.startswith(("http://", "https://")):
            raise ConfigError("validate.claims_base_url: give the endpoint's http(s) URL")
        if self.batch_size < 1:
            raise ConfigError("validate.batch_size: must be >= 1")
        if self.images_per_pass < 1:
            raise ConfigError("validate.images_per_pass: must be >= 1")
