"""The prompt-shared DPO forward: each pair's prompt runs once and both completions attend to it.

A pair's chosen and rejected sequences begin with the same prompt (chat template, image tokens, instruction; in the
benchmark's pairs 305 of 400 tokens), so a two-row forward computes that prompt twice. Here each pair becomes one
packed row::

    [prompt p_0 .. p_{P-1}] [chosen c_0 .. c_m] [p_{P-1} again] [rejected r_0 .. r_n] [padding]

under a block attention mask: the prompt is causal; a chosen token sees the prompt and the chosen tokens before
it; the repeated last prompt token and the rejected tokens see the prompt without its last token, the repeat and
the rejected tokens before them. Every token keeps the rope position it has in its standalone sequence (Qwen-VL's
3-D positions included), so each chosen and rejected token's hidden state is the one the two-row forward gives, and
the repeat's hidden state is that of the last prompt token, which predicts the first rejected token exactly as it
predicts the first chosen token. The image is encoded once per row. The per-token outputs (log-probs and the
metrics TRL reads) are scattered back to the two-row layout, so every loss runs unchanged on them.

The packed forward replaces the model's fused-LM-head forward (TRL's `add_fused_lm_head`, which scores only the
completion tokens, in chunks, without the full logits) inside `prompts_shared(...)`. It runs for the families and
attention kernels it is tested on (`PACKED_FAMILIES`, `PACKED_ATTENTION`); anything else, or a batch whose rows are
not [chosen_1..chosen_B, rejected_1..rejected_B] over equal prompts, takes the two-row forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

# model types whose packed forward is tested equal to the two-row forward (tests/training/test_packing.py)
PACKED_FAMILIES = frozenset({"qwen2_5_vl", "qwen3_vl", "llava"})
# attention kernels that take a 4-D mask (FlashAttention-2 does not; it keeps the two-row forward)
PACKED_ATTENTION = frozenset({"sdpa", "eager"})
# per-token fields of TRL's FusedCausalLMOutput, all [rows, length - 1]
_PER_TOKEN = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
_FLAG = "_capdpo_share_prompt"
_ORIGINAL = "_capdpo_unpacked_forward"
PROMPT, CHOSEN, REJECTED, PAD = 0, 1, 2, -1


@dataclass
class PackedPairs:
    """One packed row per pair, and where each of its scored tokens sits in the two-row layout."""

    input_ids: torch.Tensor  # [B, Lp]
    sequence: dict[str, torch.Tensor]  # other per-token inputs (mm_token_type_ids, ...), [B, Lp]
    segment: torch.Tensor  # [B, Lp]: PROMPT, CHOSEN, REJECTED or PAD
    prompt_end: torch.Tensor  # [B]: packed index of the last prompt token
    repeat_at: torch.Tensor  # [B]: packed index of its repeat, the rejected block's first token
    labels: torch.Tensor  # [B, Lp], -100 where no token is scored
    source: tuple[torch.Tensor, torch.Tensor]  # [B, Lp] each: (row, column) of the two-row token each one copies
    packed_at: torch.Tensor  # [N] flat index into [B, Lp - 1] of each scored token's prediction
    plain_at: torch.Tensor  # [N] flat index into [2B, L - 1] of the same prediction in the two-row layout


def pack_pairs(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    sequence: dict[str, torch.Tensor] | None = None,
) -> PackedPairs | None:
    """Pack 2B rows [chosen_1..chosen_B, rejected_1..rejected_B] (any padding) into B rows; None when a pair's two
    rows do not begin with the same prompt followed by their completion (the tokens whose label is not -100).

    Tensor operations on the inputs' device throughout, with one small copy to the host (each pair's three lengths
    and whether it packs): no per-token Python, and one wait for the device instead of a copy of every token."""
    rows, length = input_ids.shape
    if rows % 2 or rows == 0:
        return None
    pairs = rows // 2
    device = input_ids.device
    real = attention_mask.bool()
    scored = (labels != -100) & real
    rank = real.long().cumsum(1) - 1  # each real token's index among its row's real tokens
    # the prompt: the real tokens before the first scored one; the completion: all real tokens from it on
    prompt_len = torch.where(scored, rank, length).amin(1)
    completion_len = real.sum(1) - prompt_len
    packable = scored.any(1) & (prompt_len > 0) & (scored.sum(1) == completion_len)
    # the column of each row's k-th real token (padding sent to a spare column that is then dropped)
    col_of_rank = torch.zeros(rows, length + 1, dtype=torch.long, device=device)
    columns = torch.arange(length, device=device).expand(rows, length)
    col_of_rank.scatter_(1, torch.where(real, rank, length), columns)
    col_of_rank = col_of_rank[:, :length]
    ids_by_rank = input_ids.gather(1, col_of_rank)
    prompt_c, prompt_r = prompt_len[:pairs], prompt_len[pairs:]
    in_prompt = torch.arange(length, device=device)[None] < prompt_c[:, None]
    same_prompt = (prompt_c == prompt_r) & ((ids_by_rank[:pairs] == ids_by_rank[pairs:]) | ~in_prompt).all(1)
    ok = packable[:pairs] & packable[pairs:] & same_prompt
    chosen_len, rejected_len = completion_len[:pairs], completion_len[pairs:]
    lengths = torch.stack([prompt_c, chosen_len, rejected_len, ok.long()], dim=1)
    host = lengths.tolist()  # the one copy to the host
    if not all(flag for *_, flag in host):
        return None
    width = max(p + c + 1 + r for p, c, r, _ in host)

    j = torch.arange(width, device=device)[None]
    P, C, R = prompt_c[:, None], chosen_len[:, None], rejected_len[:, None]  # noqa: N806
    first_rows = j < P + C  # prompt and chosen: the chosen row's tokens
    repeat = j == P + C  # the last prompt token again, from the rejected row
    rejected = (j > P + C) & (j <= P + C + R)
    pad = j > P + C + R
    pair = torch.arange(pairs, device=device)[:, None]
    src_row = torch.where(first_rows, pair, pair + pairs).masked_fill(pad, 0)
    src_rank = torch.where(first_rows, j, torch.where(repeat, P - 1, j - C - 1)).masked_fill(pad, 0)
    src_col = col_of_rank[src_row, src_rank].masked_fill(pad, 0)
    segment = torch.full((pairs, width), PAD, dtype=torch.long, device=device)
    segment = segment.masked_fill(first_rows, CHOSEN).masked_fill(j < P, PROMPT)
    segment = segment.masked_fill(repeat | rejected, REJECTED)
    is_scored = (first_rows & (j >= P)) | rejected  # not the prompt, not the repeat
    # the scored tokens in row-major order (their count is known, so no data-dependent shape)
    scored_count = sum(c + r for _, c, r, _ in host)
    flat = torch.argsort((~is_scored).flatten().to(torch.uint8), stable=True)[:scored_count]
    packed_at = flat // width * (width - 1) + flat % width - 1
    plain_at = src_row.flatten()[flat] * (length - 1) + src_col.flatten()[flat] - 1
    packed_ids = input_ids[src_row, src_col].masked_fill(pad, 0)
    return PackedPairs(
        input_ids=packed_ids,
        sequence={k: v[src_row, src_col].masked_fill(pad, 0) for k, v in (sequence or {}).items()},
        segment=segment,
        prompt_end=prompt_c - 1,
        repeat_at=prompt_c + chosen_len,
        labels=packed_ids.masked_fill(~is_scored, -100),
        source=(src_row, src_col),
        packed_at=packed_at,
        plain_at=plain_at,
    )


def block_mask(packed: PackedPairs) -> torch.Tensor:
    """[B, 1, Lp, Lp] boolean: True where a query may attend a key (see the module docstring)."""
    segment = packed.segment
    width = segment.shape[1]
    order = torch.arange(width, device=segment.device)
    query, key = segment[:, :, None], segment[:, None, :]
    causal = order[None, None, :] <= order[None, :, None]
    # the rejected block replaces the last prompt token by its repeat
    prompt_key = (key == PROMPT) & ((query != REJECTED) | (order[None, None, :] < packed.prompt_end[:, None, None]))
    allowed = causal & ((key == query) | prompt_key) & (query != PAD)
    # padding queries attend to themselves only, so no row of the softmax is empty
    allowed |= torch.eye(width, dtype=torch.bool, device=segment.device)[None] & (query == PAD)
    return allowed[:, None]


def _attention_mask_for(allowed: torch.Tensor, attention: str, dtype: torch.dtype) -> torch.Tensor:
    if attention == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def standalone_positions(model: Any, kwargs: dict[str, Any]) -> torch.Tensor | None:
    """The rope positions the two-row forward gives its rows: [3, 2B, L] for Qwen-VL, [1, 2B, L] otherwise; None
    where they cannot be told without running it."""
    model_type = getattr(model.config, "model_type", "")
    input_ids = kwargs["input_ids"]
    if model_type == "llava":
        # Llama numbers every column from 0 when no positions are given, padding included
        order = torch.arange(input_ids.shape[1], device=input_ids.device)
        return order.expand(1, *input_ids.shape)
    if kwargs.get("mm_token_type_ids") is None or kwargs.get("image_grid_thw") is None:
        return None
    from capdpo.generation.rope import mrope_positions

    inputs = {k: kwargs[k] for k in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw")}
    fast = mrope_positions(model, inputs)
    if fast is not None:
        return fast[0]
    positions, _ = model.model.get_rope_index(
        input_ids,
        mm_token_type_ids=kwargs["mm_token_type_ids"],
        image_grid_thw=kwargs["image_grid_thw"],
        attention_mask=kwargs["attention_mask"],
    )
    return positions


def first_images(kwargs: dict[str, Any], pairs: int, images_once: bool) -> dict[str, Any]:
    """Image inputs for one row per pair: each pair's image once (the rows of a pair show the same image)."""
    out: dict[str, Any] = {}
    grid = kwargs.get("image_grid_thw")
    for key in ("image_grid_thw", "image_sizes"):
        if torch.is_tensor(kwargs.get(key)):
            out[key] = kwargs[key][:pairs]
    pixels = kwargs.get("pixel_values")
    if torch.is_tensor(pixels):
        if not images_once:
            if torch.is_tensor(grid):  # Qwen-VL: patches of all images in one tensor
                pixels = pixels[: int(grid[:pairs].prod(dim=-1).sum())]
            else:
                pixels = pixels[:pairs]
        out["pixel_values"] = pixels
    return out


def _packable(model: Any, kwargs: dict[str, Any]) -> bool:
    config = model.config
    attention = getattr(config.get_text_config(), "_attn_implementation", None) or config._attn_implementation
    if config.model_type not in PACKED_FAMILIES or attention not in PACKED_ATTENTION:
        return False
    if kwargs.get("pixel_values_videos") is not None or kwargs.get("past_key_values") is not None:
        return False
    mask = kwargs.get("attention_mask")
    return torch.is_tensor(kwargs.get("input_ids")) and torch.is_tensor(mask) and mask.dim() == 2


def packed_forward(model: Any, original: Any, images_once: bool, kwargs: dict[str, Any]) -> Any:
    """The fused-LM-head forward of 2B rows computed on B packed rows; None when the batch cannot be packed."""
    if not _packable(model, kwargs):
        return None
    labels = kwargs["labels"]
    input_ids, attention_mask = kwargs["input_ids"], kwargs["attention_mask"]
    sequence_keys = [
        k for k in ("mm_token_type_ids", "token_type_ids") if torch.is_tensor(kwargs.get(k)) and kwargs[k].dim() == 2
    ]
    packed = pack_pairs(input_ids, attention_mask, labels, {k: kwargs[k] for k in sequence_keys})
    if packed is None:
        return None
    positions = standalone_positions(model, kwargs)
    if positions is None:
        return None
    src_row, src_col = packed.source
    packed_positions = positions[:, src_row, src_col]
    # A row's positions may start at any offset (Llama numbers left padding too); rope sees only differences, so the
    # rejected block is moved to continue the chosen row's prompt as it continues its own.
    pairs = torch.arange(packed.input_ids.shape[0], device=input_ids.device)
    shift = packed_positions[:, pairs, packed.prompt_end] - packed_positions[:, pairs, packed.repeat_at]
    packed_positions = packed_positions + shift[:, :, None] * (packed.segment == REJECTED)
    packed_positions = packed_positions.masked_fill(packed.segment == PAD, 0)
    if model.config.model_type == "llava":
        packed_positions = packed_positions[0]
    attention = getattr(model.config.get_text_config(), "_attn_implementation", None) or "sdpa"
    dtype = model.get_input_embeddings().weight.dtype
    forward = {k: v for k, v in kwargs.items() if k not in ("input_ids", "attention_mask", "labels", *sequence_keys)}
    forward.pop("pixel_values", None)
    forward.pop("image_grid_thw", None)
    forward.pop("image_sizes", None)
    forward.update(first_images(kwargs, packed.input_ids.shape[0], images_once))
    forward.update(packed.sequence)
    out = original(
        input_ids=packed.input_ids,
        attention_mask=_attention_mask_for(block_mask(packed), attention, dtype),
        position_ids=packed_positions,
        labels=packed.labels,
        **forward,
    )
    rows, length = input_ids.shape
    for name in _PER_TOKEN:
        value = getattr(out, name, None)
        if value is None:
            continue
        picked = value.reshape(-1)[packed.packed_at]
        plain = value.new_zeros(rows * (length - 1)).index_put((packed.plain_at,), picked)
        setattr(out, name, plain.view(rows, length - 1))
    if getattr(out, "label_mask", None) is not None:
        out.label_mask = labels[:, 1:] != -100
    return out


def install_prompt_sharing(hf: Any, images_shared_flag: str) -> bool:
    """Wrap the model's fused-LM-head forward so that inside `prompts_shared(...)` it runs packed pairs; False if
    the model has no fused LM head (TRL adds it in DPOTrainer's constructor) or is not a packed family.

    `images_shared_flag` names the backbone attribute that is set while the batch passes each image once.
    """
    if hf.config.model_type not in PACKED_FAMILIES:
        return False
    if _ORIGINAL in vars(hf):
        return True
    fused = vars(hf).get("forward")
    if fused is None:  # no instance-level forward: no fused LM head to wrap
        return False
    setattr(hf, _FLAG, False)

    def forward(*args: Any, fused_lm_head: bool = False, **kwargs: Any) -> Any:
        if getattr(hf, _FLAG, False) and fused_lm_head and not args and kwargs.get("labels") is not None:
            backbone = getattr(hf, "base_model", None)
            images_once = bool(getattr(backbone, images_shared_flag, False))
            # the packed rows hold each image once: the two-row feature sharing must not apply to them
            if backbone is not None:
                setattr(backbone, images_shared_flag, False)
            try:
                out = packed_forward(hf, lambda **kw: fused(fused_lm_head=True, **kw), images_once, kwargs)
            finally:
                if backbone is not None:
                    setattr(backbone, images_shared_flag, images_once)
            if out is not None:
                return out
        return fused(*args, fused_lm_head=fused_lm_head, **kwargs)

    setattr(hf, _ORIGINAL, fused)
    hf.forward = forward
    return True


@contextlib.contextmanager
def prompts_shared(models: list[Any], on: bool) -> Iterator[None]:
    """Within the block, the models' fused-LM-head forwards of pair batches run each prompt once."""
    previous = [getattr(m, _FLAG, False) for m in models]
    for m in models:
        setattr(m, _FLAG, on)
    try:
        yield
    finally:
        for m, old in zip(models, previous):
            setattr(m, _FLAG, old)
