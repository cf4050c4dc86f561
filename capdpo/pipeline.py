"""The pipeline's shape: the six stages, in order, with every name each of them goes by.

This is the only place that knows the stage order. The numbered scripts, the stage bookkeeping
(`capdpo.run.Stage`: which file a stage reads and writes), the data report and the synthetic experiment all
look stages up here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class StageInfo:
    """One stage: its number, its names, and where its code and output live."""

    number: int
    name: str  # the script's name without number: prepare_images, ..., train_dpo
    section: str  # its YAML section: images, describe, variants, validate, pairs, train
    output: str  # its output in the run directory: 01_images.jsonl, ..., 06_train (a folder)
    summary: str  # what it does, in a few words

    @property
    def script(self) -> str:
        """The numbered script at the top of the checkout."""
        return f"{self.number}_{self.name}.py"

    @property
    def module(self) -> str:
        """The module holding the stage's `run(cfg)` and `main(argv)`."""
        return f"capdpo.stages.{self.name}"

    @property
    def stem(self) -> str:
        """The output's name without `.jsonl`: the prefix of the files beside it (`.meta.json`, `.done`, ...)."""
        return self.output.removesuffix(".jsonl")


STAGES: tuple[StageInfo, ...] = (
    StageInfo(1, "prepare_images", "images", "01_images.jsonl", "collect, dedupe and sample the images"),
    StageInfo(2, "generate_descriptions", "describe", "02_descriptions.jsonl", "the strong model describes them"),
    StageInfo(3, "regenerate_sentences", "variants", "03_variants.jsonl", "the strong model rewrites each sentence"),
    StageInfo(4, "validate_sentences", "validate", "04_scores.jsonl", "the weak model scores every candidate"),
    StageInfo(5, "build_dpo_dataset", "pairs", "05_pairs.jsonl", "preference pairs, split by image, exported"),
    StageInfo(6, "train_dpo", "train", "06_train", "DPO training of the strong model"),
)
_BY_SECTION = {stage.section: stage for stage in STAGES}


def stage(section: str) -> StageInfo:
    """The stage whose YAML section is `section` (`images`, `describe`, ...)."""
    try:
        return _BY_SECTION[section]
    except KeyError:
        raise KeyError(f"no stage has section '{section}'; stages: {', '.join(_BY_SECTION)}") from None


def previous(section: str) -> StageInfo | None:
    """The stage before `section`'s, or None for the first."""
    number = stage(section).number
    return STAGES[number - 2] if number > 1 else None


def run_stage(section: str, argv: list[str]) -> Any:
    """Run one stage in this process as its numbered script would (`argv`: e.g. ["--config", path]); return what
    its `run` returns. Orchestrators (the synthetic experiment) use this instead of importing the stages."""
    from capdpo.sections import load_config

    info = stage(section)
    module = importlib.import_module(info.module)
    return module.run(load_config(section, argv))
