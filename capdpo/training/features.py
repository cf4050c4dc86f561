"""The frozen vision tower's image features computed once and cached beside the run.

With the vision tower frozen (the default), an image's features never change during training, yet every step would
encode its batch's images again: for Qwen2.5-VL-7B about 11 TFLOP per step of 8 448-px images, and a tower of 32
small blocks that keeps the GPU waiting on the host. A pass before training (`CapdpoDPOTrainer.precompute_features`)
encodes each training image once and writes its features to `06_train/image_features/<key>/<image>.safetensors`;
the collator then passes them with an empty `pixel_values`, and the model's `get_image_features`
(`install_cached_image_features`) returns them instead of running the tower.

`<key>` hashes the same fingerprint as the reference cache (model weights, dtype, attention kernel, image pixel
limits, ...): another model or setting gets another folder. Each file is written atomically, so a kill mid-pass
keeps every finished image and the rerun encodes the rest. Families (`CACHED_FAMILIES`): Qwen2.5-VL, Qwen3-VL (its
file also holds the tower's deepstack features, which its language model adds to the image tokens of its first
layers) and LLaVA (the features after the projector). A trainable vision tower or projector and mDPO's corrupted
images (real pixels) encode as usual.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from capdpo.errors import InputError
from capdpo.jsonl import stable_id, write_bytes, write_json

FEATURE_FORMAT = 1
CACHED_FAMILIES = frozenset({"qwen2_5_vl", "qwen3_vl", "llava"})
_FEATURES = "_capdpo_cached_image_features"
_SPARE = 1 << 30  # bytes a feature pass leaves free on its disk


def image_key(image_id: str, image: str) -> str:
    """What names an image's features: its id and its file (an id reused for another file gets other features)."""
    return stable_id("image", image_id, image)


def encode_first_images(backbone: Any, batch: dict[str, Any], count: int) -> list[Any]:
    """The features of the first `count` images of a collated batch, one tensor per image (`per_image_features`),
    computed by the backbone's own `get_image_features`."""
    from capdpo.training.packing import first_images

    images = first_images(batch, count, images_once=False)
    if "image_grid_thw" in images:  # Qwen-VL
        return per_image_features(backbone.get_image_features(images["pixel_values"], images["image_grid_thw"]))
    config = backbone.config  # LLaVA: the layer and CLS choice its forward would pass
    return per_image_features(
        backbone.get_image_features(
            pixel_values=images["pixel_values"],
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
        )
    )


def batch_features(loaded: list[Any], by_grid: bool) -> Any:
    """The loaded features of a batch's images as the batch carries them: rows end to end where the grids say how
    many belong to each image (Qwen-VL), one [images, tokens, hidden] stack otherwise (LLaVA: the same count each)."""
    import torch

    return torch.cat(loaded) if by_grid else torch.stack(loaded)


def per_image_features(encoded: Any) -> list[Any]:
    """`get_image_features`' output as one tensor per image, [tokens, (1 + deepstack layers) * hidden]: the merged
    features, then (Qwen3-VL) each deepstack layer's, side by side (`install_cached_image_features` splits them)."""
    import torch

    layers = [encoded.pooler_output, *(getattr(encoded, "deepstack_features", None) or [])]
    return [torch.cat(parts, dim=-1) for parts in zip(*layers, strict=True)]


class FeatureCache:
    """Image key (`image_key`) -> the vision tower's features of that image (`per_image_features`), one file each."""

    def __init__(self, root: Path, fingerprint: dict[str, Any]) -> None:
        self.folder = Path(root) / stable_id("image-features", FEATURE_FORMAT, fingerprint)
        self.fingerprint = fingerprint

    def prepare(self) -> None:
        """Create the folder and describe what its features depend on (main process only)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        write_json(self.folder / "fingerprint.json", {"format": FEATURE_FORMAT, **self.fingerprint})

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    def missing(self, keys: list[str]) -> list[str]:
        return [k for k in keys if not self.path(k).is_file()]

    def save(self, key: str, features: Any) -> int:
        """Write one image's features; returns the bytes written."""
        from safetensors.torch import save

        data = save({"features": features.detach().contiguous().cpu()})
        write_bytes(self.path(key), data)
        return len(data)

    def check_room(self, needed: float) -> None:
        """A one-line error unless the disk holding the cache has `needed` bytes free and 1 GiB to spare (training
        still has checkpoints to write); the features already written stay."""
        free = shutil.disk_usage(self.folder).free
        if needed > 0 and free < needed + _SPARE:
            raise InputError(
                f"{self.folder}: the image features need about {needed / 2**30:.1f} GiB more and the disk has "
                f"{free / 2**30:.1f} GiB free (keeping 1 GiB for the rest of the run); free some space and rerun (the "
                "features written so far are kept), or set train.cache_image_features: false to encode the images "
                "in every step"
            )

    def size(self) -> tuple[int, int]:
        """(images, bytes) in the cache's folder."""
        files = list(self.folder.glob("*.safetensors"))
        return len(files), sum(f.stat().st_size for f in files)

    def load(self, key: str, image: str) -> Any:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = self.path(key)
        try:
            return load_file(path)["features"]
        except (OSError, SafetensorError, KeyError) as err:
            raise InputError(
                f"{path}: the cached features of {image} cannot be read ({err}); delete {self.folder} to encode "
                "the images again"
            ) from None


def install_cached_image_features(model: Any, backbone: Any) -> bool:
    """Let the backbone's `get_image_features` return cached features (False where the family has no cache).

    Inside `cached_features(backbone, features)`, a call with empty `pixel_values` returns the features of the first
    images of `features` (`batch_features`: all of the batch's images in order), as many as its `image_grid_thw`
    names, or (LLaVA) as many as its `pixel_values` has rows: the callers that encode each pair's image once, or one
    row per pair, pass the first images' grids or rows. Any other call (real pixels: the reference pass, mDPO's
    corrupted images) runs the vision tower."""
    if getattr(model.config, "model_type", None) not in CACHED_FAMILIES or not hasattr(backbone, "get_image_features"):
        return False
    if "_capdpo_cached_original" in vars(backbone):
        return True
    original = backbone.get_image_features
    merge = getattr(model.config.vision_config, "spatial_merge_size", 1)
    deepstack = len(getattr(model.config.vision_config, "deepstack_visual_indexes", None) or [])

    def get_image_features(pixel_values: Any, image_grid_thw: Any = None, *args: Any, **kwargs: Any) -> Any:
        cached = getattr(backbone, _FEATURES, None)
        if cached is None or pixel_values.numel() > 0:
            if image_grid_thw is None:  # LLaVA's forward passes everything by name
                return original(pixel_values, *args, **kwargs)
            return original(pixel_values, image_grid_thw, *args, **kwargs)
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        if image_grid_thw is None:  # LLaVA: as many images as the empty pixels have rows
            return BaseModelOutputWithPooling(pooler_output=list(cached[: pixel_values.shape[0]]))
        sizes = (image_grid_thw.prod(-1) // merge**2).tolist()
        merged, *layers = (tuple(part.split(sizes)) for part in cached[: sum(sizes)].chunk(1 + deepstack, dim=-1))
        if not deepstack:
            return BaseModelOutputWithPooling(pooler_output=merged)
        from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

        return BaseModelOutputWithDeepstackFeatures(pooler_output=merged, deepstack_features=layers)

    backbone._capdpo_cached_original = original
    backbone.get_image_features = get_image_features
    return True


@contextlib.contextmanager
def cached_features(backbone: Any, features: Any) -> Iterator[None]:
    """Within the block, the backbone's empty-pixel image calls read `features` (see above)."""
    previous = getattr(backbone, _FEATURES, None)
    setattr(backbone, _FEATURES, features)
    try:
        yield
    finally:
        setattr(backbone, _FEATURES, previous)
