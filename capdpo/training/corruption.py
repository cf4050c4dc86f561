"""Corrupted images for the `mdpo` loss type: a pair's `rejected_image`, or its image cropped, masked or noised.

The corruption of a pair is seeded by the recipe's seed and the pair's id, so every epoch and the reference pass see
the same image, and it keeps the true image's size, so the prompt's image tokens stay the same.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from capdpo.jsonl import stable_id

CORRUPT_PREFIX = "corrupt_"  # collator keys: capdpo_corrupt_<image key> holds the corrupted images' tensors
CORRUPTIONS = ("crop", "mask", "noise")


@dataclass(frozen=True)
class Corruption:
    """How the corrupted image of a pair without `rejected_image` is made."""

    kind: str = "crop"
    crop_keep: float = 0.2  # crop: the kept share of the area is uniform in [crop_keep / 10, crop_keep]
    mask_share: float = 0.8  # mask: share of the 8 x 8 grid cells filled with the image's mean colour
    noise_std: float = 0.5  # noise: Gaussian noise on pixels scaled to [0, 1]
    seed: int = 0

    def rng(self, pair_id: str) -> random.Random:
        return random.Random(stable_id("mdpo-corruption", self.seed, pair_id))

    def apply(self, image: Any, pair_id: str) -> Any:
        """The corrupted copy of a PIL image (same size and mode), the same for the same pair every time."""
        import numpy as np

        rng = self.rng(pair_id)
        width, height = image.size
        if self.kind == "crop":
            share = rng.uniform(self.crop_keep / 10, self.crop_keep)
            aspect = rng.uniform(3 / 4, 4 / 3)
            w = max(1, min(width, round((share * width * height * aspect) ** 0.5)))
            h = max(1, min(height, round(share * width * height / w)))
            left, top = rng.randint(0, width - w), rng.randint(0, height - h)
            return image.crop((left, top, left + w, top + h)).resize((width, height))
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        if self.kind == "mask":
            cells = [(r, c) for r in range(8) for c in range(8)]
            mean = pixels.reshape(-1, 3).mean(axis=0)
            for r, c in rng.sample(cells, round(self.mask_share * len(cells))):
                pixels[r * height // 8 : (r + 1) * height // 8, c * width // 8 : (c + 1) * width // 8] = mean
        else:
            noise = np.random.default_rng(rng.getrandbits(64)).normal(0.0, self.noise_std, pixels.shape)
            pixels = np.clip(pixels + noise, 0.0, 1.0)
        from PIL import Image

        return Image.fromarray((pixels * 255).round().astype(np.uint8))


def corrupted_image(pair: Any, image: Any, corruption: Corruption) -> Any:
    """The pair's corrupted image at the true image's size: its `rejected_image`, else `corruption` applied."""
    if getattr(pair, "rejected_image", ""):
        from capdpo.images import load_image

        return load_image(pair.rejected_image).resize(image.size)
    return corruption.apply(image, pair.id)
