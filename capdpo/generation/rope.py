"""Qwen-VL's 3-D rope positions for a prefill, computed with a few batched tensor ops.

Qwen2-VL, Qwen2.5-VL and Qwen3-VL give a text token one position on all three rope axes (temporal, height, width)
and an image token its (t, h, w) cell of the merged patch grid, offset by the text position where the image starts;
after an image, text continues at that offset + max(h, w). The models' own `get_rope_index` builds this row by row
and group by group in Python, with a host synchronisation per group: at batch 256 the GPU waits ~0.7 ms per image
for it. `mrope_positions` computes the same tensors on the device with one host check for the whole batch.
"""

from __future__ import annotations

from typing import Any

# models whose get_rope_index treats still images exactly as below (checked against transformers 5.23)
_SUPPORTED = {"Qwen2VLModel", "Qwen2_5_VLModel", "Qwen3VLModel", "Qwen3VLMoeModel"}
# the processor outputs of a text-and-still-image batch (anything else, e.g. videos, is left to the model)
IMAGE_BATCH_KEYS = frozenset({"input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"})


def mrope_positions(model: Any, inputs: dict[str, Any]) -> tuple[Any, Any] | None:
    """Position ids [3, B, L] and rope deltas [B, 1] of a prefill from an empty cache, equal to those of
    `model.model.get_rope_index` (`model`: a Qwen-VL `...ForConditionalGeneration`).

    Handles left (or any) padding, several images per row and rows without images. Returns None where the model
    should compute them itself: other models, videos, inputs without images or without `mm_token_type_ids`, or
    image tokens that do not match `image_grid_thw` (the model then raises its own error).
    """
    import torch

    if type(getattr(model, "model", None)).__name__ not in _SUPPORTED or set(inputs) - IMAGE_BATCH_KEYS:
        return None
    if any(inputs.get(k) is None for k in ("input_ids", "mm_token_type_ids", "image_grid_thw")):
        return None
    merge = model.config.vision_config.spatial_merge_size
    input_ids, types, grid = inputs["input_ids"], inputs["mm_token_type_ids"], inputs["image_grid_thw"]
    device = input_ids.device
    batch, length = input_ids.shape
    mask = inputs.get("attention_mask")
    real = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.bool()
    types, grid = types.to(device), grid.to(device)
    image = (types == 1) & real
    text = (types == 0) & real
    order = torch.arange(length, device=device).expand(batch, length)
    none = torch.full((batch, 1), -1, dtype=torch.long, device=device)

    # an image is a run of image tokens among the real tokens (padding between them does not split a run)
    last_real = torch.where(real, order, -1).cummax(-1).values
    previous_real = torch.cat([none, last_real[:, :-1]], dim=1)
    previous_is_image = image.gather(1, previous_real.clamp(min=0)) & (previous_real >= 0)
    starts = image & ~previous_is_image
    run_start = torch.where(starts, order, -1).cummax(-1).values.clamp(min=0)  # for image tokens: their run's start
    # images are numbered row by row, in order, like the model's iterator over image_grid_thw
    image_of_start = starts.flatten().long().cumsum(0).view(batch, length) - 1
    which = image_of_start.gather(1, run_start).clamp(0, max(grid.shape[0] - 1, 0))
    cell = grid[which] if grid.shape[0] else torch.ones(batch, length, 3, dtype=torch.long, device=device)
    grid_h, grid_w = cell[..., 1] // merge, cell[..., 2] // merge

    # text position before each token: text tokens advance it by 1, an image (at its first token) by max(h, w)
    step = text.long() + torch.where(starts, torch.maximum(grid_h, grid_w), 0)
    before = step.cumsum(-1) - step
    rank = real.long().cumsum(-1) - 1  # index among the row's real tokens
    offset = rank - rank.gather(1, run_start)  # index within the image
    start = before.gather(1, run_start)
    per_image = grid_h * grid_w
    vision = torch.stack([offset // per_image, offset // grid_w % grid_h, offset % grid_w]) + start
    position_ids = torch.where(image, vision, before.expand(3, batch, length)).masked_fill(~real, 0)
    deltas = position_ids.amax(dim=(0, 2)) + 1 - real.sum(-1)

    # one host check that the token runs match the grids exactly as the model's iterator would take them
    sizes = grid[:, 0] * (grid[:, 1] // merge) * (grid[:, 2] // merge)
    bins = torch.where(image, image_of_start.gather(1, run_start), grid.shape[0]).flatten()
    counts = torch.zeros(grid.shape[0] + 1, dtype=torch.long, device=device).scatter_add_(
        0, bins, torch.ones_like(bins)
    )
    consistent = (
        (starts.sum() == grid.shape[0])
        & (counts[:-1] == sizes).all()
        & (real.sum(-1) > 0).all()
        & ~(real & (types != 0) & (types != 1)).any()
    )
    if not bool(consistent):
        return None
    return position_ids.to(input_ids.dtype), deltas.view(batch, 1)
