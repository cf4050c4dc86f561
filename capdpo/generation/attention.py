"""SDPA with grouped-query attention folded into the query length, for many query tokens under an explicit mask.

With a mask and more than one query token, the library's SDPA path copies every key/value head once per query head
(`repeat_kv`): for the 3B scorer's suffix pass (2 key/value heads, 16 query heads, each row's image prefix in its
keys) that copy moves more bytes than the attention reads. Query heads that share a key/value head can instead be
laid end to end along the query axis, which makes the call ordinary multi-head attention over the key/value heads,
as long as the mask is the same for every head (it is: masks here are [batch, 1, queries, keys]). A caller that
runs many layers on one mask folds it once (`fold_mask`): folding and SDPA's conversion of a boolean mask to an
additive one otherwise run again in every layer (about 5% of the 3B suffix pass's device time).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

FOLDED_SDPA = "capdpo_folded_sdpa"


def fold_mask(mask: Any, groups: int, dtype: Any) -> Any:
    """A boolean mask [batch, 1, queries, keys] (True: attend) as the additive mask `folded_sdpa_attention` uses
    for `groups` query heads per key/value head: [batch, 1, groups * queries, keys] of 0 and -inf in `dtype`."""
    import torch

    additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    return additive.repeat(1, 1, groups, 1)


def folded_sdpa_attention(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    """An attention function for transformers' `AttentionInterface`: query [batch, heads, q, d], key/value [batch,
    kv_heads, k, d], a boolean or additive mask [batch or 1, 1, q, k] or one made by `fold_mask` ([batch, 1, groups *
    q, k]); returns [batch, q, heads, d] as the library's functions do."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    mask = attention_mask
    if groups == 1 or mask is None or mask.dim() != 4 or mask.shape[1] != 1 or kwargs.get("softcap") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    # query head h reads key/value head h // groups (the library's repeat_kv order): [b, kv, groups * q, d]
    folded = query.reshape(batch, kv_heads, groups * length, dim)
    mask = mask[..., : key.shape[2]]
    if mask.shape[2] == length:
        mask = mask.repeat(1, 1, groups, 1)
    elif mask.shape[2] != groups * length:
        raise ValueError(f"attention mask for {mask.shape[2]} queries; expected {length} or {groups * length}")
    out = torch.nn.functional.scaled_dot_product_attention(
        folded, key, value, attn_mask=mask, dropout_p=dropout if module.training else 0.0, scale=scaling
    )
    return out.reshape(batch, heads, length, dim).transpose(1, 2).contiguous(), None


def register(name: str, function: Any) -> None:
    """Make `name` an attention implementation the models accept, attending through `function` (idempotent), with
    SDPA's mask builder: a 2-D mask becomes SDPA's boolean one, a 4-D mask passes untouched."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(name, function)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)


@contextmanager
def sdpa_through(config: Any, name: str, function: Any) -> Iterator[bool]:
    """Inside the block a model whose attention is SDPA attends through `function` (registered as `name`); yields
    whether it does. Other implementations (FlashAttention, eager) stay; the implementation is put back after."""
    current = config._attn_implementation
    if current != "sdpa":
        yield False
        return
    register(name, function)
    config._attn_implementation = name
    try:
        yield True
    finally:
        config._attn_implementation = current


def folded_attention(config: Any) -> Any:
    """Run a model whose attention is SDPA on `folded_sdpa_attention` inside the block; yields whether it does (the
    caller then passes 4-D masks). Other implementations (FlashAttention reads grouped heads natively; eager) stay."""
    return sdpa_through(config, FOLDED_SDPA, folded_sdpa_attention)
