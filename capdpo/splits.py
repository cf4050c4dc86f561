"""The image-level train/validation split: images, never single examples, go to validation.

Stage 5's pairs, imported pairs and SFT records all use `split_of`, so one image is on the same side everywhere
for a given seed.
"""

from __future__ import annotations

from capdpo.jsonl import stable_id


def split_of(image_id: str, seed: int, val_fraction: float) -> str:
    """`val` for a stable, seeded share `val_fraction` of images, `train` for the rest."""
    position = int(stable_id("split", seed, image_id), 16) / 16**20  # uniform in [0, 1)
    return "val" if position < val_fraction else "train"
