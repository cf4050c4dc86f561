"""DeepSpeed ZeRO-1/2's per-step reductions over the gradients in a few multi-tensor kernels instead of several per
gradient.

A LoRA adapter of a 7B model has ~400 small gradient tensors, and before every optimizer step ZeRO walks them one by
one twice, launching tiny kernels while the GPU waits:

* the overflow check (`amax`, `amin`, two `isfinite`, `logical_and`, `logical_not` and an add per tensor): on an
  H100 host the device sat idle ~110 ms of a ~730 ms DPO step during it. `partition_has_overflow` answers the same
  question with one multi-tensor max-norm over all of them (a tensor's max-norm is finite exactly when all its
  elements are; NaN propagates through it), so a step with a non-finite gradient is still skipped as DeepSpeed
  skips it.
* the global 2-norm for gradient clipping (a copy to float64 and a norm per tensor). `partition_grad_norm` takes
  every per-tensor norm in one `torch._foreach_norm` at the same float64 precision, over the same tensors, and
  reduces them as DeepSpeed does.

`fast_zero_reductions` installs both on DeepSpeed's ZeRO-1/2 optimizer; `library_zero_reductions` puts DeepSpeed's
own methods back.
"""

from __future__ import annotations

from typing import Any


def partition_has_overflow(optimizer: Any) -> Any:
    """A bool tensor [1] on the device: whether any gradient of the optimizer's partition holds inf or NaN."""
    import torch
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.utils import has_inf_or_nan

    grads = [g for i in range(len(optimizer.bit16_groups)) for g in optimizer.averaged_gradients[i] if g is not None]
    dense = [g for g in grads if not g.is_sparse and g.numel() > 0]
    flags = [has_inf_or_nan(g).reshape(1) for g in grads if g.is_sparse]  # the library's check for sparse ones
    if dense:
        norms = torch._foreach_norm(dense, float("inf"), dtype=torch.float32)
        flags.append(~torch.isfinite(torch.stack(norms)).all().reshape(1))
    if not flags:
        return torch.zeros([1], dtype=torch.bool, device=get_accelerator().current_device_name())
    return torch.cat(flags).any().reshape(1)


def partition_grad_norm(optimizer: Any, gradients: list[Any], params: list[Any], norm_type: float = 2) -> Any:
    """The 2-norm of the partition's gradients, reduced over the data- and model-parallel groups: DeepSpeed's
    `get_grad_norm_direct` with its per-tensor norms taken in one multi-tensor call. Other norm types, and sparse
    gradients, go to DeepSpeed's own method."""
    import torch
    from deepspeed import comm as dist
    from deepspeed.runtime.constants import PIPE_REPLICATED
    from deepspeed.runtime.utils import is_model_parallel_parameter, mask_nan_or_inf_with_val_inplace
    from deepspeed.runtime.zero.utils import get_norm_dtype

    if float(norm_type) != 2.0 or any(g.is_sparse for g in gradients):
        return _library("get_grad_norm_direct")(optimizer, gradients, params, norm_type)
    # the tensors DeepSpeed counts: no alignment padding, no pipeline replicas, model-parallel ones once
    unpadded = [g for g in gradients if not getattr(g, "_zero_padding", False)]
    counted = [
        g.data.detach()
        for g, p in zip(unpadded, params)
        if not (hasattr(p, PIPE_REPLICATED) and p.ds_pipe_replicated)
        and (is_model_parallel_parameter(p) or optimizer.model_parallel_rank == 0)
    ]
    if counted:
        norms = torch._foreach_norm(counted, 2.0, dtype=get_norm_dtype())
        total = torch.stack(norms).pow(2).sum().float()
    else:
        total = torch.tensor(0.0, dtype=torch.float32).to(optimizer.device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=optimizer.dp_process_group)
    optimizer._model_parallel_all_reduce(tensor=total, op=dist.ReduceOp.SUM)
    total = total.pow(0.5)
    mask_nan_or_inf_with_val_inplace(total, device=optimizer.device)
    return total


# DeepSpeed's ZeRO-1/2 method -> capdpo's replacement
_REPLACEMENTS = {
    "has_overflow_partitioned_grads_serial": partition_has_overflow,
    "get_grad_norm_direct": partition_grad_norm,
}
_LIBRARY: dict[str, Any] = {}  # DeepSpeed's own methods, kept when replaced


def _library(name: str) -> Any:
    """DeepSpeed's own method `name`, replaced or not."""
    return _LIBRARY[name] if name in _LIBRARY else getattr(_zero_optimizer(), name)


def _zero_optimizer() -> Any:
    """DeepSpeed's ZeRO-1/2 optimizer class, or None where DeepSpeed or one of the methods is missing."""
    try:
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    except ImportError:
        return None
    return DeepSpeedZeroOptimizer if all(hasattr(DeepSpeedZeroOptimizer, n) for n in _REPLACEMENTS) else None


def fast_zero_reductions() -> bool:
    """Route ZeRO-1/2's overflow check and gradient norm through this module (idempotent); False where this
    DeepSpeed lacks either method (nothing changed)."""
    optimizer = _zero_optimizer()
    if optimizer is None:
        return False
    for name, replacement in _REPLACEMENTS.items():
        _LIBRARY.setdefault(name, getattr(optimizer, name))
        setattr(optimizer, name, replacement)
    return True


def library_zero_reductions() -> bool:
    """Put DeepSpeed's own methods back after `fast_zero_reductions`; False where nothing was replaced."""
    optimizer = _zero_optimizer()
    if optimizer is None or not _LIBRARY:
        return False
    for name, method in _LIBRARY.items():
        setattr(optimizer, name, method)
    return True
