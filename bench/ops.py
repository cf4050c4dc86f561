"""Single elementwise operators of the prefill at their real shapes: each candidate form timed, and checked equal
(bit for bit) to the library's own function on the same inputs.

python bench/ops.py --out bench/results/ops_h100.json   # GPU
python bench/ops.py --tiny                              # CPU smoke test
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import environment, mean_seconds, write_result  # noqa: E402


def _rotary_halves(q, k, cos, sin):  # noqa: ANN001, ANN202
    """The vision rotation written on the halves of the last dimension (the table's two halves are equal, as the
    tower builds it): the same products and sums as the library's, without the concatenated rotate_half."""
    import torch

    half = q.shape[-1] // 2
    c, s = cos[:, None, :half].float(), sin[:, None, :half].float()

    def rotate(x):  # noqa: ANN001, ANN202
        x1, x2 = x[..., :half].float(), x[..., half:].float()
        return torch.cat((x1 * c + (-x2) * s, x2 * c + x1 * s), dim=-1).to(x.dtype)

    return rotate(q), rotate(k)


def compare(result: dict, label: str, fn, args: tuple, extra: dict, device: str) -> None:  # noqa: ANN001
    """Time `fn` eager, compiled with every size symbolic (as capdpo compiles it), with static sizes, and with only
    the sizes that change between calls symbolic (torch's automatic dynamic shapes, after a call on half the
    tokens), plus the `extra` forms; every output compared with eager `fn`'s."""
    import torch

    from capdpo.models import patches

    automatic = torch.compile(fn, fullgraph=True)
    with torch.inference_mode():
        automatic(*(a[: max(1, a.shape[0] // 2)] if isinstance(a, torch.Tensor) and a.dim() > 1 else a for a in args))
        reference = fn(*args)
    reference = reference if isinstance(reference, tuple) else (reference,)
    forms = {
        "eager": fn,
        "compiled, all sizes symbolic (capdpo)": patches.compiled_or_eager(fn),
        "compiled, static sizes": torch.compile(fn, dynamic=False, fullgraph=True),
        "compiled, changing sizes symbolic": automatic,
        **extra,
    }
    moved = sum(a.numel() * a.element_size() for a in args if isinstance(a, torch.Tensor))
    moved += sum(r.numel() * r.element_size() for r in reference)
    entry = result["ops"].setdefault(label, {"bytes_read_and_written": moved, "forms": {}})
    for name, form in forms.items():
        with torch.inference_mode():
            out = form(*args)
            out = out if isinstance(out, tuple) else (out,)
            equal = all(torch.equal(a, b) for a, b in zip(out, reference))
            ms = mean_seconds(lambda form=form: form(*args), device, repeat=10, warmup=2) * 1000
        rate = moved / (ms / 1000) / 1e12
        entry["forms"][name] = {"ms": ms, "TB_per_s": rate, "equal_to_eager": equal}
        print(f"{label}, {name}: {ms:.3f} ms ({rate:.2f} TB/s), equal to eager: {equal}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--images", type=int, default=256, help="448x448 images: 1024 vision tokens each")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import torch
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen25

    from capdpo.models import patches

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokens = (8 if args.tiny else args.images) * 1024
    heads, dim = 16, 80  # Qwen2.5-VL's vision tower
    gen = torch.Generator(device=device).manual_seed(0)
    qkv = torch.randn(tokens, 3 * heads * dim, device=device, dtype=torch.bfloat16, generator=gen)
    q, k, _ = qkv.reshape(tokens, 3, heads, dim).permute(1, 0, 2, 3).unbind(0)  # the attention's views
    freqs = torch.rand(tokens, dim // 2, device=device, generator=gen) * 100
    emb = torch.cat((freqs, freqs), dim=-1)  # as the tower builds its rotary table
    cos, sin = emb.cos(), emb.sin()
    rotary = {
        "library (eager)": qwen25.apply_rotary_pos_emb_vision,
        "compiled, halves, all sizes symbolic": torch.compile(_rotary_halves, dynamic=True, fullgraph=True),
    }
    result = {"env": environment(device), "tokens": tokens, "ops": {}}
    compare(result, "vision rotary", patches._rotary_vision, (q, k, cos, sin), rotary, device)
    hidden = torch.randn(tokens, heads * dim, device=device, dtype=torch.bfloat16, generator=gen)
    weight = torch.rand(heads * dim, device=device, dtype=torch.bfloat16, generator=gen)
    if not args.tiny:  # the smoke test compiles two operators, not six
        compare(result, "vision RMSNorm", patches._rms_norm, (hidden, weight, 1e-6), {}, device)
    width = 3456  # the vision MLP padded to a multiple of 128
    gate_up = torch.randn(tokens, 2 * width, device=device, dtype=torch.bfloat16, generator=gen)
    if not args.tiny:
        compare(result, "vision SiLU gating", patches._silu_mul, (gate_up[:, :width], gate_up[:, width:]), {}, device)
    del qkv, q, k, cos, sin, hidden, gate_up
    # the language model's prefill of as many captions: [rows, 290 tokens, 3584], 28 query and 4 key/value heads
    rows, length, hidden_size, inter = (2, 16, 3584, 18944) if args.tiny else (args.images, 290, 3584, 18944)
    x = torch.randn(rows, length, hidden_size, device=device, dtype=torch.bfloat16, generator=gen)
    w = torch.rand(hidden_size, device=device, dtype=torch.bfloat16, generator=gen)
    compare(result, "text RMSNorm", patches._rms_norm, (x, w, 1e-6), {}, device)
    del x
    g = torch.randn(rows, length, inter, device=device, dtype=torch.bfloat16, generator=gen)
    u = torch.randn(rows, length, inter, device=device, dtype=torch.bfloat16, generator=gen)
    if not args.tiny:
        compare(result, "text SiLU gating", patches._silu_mul, (g, u), {}, device)
    del g, u
    tq = torch.randn(rows, 28, length, 128, device=device, dtype=torch.bfloat16, generator=gen)
    tk = torch.randn(rows, 4, length, 128, device=device, dtype=torch.bfloat16, generator=gen)
    tc = torch.rand(rows, length, 128, device=device, generator=gen).to(torch.bfloat16)
    ts = torch.rand(rows, length, 128, device=device, generator=gen).to(torch.bfloat16)
    if not args.tiny:
        compare(result, "text rotary", patches._rotary_text, (tq, tk, tc, ts), {}, device)
    write_result(args.out, result)


if __name__ == "__main__":
    main()
