"""Config section of stage 1 (`images`): which images a run uses."""

from __future__ import annotations

from dataclasses import dataclass

from capdpo.config import option
from capdpo.errors import ConfigError


@dataclass
class ImagesConfig:
    """Stage 1: which images the run uses."""

    source: str = option(
        "'folder' (recursive), 'coco' (images dir + annotation json) or 'hf' (dataset dir / parquet).", "folder"
    )
    path: str = option(
        "Image folder, COCO images folder, HF dataset folder (save_to_disk) or parquet file/folder.", ""
    )
    coco_instances: str = option("COCO instances json (keeps object categories per image for CHAIR).", "")
    coco_captions: str = option("COCO captions json (keeps reference captions per image).", "")
    hf_image_column: str = option("Image column of an HF dataset / parquet source.", "image")
    hf_id_column: str = option("Optional id column of an HF dataset / parquet source, kept as source_id.", "")
    n: int = option("Sample this many images (seeded); 0 keeps all.", 0)
    exclude: list[str] = option(
        "Files listing image ids, sha256s, paths or COCO ids never to use (one per line, or a JSON list / "
        "AMBER-style query file): evaluation images must never be trained on.",
        factory=list,
    )
    extensions: list[str] = option(
        "File endings taken from a folder.", factory=lambda: [".jpg", ".jpeg", ".png", ".webp"]
    )
    min_side: int = option("Images whose shorter side is below this many pixels are skipped.", 28)

    def __post_init__(self) -> None:
        if self.source not in ("folder", "coco", "hf"):
            raise ConfigError(f"images.source: '{self.source}' is not one of folder, coco, hf")
        if self.n < 0:
            raise ConfigError("images.n: must be >= 0")
