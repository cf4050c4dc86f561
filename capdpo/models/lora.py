"""LoRA targets: the language model's linear layers, never the vision tower unless asked.

Qwen2.5-VL's vision blocks reuse the names `gate_proj`, `up_proj`, `down_proj`: a bare list of names given to
PEFT would silently put LoRA on the vision tower too. Targets are therefore given as a regex of full module paths
inside the language model.
"""

from __future__ import annotations

import re
from typing import Any

from capdpo.errors import ConfigError

# Module path parts that mark the vision tower and the projector, in every supported family.
VISION_MARKERS = ("visual", "vision_tower", "vision_model", "multi_modal_projector", "merger")
# the language model's linear layers (in every supported family)
LANGUAGE_LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_target_regex(model: Any, names: tuple[str, ...] = LANGUAGE_LINEAR_NAMES, include_vision: bool = False) -> str:
    """A PEFT `target_modules` regex that matches `names` in the language model only (unless `include_vision`).

    A bare list of names would also match the vision tower's MLP layers of Qwen2.5-VL.
    """
    import torch

    matched = []
    for module_name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module_name.rsplit(".", 1)[-1] not in names:
            continue
        if not include_vision and is_vision_parameter(module_name):
            continue
        matched.append(module_name)
    if not matched:
        raise ConfigError(f"lora targets: no linear layer named {names} found in {type(model).__name__}")
    return "^(" + "|".join(re.escape(n) for n in matched) + ")$"



def is_vision_parameter(name: str) -> bool:
    """Whether a parameter (or module) path belongs to the vision tower or the projector."""
    return any(marker in name.split(".") for marker in VISION_MARKERS)
