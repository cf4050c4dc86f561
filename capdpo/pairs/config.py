"""Config section of stage 5 (`pairs`): how preference pairs are built and exported."""

from __future__ import annotations

from dataclasses import dataclass

from capdpo.config import option, require, require_choice, require_known
from capdpo.errors import ConfigError
from capdpo.formats.registry import EXPORTERS
from capdpo.pairs.modes import MODES
from capdpo.paths import is_plain_name


@dataclass
class PairsConfig:
    """Stage 5: preference pairs from the scored candidates."""

    mode: str = option(
        "How a scored sentence becomes a pair: " + "; ".join(f"'{k}': {m.summary}" for k, m in MODES.items()) + ".",
        "context",
    )
    min_gap: float = option("Minimum score gap between chosen and rejected.", 0.1)
    min_chosen_score: float = option(
        "The chosen sentence must score at least this (0..1; 0: off). Pairs whose best candidate the validator "
        "still judges wrong teach one error over another; e.g. 0.5 keeps pairs whose chosen side `yesno` accepts.",
        0.0,
    )
    max_pairs_per_image: int = option("Keep at most this many pairs per image (largest gaps first); 0: no limit.", 8)
    min_words: int = option("Candidates with fewer words are fragments and never used.", 3)
    max_length_ratio: float = option(
        "Length balance: drop pairs whose longer side has more than this many times the words of the shorter "
        "(0: off).",
        0.0,
    )
    val_fraction: float = option("Share of images (not pairs) held out for validation.", 0.05)
    exports: list[str] = option(
        f"Export formats written to 05_exports/: {', '.join(EXPORTERS)}.",
        factory=lambda: ["trl", "llamafactory", "unidpo"],
    )
    dataset_name: str = option(
        "Dataset name used in exports (LLaMA-Factory's dataset_info.json key; letters, digits, . _ -).", "capdpo"
    )

    def __post_init__(self) -> None:
        require_choice("pairs.mode", self.mode, MODES)
        if not 0 <= self.val_fraction < 1:
            raise ConfigError("pairs.val_fraction: must be in [0, 1)")
        if self.max_length_ratio and self.max_length_ratio < 1:
            raise ConfigError("pairs.max_length_ratio: must be 0 (off) or >= 1")
        if not 0 <= self.min_chosen_score <= 1:
            raise ConfigError("pairs.min_chosen_score: must be in [0, 1] (scores are 0..1)")
        require_known("pairs.exports", self.exports, EXPORTERS, "format(s)")
        require(
            is_plain_name(self.dataset_name),
            "pairs.dataset_name",
            f"'{self.dataset_name}' is not a plain name (letters, digits, . _ -)",
        )
