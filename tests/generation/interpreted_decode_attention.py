"""Checks of the decode-attention kernel under Triton's interpreter (TRITON_INTERPRET=1 must be set before Triton is
imported, so `test_decode_attention.py` runs this file in its own process):

    TRITON_INTERPRET=1 python -m tests.generation.interpreted_decode_attention MODEL_DIR... -- IMAGE...

Each check prints "ok <name>"; a failed check raises."""

from __future__ import annotations

import sys

import torch

from capdpo.generation import decode_attention
from capdpo.generation.batching import Request, user_message
from capdpo.generation.engine import Engine
from capdpo.generation.sampling import Generation
from capdpo.models.loading import load_vlm


def sdpa_over_the_written_slots(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, end: int):
    """The library's SDPA over cache slots [0, end] with every query head's key/value head repeated: [B, 1, H, D]."""
    groups = q.shape[1] // k.shape[1]
    k, v = (t[:, :, : end + 1].repeat_interleave(groups, 1) for t in (k, v))
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask[:, None, None, : end + 1]
    ).transpose(1, 2)


def kernel_equals_sdpa_over_the_written_slots(heads: int, kv_heads: int, dim: int) -> None:
    torch.manual_seed(0)
    batch, slots, end = 3, 150, 97
    q = torch.randn(batch, heads, 1, dim)
    k, v = torch.randn(batch, kv_heads, slots, dim), torch.randn(batch, kv_heads, slots, dim)
    k[:, :, end + 1 :], v[:, :, end + 1 :] = float("nan"), float("nan")  # past the end: never read
    mask = torch.zeros(batch, slots, dtype=torch.bool)
    mask[:, : end + 1] = True
    mask[0, :5], mask[2, :70] = False, False  # left padding of two sizes
    out = decode_attention.decode_attention(q, k, v, mask, torch.tensor(end), dim**-0.5)
    expected = sdpa_over_the_written_slots(q, k, v, mask, end)
    assert out.shape == (batch, 1, heads, dim) and not out.isnan().any()
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def kernel_reads_prompt_slots_from_the_source_row() -> None:
    """Rows 1 and 3 continue the prompts of rows 0 and 2: their own prompt slots are never read (NaN there), the
    source rows' are, and their generated slots are their own."""
    torch.manual_seed(2)
    batch, heads, kv_heads, dim, slots, prompt, end = 4, 8, 2, 64, 150, 70, 120
    q = torch.randn(batch, heads, 1, dim)
    k, v = torch.randn(batch, kv_heads, slots, dim), torch.randn(batch, kv_heads, slots, dim)
    source = torch.tensor([0, 0, 2, 2])
    expected_k, expected_v = k.clone(), v.clone()
    for row in (1, 3):
        expected_k[row, :, :prompt], expected_v[row, :, :prompt] = k[row - 1, :, :prompt], v[row - 1, :, :prompt]
        k[row, :, :prompt], v[row, :, :prompt] = float("nan"), float("nan")
    mask = torch.zeros(batch, slots, dtype=torch.bool)
    mask[:, : end + 1] = True
    mask[0:2, :9] = False  # rows 0 and 1 share a left-padded prompt
    out = decode_attention.decode_attention(q, k, v, mask, torch.tensor(end), dim**-0.5, source, prompt)
    expected = sdpa_over_the_written_slots(q, expected_k, expected_v, mask, end)
    assert not out.isnan().any()
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    # without a source each row reads its own slots: the NaN prompt slots reach rows 1 and 3
    own = decode_attention.decode_attention(q, k, v, mask, torch.tensor(end), dim**-0.5)
    assert own[[1, 3]].isnan().all() and not own[[0, 2]].isnan().any()


def kernel_in_half_precision_is_as_close_to_float32_as_sdpa() -> None:
    """16-bit inputs (float16: the interpreter computes bfloat16 wrongly, it has no such type; a GPU run measures
    bfloat16): the kernel's error against the float32 attention is SDPA's own, not more."""
    torch.manual_seed(1)
    batch, slots, end, heads, kv_heads, dim = 4, 300, 250, 28, 4, 128
    q = torch.randn(batch, heads, 1, dim).half()
    k, v = torch.randn(batch, kv_heads, slots, dim).half(), torch.randn(batch, kv_heads, slots, dim).half()
    mask = torch.zeros(batch, slots, dtype=torch.bool)
    mask[:, : end + 1] = True
    mask[1, :40] = False
    groups = heads // kv_heads

    def sdpa(q, k, v):  # noqa: ANN001, ANN202
        k, v = (t[:, :, : end + 1].repeat_interleave(groups, 1) for t in (k, v))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, : end + 1])

    exact = sdpa(q.float(), k.float(), v.float()).transpose(1, 2)
    ours = decode_attention.decode_attention(q, k, v, mask, torch.tensor(end), dim**-0.5).float() - exact
    theirs = sdpa(q, k, v).transpose(1, 2).float() - exact
    assert ours.abs().max() <= 2 * theirs.abs().max() and ours.abs().mean() <= 1.5 * theirs.abs().mean()
    assert theirs.abs().max() > 0  # the comparison is between two rounded results


def outside_a_decode_step_the_library_sdpa_runs() -> None:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 2, True
    q, k, v = torch.randn(2, 4, 1, 16), torch.randn(2, 2, 10, 16), torch.randn(2, 2, 10, 16)
    mask = torch.ones(2, 1, 1, 10, dtype=torch.bool)
    expected = sdpa_attention_forward(module, q, k, v, mask)[0]
    assert torch.equal(decode_attention.decode_sdpa_attention(module, q, k, v, mask)[0], expected)
    calls = []
    kernel = decode_attention.decode_attention
    decode_attention.decode_attention = lambda *a: calls.append(1) or kernel(*a)
    try:
        with decode_attention.decode_attention_end(torch.tensor(9)):
            float_mask = torch.zeros(2, 1, 1, 10)
            got = decode_attention.decode_sdpa_attention(module, q, k, v, float_mask)[0]
            assert torch.equal(got, sdpa_attention_forward(module, q, k, v, float_mask)[0]) and not calls
            got = decode_attention.decode_sdpa_attention(module, q, k, v, mask)[0]
            assert calls == [1]  # a boolean mask inside a step: the kernel
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    finally:
        decode_attention.decode_attention = kernel


def static_decoder_with_the_kernel_gives_generates_tokens(model_dir: str, images: list[str]) -> None:
    calls, sources = [], []
    kernel = decode_attention.decode_attention
    decode_attention.decode_attention = lambda *a: calls.append(a[0].shape) or sources.append(a[6:]) or kernel(*a)
    try:
        lm = load_vlm(model_dir)
        requests = [
            Request(
                key=f"r{i}", image=images[i % len(images)], messages=[user_message("Describe." + " Now." * i)], seed=i
            )
            for i in range(3)
        ]
        # two more samples of the first prompt (own seeds): they share its prefill and read its prompt slots from
        # its cache row
        requests += [Request(key=f"s{i}", image=images[0], messages=[user_message("Describe.")], seed=9 + i)
                     for i in range(2)]  # fmt: skip
        fast = Engine(lm, decoder="static", prefill_rows=2)
        assert not fast.static.decode_kernel and decode_attention.available(lm.device)  # off on the CPU; runs here
        fast.static.decode_kernel = True
        layers = lm.model.config.get_text_config().num_hidden_layers
        for gen in (Generation(max_new_tokens=10), Generation(max_new_tokens=10, temperature=1.0, top_p=0.9)):
            calls.clear()
            sources.clear()
            ours, theirs = fast.generate(requests, gen), Engine(lm, decoder="hf").generate(requests, gen)
            assert [o.token_ids for o in ours] == [o.token_ids for o in theirs]
            assert len(calls) == layers * 9 and all(shape[2] == 1 for shape in calls)  # every step and layer
            first = [0, 1, 2, 0, 0]  # the engine keeps the batch's order: s0 and s1 continue r0's prompt
            assert all(src.tolist() == first and prompt > 0 for src, prompt in sources)
        # a batch without shared prompts: every row reads its own slots (the kernel without a source)
        sources.clear()
        gen = Generation(max_new_tokens=10)
        distinct = requests[:3]
        assert [o.token_ids for o in fast.generate(distinct, gen)] == [
            o.token_ids for o in Engine(lm, decoder="hf").generate(distinct, gen)
        ]
        assert sources and all(src is None for src, _ in sources)
        assert lm.model.config.get_text_config()._attn_implementation == "sdpa"  # put back after the loop
    finally:
        decode_attention.decode_attention = kernel


def main(argv: list[str]) -> None:
    split = argv.index("--")
    models, images = argv[:split], argv[split + 1 :]
    for shape in ((8, 2, 64), (28, 4, 128), (4, 4, 16)):
        kernel_equals_sdpa_over_the_written_slots(*shape)
        print(f"ok kernel {shape}", flush=True)
    kernel_reads_prompt_slots_from_the_source_row()
    print("ok source rows", flush=True)
    kernel_in_half_precision_is_as_close_to_float32_as_sdpa()
    print("ok half precision", flush=True)
    outside_a_decode_step_the_library_sdpa_runs()
    print("ok fallback", flush=True)
    for model in models:
        static_decoder_with_the_kernel_gives_generates_tokens(model, images)
        print(f"ok decoder {model}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
