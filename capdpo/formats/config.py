"""Config section of the import command (`interop:`): other people's preference data as capdpo pairs."""

from __future__ import annotations

from dataclasses import dataclass

from capdpo.config import option, require, require_choice, require_known
from capdpo.formats.registry import EXPORTERS, IMPORTERS
from capdpo.paths import is_plain_name

SPLITS = ("auto", "train", "val")


@dataclass
class InteropConfig:
    """`python -m capdpo import`: other people's preference data as capdpo pairs."""

    format: str = option(f"Input format: {', '.join(IMPORTERS)}.", "")
    input: str = option("The input: a parquet file or folder of shards (rlaifv), or a .json / .jsonl file.", "")
    dataset_info: str = option("llamafactory: the dataset_info.json naming this file's columns and tags.", "")
    image_root: str = option(
        "Folder image paths are resolved against (default: the input's folder). A path that leads outside it "
        "(`..`, an absolute path, a symlink) is rejected (listed in 05_pairs.errors.jsonl) unless it lies in "
        "one of --allowed_roots.",
        "",
    )
    allowed_roots: list[str] = option("Other folders the input's image paths may point into.", factory=list)
    split: str = option("'auto' (keep capdpo's own split, else split by image), 'train' or 'val'.", "auto")
    val_fraction: float = option("split auto: share of images (not pairs) held out for validation.", 0.05)
    exports: list[str] = option(f"Also write these exports to 05_exports/: {', '.join(EXPORTERS)}.", factory=list)
    dataset_name: str = option(
        "Dataset name used in the exports (LLaMA-Factory's dataset_info.json key; letters, digits, . _ -).", "capdpo"
    )
    max_rows: int = option("Read only the first N rows (0: all); for quick trials.", 0)
    overwrite: bool = option("Replace an existing 05_pairs.jsonl in run_dir.", False)

    def __post_init__(self) -> None:
        require_choice("--format", self.format, IMPORTERS)
        require(bool(self.input), "--input", "name the file (or parquet folder) to import")
        require_choice("--split", self.split, SPLITS)
        require(0 <= self.val_fraction < 1, "--val_fraction", "must be in [0, 1)")
        require(self.max_rows >= 0, "--max_rows", "must be >= 0")
        require_known("--exports", self.exports, EXPORTERS, "format(s)")
        require(
            not self.dataset_info or self.format == "llamafactory",
            "--dataset_info",
            "only the llamafactory format reads it",
        )
        require(
            is_plain_name(self.dataset_name),
            "--dataset_name",
            f"'{self.dataset_name}' is not a plain name (letters, digits, . _ -)",
        )
