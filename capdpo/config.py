"""Run configs: one YAML per run, one dataclass per stage section, CLI flags override the YAML.

A run YAML has shared top-level keys (`CommonConfig`) and one section per stage::

    run_dir: runs/demo
    strong_model: Qwen/Qwen2.5-VL-7B-Instruct
    describe:
      max_new_tokens: 256

`python 2_generate_descriptions.py --config run.yaml --max_new_tokens 128` then reads the shared keys and the
`describe` section; flags name fields of either without the section prefix. Every section of the file is
validated by every stage, so a typo in a later stage's section fails before hours of generation, not after.
"""

from __future__ import annotations

import argparse
import difflib
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from capdpo.errors import ConfigError


def _help(text: str, default: Any = MISSING, factory: Any = MISSING) -> Any:
    if factory is not MISSING:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class CommonConfig:
    """Keys shared by every stage of a run."""

    run_dir: str = _help("Folder that holds every output of this run (created if missing).", "runs/default")
    seed: int = _help("Seed for sampling images, generation and the train/validation split.", 0)
    strong_model: str = _help(
        "Hub id or local folder of the strong VLM (describes images, writes variants).", "Qwen/Qwen2.5-VL-7B-Instruct"
    )
    strong_adapter: str = _help(
        "PEFT adapter folder merged into strong_model wherever it is used (stages 2, 3 and 6): an earlier round's "
        "trained policy (see `python -m capdpo.rounds`). Record ids and the reference log-probs include its content "
        "hash. Empty: none.",
        "",
    )
    weak_model: str = _help(
        "Hub id or local folder of the weak VLM that scores candidates.", "Qwen/Qwen2.5-VL-3B-Instruct"
    )
    device: str = _help("'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N'.", "auto")
    dtype: str = _help("'auto' (bf16 on GPU, fp32 on CPU), 'bfloat16' or 'float32'. fp16 is refused.", "auto")
    attn_implementation: str = _help("'auto' (flash_attention_2 if installed, else sdpa), 'sdpa' or 'eager'.", "auto")
    min_pixels: int = _help("Smallest image area in pixels fed to Qwen models (0: the processor's own setting).", 0)
    max_pixels: int = _help("Largest image area in pixels fed to Qwen models (0: the processor's own setting).", 0)
    trust_remote_code: bool = _help("Allow model repos to run their own Python code. Off unless you trust it.", False)
    allow_partial: bool = _help("Accept an unfinished previous stage as input (its finished records only).", False)

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "bfloat16", "float32"):
            raise ConfigError(f"dtype: '{self.dtype}' is not one of auto, bfloat16, float32 (fp16 overflows in VLMs)")
        if self.attn_implementation not in ("auto", "sdpa", "eager", "flash_attention_2", "flash_attention_3"):
            raise ConfigError(f"attn_implementation: unknown value '{self.attn_implementation}'")
        if (self.min_pixels or self.max_pixels) and not 0 < self.min_pixels <= self.max_pixels:
            raise ConfigError("min_pixels/max_pixels: set both, with 0 < min_pixels <= max_pixels (or both 0)")


@dataclass
class ImagesConfig:
    """Stage 1: which images the run uses."""

    source: str = _help(
        "'folder' (recursive), 'coco' (images dir + annotation json) or 'hf' (dataset dir / parquet).", "folder"
    )
    path: str = _help("Image folder, COCO images folder, HF dataset folder (save_to_disk) or parquet file/folder.", "")
    coco_instances: str = _help("COCO instances json (keeps object categories per image for CHAIR).", "")
    coco_captions: str = _help("COCO captions json (keeps reference captions per image).", "")
    hf_image_column: str = _help("Image column of an HF dataset / parquet source.", "image")
    hf_id_column: str = _help("Optional id column of an HF dataset / parquet source, kept as source_id.", "")
    n: int = _help("Sample this many images (seeded); 0 keeps all.", 0)
    exclude: list[str] = _help(
        "Files listing image ids, sha256s, paths or COCO ids never to use (one per line, or a JSON list / "
        "AMBER-style query file): evaluation images must never be trained on.",
        factory=list,
    )
    extensions: list[str] = _help(
        "File endings taken from a folder.", factory=lambda: [".jpg", ".jpeg", ".png", ".webp"]
    )
    min_side: int = _help("Images whose shorter side is below this many pixels are skipped.", 28)

    def __post_init__(self) -> None:
        if self.source not in ("folder", "coco", "hf"):
            raise ConfigError(f"images.source: '{self.source}' is not one of folder, coco, hf")
        if self.n < 0:
            raise ConfigError("images.n: must be >= 0")


@dataclass
class DescribeConfig:
    """Stage 2: the strong model describes each image."""

    prompts: list[str] = _help(
        "Description prompts; each image gets samples_per_image descriptions per prompt.",
        factory=lambda: ["Describe this image in detail."],
    )
    samples_per_image: int = _help("Descriptions sampled per image and prompt.", 1)
    max_new_tokens: int = _help("Token limit of one description; a last sentence cut by it is dropped.", 512)
    temperature: float = _help("Sampling temperature; 0 means greedy.", 0.7)
    top_p: float = _help("Nucleus sampling mass.", 0.9)
    top_k: int = _help("Keep only the k most likely tokens (0: off).", 0)
    repetition_penalty: float = _help("Penalty on repeated tokens (1.0: off).", 1.05)
    batch_size: int = _help("Requests per generate call; halves on CUDA out-of-memory.", 16)
    prefill_batch_size: int = _help(
        "Requests per prefill forward (image + prompt) inside one generate call; 0: the whole batch. Decoding is "
        "memory-bound and gains from batches far larger than a prefill needs (GPU: batch_size 1024, 256 here).",
        0,
    )

    def __post_init__(self) -> None:
        _check_generation("describe", self)
        if not self.prompts or any(not p.strip() for p in self.prompts):
            raise ConfigError("describe.prompts: give at least one non-empty prompt")
        if self.samples_per_image < 1:
            raise ConfigError("describe.samples_per_image: must be >= 1")
        if self.samples_per_image > 1 and self.temperature == 0:
            raise ConfigError(
                "describe.samples_per_image: greedy decoding (temperature 0) makes every sample identical"
            )


@dataclass
class VariantsConfig:
    """Stage 3: the strong model rewrites every sentence into k variants."""

    k: int = _help("Variants sampled per sentence (the original is always kept as a candidate too).", 4)
    prompt: str = _help(
        "Rewrite instruction. {context} is the description so far, {sentence} the sentence to rewrite.",
        "Here is the beginning of a description of this image:\n{context}\n\nRewrite the next sentence of the "
        "description so that it describes the image accurately. You may keep it, correct details or change them."
        "\nSentence: {sentence}\n\nAnswer with the rewritten sentence only.",
    )
    max_new_tokens: int = _help("Token limit of one variant.", 96)
    temperature: float = _help("Sampling temperature; 0 means greedy (only with k: 1).", 1.0)
    top_p: float = _help("Nucleus sampling mass.", 0.95)
    top_k: int = _help("Keep only the k most likely tokens (0: off).", 0)
    repetition_penalty: float = _help("Penalty on repeated tokens (1.0: off).", 1.0)
    batch_size: int = _help("Requests per generate call; halves on CUDA out-of-memory.", 32)
    prefill_batch_size: int = _help(
        "Requests per prefill forward (image + prompt) inside one generate call; 0: the whole batch. Decoding is "
        "memory-bound and gains from batches far larger than a prefill needs (GPU: batch_size 1024, 256 here).",
        0,
    )

    def __post_init__(self) -> None:
        _check_generation("variants", self)
        if self.k < 1:
            raise ConfigError("variants.k: must be >= 1")
        if self.k > 1 and self.temperature == 0:
            raise ConfigError("variants.k: greedy decoding (temperature 0) makes all k variants identical")
        if "{sentence}" not in self.prompt:
            raise ConfigError("variants.prompt: must contain {sentence}")


@dataclass
class ValidateConfig:
    """Stage 4: the weak model scores every candidate against its image."""

    methods: list[str] = _help(
        "Scoring methods: yesno, rating, pairwise (combined by weighted mean).", factory=lambda: ["yesno"]
    )
    weights: list[float] = _help("One weight per method (default: equal).", factory=list)
    yesno_prompt: str = _help(
        "Question for `yesno`; {sentence} is the candidate.",
        "Is the following sentence an accurate description of this image? Sentence: {sentence}\nAnswer yes or no.",
    )
    rating_prompt: str = _help(
        "Question for `rating`; {sentence} is the candidate.",
        "Rate how accurately the following sentence describes this image, from 0 (completely wrong) to 100 "
        "(completely accurate). Sentence: {sentence}\nAnswer with the number only.",
    )
    pairwise_prompt: str = _help(
        "Question for `pairwise`; {a} and {b} are the two candidates.",
        "Which sentence describes this image more accurately?\nA: {a}\nB: {b}\nAnswer A or B.",
    )
    batch_size: int = _help("Prompts per forward pass; halves on CUDA out-of-memory.", 32)
    shared_prefix: bool = _help(
        "Run each image and the shared start of the instruction once, then score all its candidates' suffixes "
        "on that cache (same scores, much faster). false: one full forward per prompt.",
        True,
    )

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in VALIDATION_METHODS]
        if unknown or not self.methods:
            raise ConfigError(f"validate.methods: {unknown or 'empty'} — choose from {', '.join(VALIDATION_METHODS)}")
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


VALIDATION_METHODS = ("yesno", "rating", "pairwise")


@dataclass
class PairsConfig:
    """Stage 5: preference pairs from the scored candidates."""

    mode: str = _help(
        "'context': full descriptions differing in one sentence; 'sentence': single sentences.", "context"
    )
    min_gap: float = _help("Minimum score gap between chosen and rejected.", 0.1)
    min_chosen_score: float = _help(
        "The chosen sentence must score at least this (0..1; 0: off). Pairs whose best candidate the validator "
        "still judges wrong teach one error over another; e.g. 0.5 keeps pairs whose chosen side `yesno` accepts.",
        0.0,
    )
    max_pairs_per_image: int = _help("Keep at most this many pairs per image (largest gaps first); 0: no limit.", 8)
    min_words: int = _help("Candidates with fewer words are fragments and never used.", 3)
    max_length_ratio: float = _help(
        "Length balance: drop pairs whose longer side has more than this many times the words of the shorter "
        "(0: off).",
        0.0,
    )
    val_fraction: float = _help("Share of images (not pairs) held out for validation.", 0.05)
    exports: list[str] = _help(
        "Export formats written to 05_exports/: trl, llamafactory, unidpo.",
        factory=lambda: ["trl", "llamafactory", "unidpo"],
    )
    dataset_name: str = _help("Dataset name used in exports (LLaMA-Factory's dataset_info.json key).", "capdpo")

    def __post_init__(self) -> None:
        if self.mode not in ("context", "sentence"):
            raise ConfigError(f"pairs.mode: '{self.mode}' is not one of context, sentence")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError("pairs.val_fraction: must be in [0, 1)")
        if self.max_length_ratio and self.max_length_ratio < 1:
            raise ConfigError("pairs.max_length_ratio: must be 0 (off) or >= 1")
        if not 0 <= self.min_chosen_score <= 1:
            raise ConfigError("pairs.min_chosen_score: must be in [0, 1] (scores are 0..1)")
        unknown = [e for e in self.exports if e not in ("trl", "llamafactory", "unidpo")]
        if unknown:
            raise ConfigError(f"pairs.exports: unknown format(s) {unknown}; choose from trl, llamafactory, unidpo")


def _check_generation(section: str, cfg: Any) -> None:
    if cfg.max_new_tokens < 1:
        raise ConfigError(f"{section}.max_new_tokens: must be >= 1")
    if cfg.temperature < 0:
        raise ConfigError(f"{section}.temperature: must be >= 0")
    if not 0 < cfg.top_p <= 1:
        raise ConfigError(f"{section}.top_p: must be in (0, 1]")
    if cfg.top_k < 0:
        raise ConfigError(f"{section}.top_k: must be >= 0")
    if cfg.repetition_penalty <= 0:
        raise ConfigError(f"{section}.repetition_penalty: must be > 0")
    if cfg.batch_size < 1:
        raise ConfigError(f"{section}.batch_size: must be >= 1")
    if cfg.prefill_batch_size < 0:
        raise ConfigError(f"{section}.prefill_batch_size: must be >= 0 (0: the whole batch)")


# Section name in the YAML -> dataclass. Other modules (training, evaluation) register theirs here.
SECTIONS: dict[str, type] = {
    "images": ImagesConfig,
    "describe": DescribeConfig,
    "variants": VariantsConfig,
    "validate": ValidateConfig,
    "pairs": PairsConfig,
}


def register_section(name: str, cls: type) -> None:
    """Make `name:` a known YAML section holding `cls`'s fields."""
    SECTIONS[name] = cls


@dataclass
class LoadedConfig:
    """What a stage gets: the shared keys, its own section, and where they came from."""

    common: CommonConfig
    section: Any
    path: str | None
    argv: list[str]

    def resolved(self) -> dict[str, Any]:
        """The values in effect, for writing beside the outputs."""
        name = next((k for k, v in SECTIONS.items() if isinstance(self.section, v)), "section")
        return {**asdict(self.common), name: asdict(self.section), "_config_file": self.path, "_argv": self.argv}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:  # argparse would print usage and exit; we want one line
        raise ConfigError(f"command line: {message}")


def _hf_parser(classes: list[type]) -> Any:
    from transformers import HfArgumentParser

    class Parser(HfArgumentParser):
        def error(self, message: str) -> typing.NoReturn:
            raise ConfigError(f"command line: {message}")

    return Parser(classes, allow_abbrev=False)  # a typo must not silently match a longer flag


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a run YAML as a mapping, with one-line errors for a missing or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}: malformed YAML ({problem})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, not {type(data).__name__}")
    return data


def _type_ok(tp: Any, value: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(arg, value) for arg in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        return isinstance(value, list) and all(_type_ok(item, v) for v in value)
    if tp is Any:
        return True
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    for key, value in values.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" — did you mean '{close[0]}'?" if close else f" (known: {', '.join(names)})"
            raise ConfigError(f"{where}: unknown key '{key}'{hint}")
        if not _type_ok(hints[key], value):
            raise ConfigError(f"{where}: '{key}' should be {_type_name(hints[key])}, got {value!r}")
    try:
        return cls(**{k: (float(v) if hints[k] is float else v) for k, v in values.items()})
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def validate_config_file(path: str | Path) -> dict[str, Any]:
    """Check every key and section of a run YAML; return the built dataclasses by section name."""
    data = read_yaml(path)
    common_names = {f.name for f in fields(CommonConfig)}
    common_values = {k: v for k, v in data.items() if k in common_names}
    built: dict[str, Any] = {"common": _build(CommonConfig, common_values, str(path))}
    for key, value in data.items():
        if key in common_names:
            continue
        if key not in SECTIONS:
            close = difflib.get_close_matches(key, [*common_names, *SECTIONS], n=1)
            hint = f" — did you mean '{close[0]}'?" if close else f" (sections: {', '.join(SECTIONS)})"
            raise ConfigError(f"{path}: unknown key '{key}'{hint}")
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: section '{key}' must be a mapping of keys")
        built[key] = _build(SECTIONS[key], value, f"{path}: {key}")
    return built


def load_config(section: str, argv: list[str] | None = None, description: str = "") -> LoadedConfig:
    """Parse `--config FILE` plus flag overrides into the shared keys and one section.

    Args:
        section: the YAML section this command reads (`describe`, `validate`, ...).
        argv: command-line arguments (default: `sys.argv[1:]`).
        description: shown by `--help`.
    """
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    pre = _Parser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", default=None)
    known, rest = pre.parse_known_args(argv)
    cls = SECTIONS[section]
    defaults: dict[str, Any] = {}
    if known.config:
        validate_config_file(known.config)
        data = read_yaml(known.config)
        defaults.update({k: v for k, v in data.items() if k in {f.name for f in fields(CommonConfig)}})
        defaults.update(data.get(section) or {})
    parser = _hf_parser([CommonConfig, cls])
    parser.description = (
        description + "\n\n" if description else ""
    ) + "--config FILE: the run YAML; flags override it."
    parser.set_defaults(**defaults)
    common, sec, remaining = parser.parse_args_into_dataclasses(args=rest, return_remaining_strings=True)
    if remaining:
        flags = [r for r in remaining if r.startswith("--")] or remaining
        known_flags = [f"--{f.name}" for c in (CommonConfig, cls) for f in fields(c)]
        close = difflib.get_close_matches(flags[0], known_flags, n=1)
        hint = f" — did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"command line: unknown flag '{flags[0]}' for section '{section}'{hint}")
    return LoadedConfig(common=common, section=sec, path=known.config, argv=argv)


def _register_builtin_sections() -> None:
    from capdpo.train_config import TrainConfig

    register_section("train", TrainConfig)
    from capdpo.sft_config import SftConfig

    register_section("sft", SftConfig)
    # Evaluation sections (answers, mmhal, llava_bench, report) register themselves on import; importing them
    # here lets a run YAML carry them without failing the other stages' validation. Their imports are light.
    import capdpo.evaluation.answers  # noqa: F401
    import capdpo.evaluation.llava_bench  # noqa: F401
    import capdpo.evaluation.mmhal  # noqa: F401
    import capdpo.evaluation.report  # noqa: F401


_register_builtin_sections()
