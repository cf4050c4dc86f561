"""A decode step's attention as one Triton kernel that reads only the cache slots written so far.

The static decoder's cache has prompt + max_new_tokens slots per row, and every row writes the same slot at a step
(left padding keeps the rows aligned), so the keys a step can attend to end at that slot for every row. SDPA reads
the whole cache (or a window of it) under the mask: at 512 rows of Qwen2.5-VL-7B that is ~12 GB a step, a third of
the step's time. The kernel here runs one program per (row, key/value head): it loads the query heads that share
that key/value head, walks the cache in blocks of `BLOCK_N` slots up to the written end (a device scalar, so one CUDA
graph serves every step), applies the row's mask (padding) and accumulates with an online softmax in float32. The
mask comes from the model as SDPA's boolean one, so it means what it means there.

Rows that continue one prompt (a stage's k samples of one image and instruction) hold equal copies of its keys and
values in their prompt slots; given `source` (for each row, the first row with its prompt) the kernel reads those
slots from the source row, so the rows of a group, whose programs run side by side, can find them in L2 instead of
each reading its own copy from memory. The values are the same, so the result is too.

`decode_attention_end(position)` tells the attention function where the written slots end; outside it (and for
inputs it does not cover: more than one query, a float mask, an unusual layout) the library's SDPA runs. The static
decoder uses it on CUDA with Triton unless told not to (`StaticDecoder(decode_kernel=False)`, a stage's
`decode_kernel: false`); `bench/decode.py --attention-only` times it against SDPA on a GPU, and the tests run it
under Triton's interpreter on the CPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

DECODE_SDPA = "capdpo_decode_sdpa"
BLOCK_N = 64
_END: list[tuple[Any, Any, int]] = []  # the innermost `decode_attention_end`: (position, source, prompt_len)
_KERNEL: Any = None


@contextlib.contextmanager
def decode_attention_end(position: Any, source: Any = None, prompt_len: int = 0) -> Iterator[None]:
    """Inside the block, one-query attention reads cache slots [0, position] only (`position`: a 0-d tensor on the
    device, read by the kernel when it runs). With `source` (a long tensor [rows] on the device: for each row, a row
    whose first `prompt_len` cache slots hold the same keys and values as its own), the kernel reads those slots from
    the source row."""
    _END.append((position, source, prompt_len))
    try:
        yield
    finally:
        _END.pop()


def available(device: Any) -> bool:
    """Whether the kernel can run on `device`: a CUDA device with Triton, or any device under TRITON_INTERPRET=1."""
    import os

    if os.environ.get("TRITON_INTERPRET") == "1":
        return _kernel() is not None
    if getattr(device, "type", str(device)) != "cuda":
        return False
    from torch.utils._triton import has_triton

    return has_triton() and _kernel() is not None


def decode_sdpa_attention(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    """An attention function for transformers' `AttentionInterface`: the kernel for one-query steps inside
    `decode_attention_end`, the library's SDPA otherwise. Returns [batch, queries, heads, dim]."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not _covered(query, key, value, attention_mask, kwargs):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    end, source, prompt_len = _END[-1]
    mask = attention_mask[:, 0, 0, :]
    return decode_attention(query, key, value, mask, end, scale, source, prompt_len), None


def _covered(query: Any, key: Any, value: Any, mask: Any, kwargs: dict) -> bool:
    import torch

    return (
        bool(_END)
        and query.shape[2] == 1
        and mask is not None
        and mask.dtype == torch.bool
        and mask.dim() == 4
        and mask.shape[1] == 1
        and mask.shape[2] == 1
        and mask.shape[-1] == key.shape[2]
        and kwargs.get("softcap") is None
        and kwargs.get("sliding_window") is None
        and query.shape[1] % key.shape[1] == 0
        and key.shape == value.shape
        and query.shape[-1] == key.shape[-1]
        and query.shape[-1] in (16, 32, 64, 128, 256)
        and query.stride(-1) == key.stride(-1) == value.stride(-1) == 1
        and query.dtype == key.dtype == value.dtype
        and available(query.device)
    )


def decode_attention(
    query: Any, key: Any, value: Any, mask: Any, end: Any, scale: float, source: Any = None, prompt_len: int = 0
) -> Any:
    """Attention of one query per row over cache slots [0, end] (`end` a 0-d tensor): query [B, H, 1, D], key/value
    [B, KVH, S, D] (H a multiple of KVH: query head h reads key/value head h // (H // KVH)), mask [B, S] (True:
    attend). `source` (long [B], or None: each row itself): the row whose keys and values row b reads in its first
    `prompt_len` slots. Returns [B, 1, H, D] in the query's dtype."""
    import torch

    batch, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    out = torch.empty(batch, 1, heads, dim, dtype=query.dtype, device=query.device)
    has_source = source is not None and prompt_len > 0
    _kernel()[(batch, kv_heads)](
        query, key, value, mask, out, end, scale, source if has_source else end, prompt_len if has_source else 0,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2), mask.stride(0), mask.stride(1),
        out.stride(0), out.stride(2), key.shape[2],
        GROUPS=groups, G_PAD=max(16, 1 << (groups - 1).bit_length()), D=dim, BLOCK_N=BLOCK_N,
        IEEE=query.dtype == torch.float32, HAS_SOURCE=has_source,
    )  # fmt: skip
    return out


def _kernel() -> Any:
    global _KERNEL
    if _KERNEL is not None:
        return _KERNEL
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def kernel(
        Q, K, V, M, Out, END, scale, SRC, prompt_len,
        s_qb, s_qh, s_kb, s_kh, s_ks, s_vb, s_vh, s_vs, s_mb, s_mn, s_ob, s_oh, slots,
        GROUPS: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
        HAS_SOURCE: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(0)
        h = tl.program_id(1)
        g = tl.arange(0, G_PAD)
        d = tl.arange(0, D)
        rows = g < GROUPS
        q = tl.load(Q + b * s_qb + (h * GROUPS + g)[:, None] * s_qh + d[None, :], mask=rows[:, None], other=0.0)
        end = tl.minimum(tl.load(END) + 1, slots)
        if HAS_SOURCE:
            src = tl.load(SRC + b)
        else:
            src = b
        m_i = tl.full([G_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D], tl.float32)
        for start in range(0, end, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            inside = n < end
            allowed = tl.load(M + b * s_mb + n * s_mn, mask=inside, other=0) != 0
            row = tl.where(n < prompt_len, src, b)  # a prompt slot from the source row, the rest from the row's own
            k = tl.load(K + row[:, None] * s_kb + h * s_kh + n[:, None] * s_ks + d[None, :], mask=inside[:, None],
                        other=0.0)  # fmt: skip
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where(allowed[None, :], s * scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing allowed yet stay at zero
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + row[:, None] * s_vb + h * s_vh + n[:, None] * s_vs + d[None, :], mask=inside[:, None],
                        other=0.0)  # fmt: skip
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(
            Out + b * s_ob + (h * GROUPS + g)[:, None] * s_oh + d[None, :],
            out.to(Out.dtype.element_ty),
            mask=rows[:, None],
        )

    _KERNEL = kernel
    return kernel
