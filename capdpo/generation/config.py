"""Config sections of the two generating stages: `describe` (stage 2) and `variants` (stage 3)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from capdpo.config import option, require, require_at_least, require_choice
from capdpo.errors import ConfigError


@dataclass
class BackendConfig:
    """Which generation backend a section's model runs on (`capdpo.generation.backends`)."""

    section: ClassVar[str] = "backend"

    backend: str = option(
        "'local' (the model in this process; every method) or 'openai' (an OpenAI-compatible server: vLLM, SGLang, "
        "transformers serve; generation, and yesno / pairwise scoring where the server returns logprobs).",
        "local",
    )
    base_url: str = option("openai backend: the server's URL, e.g. http://127.0.0.1:8000/v1.", "")
    server_model: str = option("openai backend: the model name the server serves (default: the run's model).", "")
    server_key_env: str = option(
        "openai backend: environment variable holding the server's API key (never printed; unset: no key).", ""
    )
    max_concurrency: int = option("openai backend: requests in flight at once.", 16)
    request_timeout: float = option("openai backend: seconds to wait for one reply before retrying it.", 300.0)
    max_retries: int = option("openai backend: retries of a request on 429/5xx, timeouts and lost connections.", 6)
    image_transport: str = option(
        "openai backend: 'data_url' (the image's bytes, base64) or 'file_url' (file://path, for a server on this "
        "machine that may read local files, e.g. vLLM with --allowed-local-media-path).",
        "data_url",
    )

    def __post_init__(self) -> None:
        from capdpo.generation.backends import BACKENDS

        require_choice(f"{self.section}.backend", self.backend, BACKENDS)
        require_choice(f"{self.section}.image_transport", self.image_transport, ("data_url", "file_url"))
        if self.backend == "openai":
            require(
                self.base_url.startswith(("http://", "https://")),
                f"{self.section}.base_url",
                "give the server's http(s) URL",
            )
        require_at_least(self.section, self, 1, ("max_concurrency",))
        require_at_least(self.section, self, 0, ("max_retries",))
        require(self.request_timeout > 0, f"{self.section}.request_timeout", "must be > 0")


@dataclass
class SamplingConfig(BackendConfig):
    """How a generating stage samples (its section redeclares the defaults that differ)."""

    section: ClassVar[str] = "sampling"

    max_new_tokens: int = option("Token limit of one answer.", 128)
    temperature: float = option("Sampling temperature; 0 means greedy.", 1.0)
    top_p: float = option("Nucleus sampling mass.", 1.0)
    top_k: int = option("Keep only the k most likely tokens (0: off).", 0)
    repetition_penalty: float = option("Penalty on repeated tokens (1.0: off).", 1.0)
    batch_size: int = option("Requests per generate call; halves on CUDA out-of-memory.", 16)
    prefill_batch_size: int = option(
        "Requests per prefill forward (image + prompt) inside one generate call; 0: the whole batch. Decoding is "
        "memory-bound and gains from batches far larger than a prefill needs (GPU: batch_size 1024, 256 here).",
        0,
    )
    decode_window: int = option(
        "Static decoder: generated positions added to a decode step's attention window at a time (0: every step "
        "reads the whole KV cache). On CUDA each window is one more graph to capture, an extra eager step and the "
        "capture, so windows pay for long answers (max_new_tokens of several hundred: try 64-128), not for 128 tokens.",
        0,
    )
    decode_kernel: bool = option(
        "Static decoder on CUDA with Triton: decode steps attend through capdpo's kernel, which reads only the cache "
        "slots written so far (false: SDPA over the whole cache, e.g. to rule the kernel out).",
        True,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_sampling(self.section, self)

    def decoder_options(self) -> dict[str, Any]:
        """The local engine's static-decoder settings this section names (`Engine`'s keyword arguments)."""
        return {
            "prefill_rows": self.prefill_batch_size,
            "window_step": self.decode_window,
            "decode_kernel": self.decode_kernel,
        }


@dataclass
class DescribeConfig(SamplingConfig):
    """Stage 2: the strong model describes each image."""

    section: ClassVar[str] = "describe"

    max_new_tokens: int = option("Token limit of one description; a last sentence cut by it is dropped.", 512)
    temperature: float = option("Sampling temperature; 0 means greedy.", 0.7)
    top_p: float = option("Nucleus sampling mass.", 0.9)
    repetition_penalty: float = option("Penalty on repeated tokens (1.0: off).", 1.05)
    prompts: list[str] = option(
        "Description prompts; each image gets samples_per_image descriptions per prompt.",
        factory=lambda: ["Describe this image in detail."],
    )
    samples_per_image: int = option("Descriptions sampled per image and prompt.", 1)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.prompts or any(not p.strip() for p in self.prompts):
            raise ConfigError("describe.prompts: give at least one non-empty prompt")
        if self.samples_per_image < 1:
            raise ConfigError("describe.samples_per_image: must be >= 1")
        if self.samples_per_image > 1 and self.temperature == 0:
            raise ConfigError(
                "describe.samples_per_image: greedy decoding (temperature 0) makes every sample identical"
            )


@dataclass
class VariantsConfig(SamplingConfig):
    """Stage 3: the strong model rewrites every sentence into k variants."""

    section: ClassVar[str] = "variants"

    max_new_tokens: int = option("Token limit of one variant.", 96)
    temperature: float = option("Sampling temperature; 0 means greedy (only with k: 1).", 1.0)
    top_p: float = option("Nucleus sampling mass.", 0.95)
    batch_size: int = option("Requests per generate call; halves on CUDA out-of-memory.", 32)
    k: int = option(
        "Distinct usable rewrites wanted per sentence (the original is always kept as a candidate too).", 4
    )
    max_rounds: int = option(
        "Rounds of sampling: after the first k samples, a sentence with fewer than k distinct usable rewrites is "
        "asked again for the missing ones, up to this many rounds in all (1: one round of k samples).",
        3,
    )
    round_temperature_step: float = option(
        "Temperature added in each later round (round r samples at temperature + (r - 1) * step): a model that "
        "keeps repeating itself is pushed to say something else.",
        0.25,
    )
    min_words: int = option(
        "A rewrite with fewer words, a bare list marker or a list header is not usable: it is kept but does not "
        "count towards k (stage 5 never pairs it).",
        3,
    )
    prompt: str = option(
        "Rewrite instruction. {context} is the description so far, {sentence} the sentence to rewrite.",
        "Here is the beginning of a description of this image:\n{context}\n\nRewrite the next sentence of the "
        "description so that it describes the image accurately. You may keep it, correct details or change them."
        "\nSentence: {sentence}\n\nAnswer with the rewritten sentence only.",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.k < 1:
            raise ConfigError("variants.k: must be >= 1")
        if self.k > 1 and self.temperature == 0:
            raise ConfigError("variants.k: greedy decoding (temperature 0) makes all k variants identical")
        require_at_least("variants", self, 1, ("max_rounds",))
        require_at_least("variants", self, 0, ("min_words",))
        require(self.round_temperature_step >= 0, "variants.round_temperature_step", "must be >= 0")
        if "{sentence}" not in self.prompt:
            raise ConfigError("variants.prompt: must contain {sentence}")


def check_sampling(section: str, cfg: Any) -> None:
    """The sampling fields both sections share (`max_new_tokens` ... `decode_window`)."""
    require_at_least(section, cfg, 1, ("max_new_tokens", "batch_size"))
    require_at_least(section, cfg, 0, ("top_k",))
    require(cfg.temperature >= 0, f"{section}.temperature", "must be >= 0")
    require(0 < cfg.top_p <= 1, f"{section}.top_p", "must be in (0, 1]")
    require(cfg.repetition_penalty > 0, f"{section}.repetition_penalty", "must be > 0")
    require(cfg.prefill_batch_size >= 0, f"{section}.prefill_batch_size", "must be >= 0 (0: the whole batch)")
    require(cfg.decode_window >= 0, f"{section}.decode_window", "must be >= 0 (0: the whole cache)")
