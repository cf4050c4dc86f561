"""LoRA targets: the language model's linear layers, never the vision tower unless asked.

Qwen2.5-VL's vision blocks reuse the names `gate_proj`, `up_proj`, `down_proj`: a bare list of names given to
PEFT would silently put LoRA on the vision tower too. Targets are therefore given as a regex of full module paths
inside the language model.
"""

from __future__ import annotations

import re
from typing import Any

from capdpo.errors import ConfigError


def zero3_partitioned(parameter: Any) -> bool:
    """A parameter that ZeRO-3 partitions: its data is a placeholder that only a call of its module gathers, so no
    code may read it, replace its module's forward or change its shape outside such a call."""
    return hasattr(parameter, "ds_id")


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


def fuse_lora_updates(model: Any) -> int:
    """Add each plain LoRA linear's update to its base output inside one GEMM; returns how many layers changed.

    PEFT computes `base(x) + B(A(x)) * scaling` as a GEMM, an elementwise scale and an elementwise add, each a full
    pass over the layer's output ([tokens, out], 18944 wide for the MLP) forward and again backward. `addmm` folds
    the scale and the add into the B GEMM's epilogue: the same function in one pass.

    Under bf16 autocast (a run without DeepSpeed: PEFT keeps the adapter in float32, the optimizer's precision) PEFT
    also copies each layer's input to float32 for the adapter, which autocast copies back to bf16 for the GEMM; the
    fused path skips both copies and lets autocast cast the small adapter weights, as it does for PEFT. Anything
    else (adapters disabled or merged, several active adapters, DoRA and other variants, a LoRA bias, mixed dtypes
    without autocast, ZeRO-3 partitioned weights, extra arguments) runs PEFT's own forward.
    """
    import types

    from peft.tuners.lora.layer import Linear

    count = 0
    for module in model.modules():
        if type(module) is Linear and "_capdpo_peft_forward" not in vars(module):
            module._capdpo_peft_forward = module.forward
            module.forward = types.MethodType(_fused_lora_forward, module)
            count += 1
    return count


def _one_compute_dtype(x: Any, *weights: Any) -> bool:
    """Whether the input and the weights meet in one dtype: all equal, or under autocast the input in the autocast
    dtype and each weight in it or in float32 (autocast casts those for every GEMM of the layer, PEFT's too)."""
    import torch

    kind = x.device.type
    if not torch.is_autocast_enabled(kind):
        return all(w.dtype == x.dtype for w in weights)
    compute = torch.get_autocast_dtype(kind)
    return x.dtype == compute and all(w.dtype in (compute, torch.float32) for w in weights)


def _fused_lora_forward(self: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
    import torch

    plain = self._capdpo_peft_forward
    if args or kwargs or self.disable_adapters or self.merged:
        return plain(x, *args, **kwargs)
    active = [name for name in self.active_adapters if name in self.lora_A]
    if len(active) != 1 or active[0] in self.lora_variant:
        return plain(x)
    name = active[0]
    base, lora_a, lora_b = self.base_layer, self.lora_A[name], self.lora_B[name]
    weight = lora_b.weight
    if (
        lora_b.bias is not None
        or zero3_partitioned(weight)
        or not _one_compute_dtype(x, getattr(base, "weight", weight), lora_a.weight, weight)
    ):
        return plain(x)
    result = base(x)
    update = lora_a(self.lora_dropout[name](x))
    out = torch.addmm(
        result.reshape(-1, result.shape[-1]),
        update.reshape(-1, update.shape[-1]),
        weight.t(),
        alpha=self.scaling[name],
    )
    return out.view(result.shape)
