"""Captioning's decode steps, lever by lever (7B, 448x448 images, one batch of `--batch` rows).

Each configuration generates 1 and `--new-tokens` tokens for the same batch; the difference over the extra tokens is
its decode step. In order: capdpo's CUDA tunings without the joined projections; with q/k/v and gate/up as one GEMM
each (`fuse_text_projections`); that with the attention window growing by 32 positions; top-p sampling with the
sampler eager and compiled (the two must give the same tokens). Then a profile of bare decode steps.
`--attention-only` times the decode-attention kernel against SDPA; `--overlap` times one batch's decode steps with
another batch's prefill on a second stream against the two one after the other.

    python bench/decode.py --out bench/results/decode_h100.json     # GPU, ~4 min
    python bench/decode.py --tiny                                   # CPU smoke test
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    ENDOFTEXT,
    Shapes,
    build_model,
    environment,
    mean_seconds,
    profiler,
    sync,
    synthetic_batch,
    write_result,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model on CPU: a smoke test of this script")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prefill-rows", type=int, default=256)
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--attention-only",
        action="store_true",
        help="only the decode-attention kernel against SDPA: one attention call at the step's shape, and decode steps",
    )
    parser.add_argument(
        "--call-only", action="store_true", help="with --attention-only: the single attention call, no decode steps"
    )
    parser.add_argument(
        "--overlap",
        action="store_true",
        help="only the overlap probe: one batch's decode steps and another batch's prefill, apart and at once",
    )
    args = parser.parse_args()

    import torch

    from capdpo.generation.sampling import Generation, sampled_scores
    from capdpo.generation.static_decoder import StaticDecoder
    from capdpo.models import patches

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = device == "cuda"
    if args.tiny:
        args.batch, args.new_tokens, args.prefill_rows = 4, 6, 2
    shapes = Shapes(image_side=56) if args.tiny else Shapes()
    model = build_model("tiny" if args.tiny else "7b", device)
    inputs = synthetic_batch(args.batch, shapes, device, seed=1)
    patches.use_grouped_vision_attention()
    if cuda:  # tune_for_cuda_inference less the joined projections, which are the first lever
        patches.linear_patch_embedding(model)
        patches.pad_vision_mlp(model)
        patches.fuse_vision_elementwise(model)
        patches.fuse_text_elementwise(model)
    lm = SimpleNamespace(model=model, device=torch.device(device))
    result = {"env": environment(device), "batch": args.batch, "new_tokens": args.new_tokens, "configs": {}}
    steps = args.new_tokens - 1
    seeds = list(range(args.batch))
    tokens = {}

    def measure(name: str, gen: Generation, **decoder_args) -> None:
        decoder = StaticDecoder(lm, prefill_rows=args.prefill_rows, **decoder_args)
        with torch.inference_mode():
            one = mean_seconds(
                lambda: decoder.generate(inputs, Generation(max_new_tokens=1), seeds, [], ENDOFTEXT), device, 1
            )
            out = {}
            full = mean_seconds(
                lambda: out.setdefault("t", decoder.generate(inputs, gen, seeds, [], ENDOFTEXT)), device, 1
            )
        tokens[name] = out["t"]
        step_ms = (full - one) / steps * 1000
        result["configs"][name] = {"prefill_s": one, "generate_s": full, "decode_step_ms": step_ms}
        print(f"{name}: prefill + 1 token {one:.3f} s, {args.new_tokens} tokens {full:.3f} s, "
              f"decode step {step_ms:.2f} ms", flush=True)  # fmt: skip

    greedy = Generation(max_new_tokens=args.new_tokens)
    sampled = Generation(max_new_tokens=args.new_tokens, temperature=1.0, top_p=0.95)
    if args.overlap:
        patches.fuse_text_projections(model)
        overlap(lm, inputs, synthetic_batch(args.batch, shapes, device, seed=2), args, result)
        write_result(args.out, result)
        return
    if args.attention_only:
        patches.fuse_text_projections(model)
        attention_call(model, inputs, args.new_tokens, device, result)
        if args.call_only:
            write_result(args.out, result)
            return
        measure("SDPA attention", greedy, decode_kernel=False)
        measure("decode kernel", greedy, decode_kernel=True)
        same = (tokens["SDPA attention"] == tokens["decode kernel"]).float().mean().item()
        result["kernel_vs_sdpa_token_agreement"] = same
        print(f"greedy tokens with the kernel equal to SDPA's: {same:.1%}", flush=True)
        write_result(args.out, result)
        return
    measure("separate projections", greedy, decode_kernel=False)
    joined = patches.fuse_text_projections(model)
    result["joined_projection_groups"] = joined
    measure("joined projections", greedy, decode_kernel=False)
    same = (tokens["joined projections"] == tokens["separate projections"]).float().mean().item()
    result["joined_vs_separate_token_agreement"] = same
    print(f"joined projections: {joined} groups; greedy tokens equal to the separate ones: {same:.1%}", flush=True)
    measure("joined projections, window step 32", greedy, window_step=32, decode_kernel=False)
    measure("sampled, eager sampler", sampled, sampler_backend=None, decode_kernel=False)
    measure("sampled, compiled sampler", sampled, sampler_backend="inductor" if cuda else "eager", decode_kernel=False)
    equal = torch.equal(tokens["sampled, eager sampler"], tokens["sampled, compiled sampler"])
    result["compiled_sampler_tokens_equal"] = equal
    logits = torch.randn(args.batch, model.config.text_config.vocab_size, device=device) * 4
    seed_t = torch.tensor(seeds, device=device)
    step_t = torch.tensor(7, device=device)
    plain = sampled_scores(logits, seed_t, step_t, sampled)
    compiled = sampled_scores(logits, seed_t, step_t, sampled, "inductor" if cuda else "eager")
    result["compiled_sampler_scores_equal"] = torch.equal(plain, compiled)
    select_ms = {}
    for label, backend in (("eager", None), ("compiled", "inductor" if cuda else "eager")):
        select_ms[label] = (
            mean_seconds(lambda b=backend: sampled_scores(logits, seed_t, step_t, sampled, b), device, 1) * 1000
        )
    result["sampler_ms"] = select_ms
    print(f"sampled tokens equal with the compiled sampler: {equal}; scores equal: "
          f"{result['compiled_sampler_scores_equal']}; sampler {select_ms['eager']:.2f} ms eager, "
          f"{select_ms['compiled']:.2f} ms compiled", flush=True)  # fmt: skip
    profile_steps(model, inputs, args.new_tokens, device)
    write_result(args.out, result)


def overlap(lm, inputs: dict, other: dict, args, result: dict) -> None:
    """Whether a prefill fills what decode steps leave of the device: batch A decodes (`--new-tokens`) while batch B
    is prefilled (one token), each on its own stream and host thread, against the two one after the other. B starts
    once A's prefill is done (the time A takes for one token), so it meets A's decode steps."""
    import contextlib
    import threading
    import time

    import torch

    from capdpo.generation.sampling import Generation
    from capdpo.generation.static_decoder import StaticDecoder

    device = str(lm.device)
    cuda = device.startswith("cuda")
    seeds = list(range(args.batch))
    a, b = (StaticDecoder(lm, prefill_rows=args.prefill_rows) for _ in range(2))
    gen, one = Generation(max_new_tokens=args.new_tokens), Generation(max_new_tokens=1)

    def decode_a() -> None:
        a.generate(inputs, gen, seeds, [], ENDOFTEXT)

    def prefill_b() -> None:
        b.generate(other, one, seeds, [], ENDOFTEXT)

    t_decode = mean_seconds(decode_a, device, 1)  # A's graphs captured in the warm-up, replayed after
    t_prefill = mean_seconds(prefill_b, device, 1)
    t_a_prefill = mean_seconds(lambda: a.generate(inputs, one, seeds, [], ENDOFTEXT), device, 1)
    decode_a()  # A's kept session back at its decoding shape
    sync(device)

    def on_stream(fn, delay: float, errors: list) -> None:
        try:
            time.sleep(delay)
            stream = torch.cuda.Stream() if cuda else None
            with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
                fn()
            if cuda:
                stream.synchronize()
        except BaseException as error:  # noqa: BLE001 - re-raised in the main thread
            errors.append(error)

    times = []
    for _ in range(2):
        errors: list = []
        threads = [threading.Thread(target=on_stream, args=(decode_a, 0.0, errors)),
                   threading.Thread(target=on_stream, args=(prefill_b, t_a_prefill, errors))]  # fmt: skip
        sync(device)
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        sync(device)
        times.append(time.perf_counter() - start)
        if errors:
            raise errors[0]
    both = min(times)
    apart = t_decode + t_prefill
    result["overlap"] = {
        "decode_batch_s": t_decode, "prefill_batch_s": t_prefill, "prefill_of_decoded_batch_s": t_a_prefill,
        "apart_s": apart, "together_s": both, "saved_share": 1 - both / apart,
    }  # fmt: skip
    print(f"overlap: A decoding {t_decode:.3f} s (its prefill {t_a_prefill:.3f} s), B prefill {t_prefill:.3f} s; "
          f"one after the other {apart:.3f} s, at once {both:.3f} s ({1 - both / apart:.1%} saved)", flush=True)  # fmt: skip


def attention_call(model, inputs: dict, new_tokens: int, device: str, result: dict) -> None:
    """One layer's decode attention at the step's shape (the cache written up to the middle of the answer): the
    kernel against the library's SDPA under the same boolean mask."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from capdpo.generation import decode_attention

    cfg = model.config.text_config
    batch, prompt = inputs["input_ids"].shape
    slots, end = prompt + new_tokens, prompt + new_tokens // 2
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    dim = cfg.hidden_size // heads
    dtype = next(model.parameters()).dtype
    q = torch.randn(batch, heads, 1, dim, device=device, dtype=dtype)
    k, v = (torch.randn(batch, kv_heads, slots, dim, device=device, dtype=dtype) for _ in range(2))
    mask = torch.zeros(batch, 1, 1, slots, dtype=torch.bool, device=device)
    mask[..., : end + 1] = True
    layer = model.model.language_model.layers[0].self_attn
    position = torch.tensor(end, device=device)

    def ours():
        with decode_attention.decode_attention_end(position):
            return decode_attention.decode_sdpa_attention(layer, q, k, v, mask, scaling=dim**-0.5)[0]

    def theirs():
        return sdpa_attention_forward(layer, q, k, v, mask, scaling=dim**-0.5)[0]

    # the rows in groups of 4 continuing one prompt each (stage 3's shape): each reads its prompt slots from the
    # group's first row
    source = torch.arange(batch, device=device) // 4 * 4

    def shared():
        with decode_attention.decode_attention_end(position, source, prompt):
            return decode_attention.decode_sdpa_attention(layer, q, k, v, mask, scaling=dim**-0.5)[0]

    with torch.inference_mode():
        diff = (ours().float() - theirs().float()).abs().max().item()
        # both against the same attention in float32: bf16 rounding, or an error of one of them
        exact = sdpa_attention_forward(layer, q.float(), k.float(), v.float(), mask, scaling=dim**-0.5)[0]
        error = {}
        for name, fn in (("sdpa", theirs), ("kernel", ours)):
            gap = (fn().float() - exact).abs()
            error[name] = {"max_abs": gap.max().item(), "mean_abs": gap.mean().item()}
        timed = (("sdpa", theirs), ("kernel", ours), ("kernel, 4 rows per prompt", shared))
        ms = {name: mean_seconds(fn, device, repeat=20) * 1000 for name, fn in timed}
    read = 2 * batch * kv_heads * (end + 1) * dim * q.element_size()
    result["attention_call"] = {
        "ms": ms,
        "max_abs_diff": diff,
        "vs_float32": error,
        "slots": slots,
        "written": end + 1,
        "kv_bytes_read": read,
    }
    print(f"one layer's decode attention at {batch} rows ({end + 1} of {slots} slots written): SDPA {ms['sdpa']:.3f} ms,"
          f" kernel {ms['kernel']:.3f} ms ({read / ms['kernel'] / 1e9:.2f} TB/s over the written slots), rows of "
          f"4 per prompt reading one copy of its slots {ms['kernel, 4 rows per prompt']:.3f} ms; max |diff| "
          f"{diff:.2e}; against float32: SDPA max {error['sdpa']['max_abs']:.2e} mean {error['sdpa']['mean_abs']:.2e},"
          f" kernel max {error['kernel']['max_abs']:.2e} mean {error['kernel']['mean_abs']:.2e}", flush=True)  # fmt: skip


def profile_steps(model, inputs: dict, new_tokens: int, device: str) -> None:
    """Print the costliest operators of 4 bare decode steps (eager) on a cache of the captioning length."""
    import torch
    from transformers import StaticCache

    from bench.common import operator_table

    batch, prompt = inputs["input_ids"].shape
    total = prompt + max(new_tokens, 8)  # the warm-up and the profiled call write 8 positions
    cache = StaticCache(config=model.config, max_cache_len=total)
    with torch.inference_mode():
        model.model.rope_deltas = None
        model(**inputs, past_key_values=cache, use_cache=True, logits_to_keep=1)
        mask = torch.ones(batch, total, dtype=inputs["attention_mask"].dtype, device=device)
        token = torch.zeros(batch, 1, dtype=torch.long, device=device)
        position = torch.full((3, batch, 1), prompt, dtype=torch.long, device=device)

        def run() -> None:
            for _ in range(4):
                hidden = model.model.language_model(
                    inputs_embeds=model.get_input_embeddings()(token), position_ids=position, attention_mask=mask,
                    past_key_values=cache, use_cache=True,
                ).last_hidden_state  # fmt: skip
                model.lm_head(hidden[:, -1]).float().argmax(-1)

        run()
        sync(device)
        with profiler(device == "cuda") as prof:
            run()
            sync(device)
    print("--- 4 bare decode steps (eager) ---\n" + operator_table(prof, device == "cuda"), flush=True)


if __name__ == "__main__":
    main()
