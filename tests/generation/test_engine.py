import contextlib
import math
import sys

import pytest
import torch

from capdpo.generation.batching import Request, run_halving, user_message
from capdpo.generation.engine import Engine
from capdpo.generation.sampling import Generation, SeededSampler, gumbel_noise
from capdpo.models.loading import load_vlm


@pytest.fixture(scope="module")
def strong(tiny_models):
    return load_vlm(str(tiny_models["strong"]))


def test_gumbel_noise_is_a_pure_function_and_standard_gumbel():
    seeds = torch.tensor([1, 2, 3])
    a = gumbel_noise(seeds, 5, 1000)
    b = gumbel_noise(seeds[1:2], 5, 1000)
    assert torch.equal(a[1], b[0])  # a row does not depend on its neighbours
    assert not torch.equal(a[0], a[1]) and not torch.equal(gumbel_noise(seeds, 6, 1000), a)
    big = gumbel_noise(torch.arange(200), 0, 1000).double()
    assert abs(big.mean().item() - 0.5772) < 0.01  # Euler–Mascheroni constant
    assert abs(big.var().item() - math.pi**2 / 6) < 0.05


def test_seeded_sampler_samples_from_the_filtered_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    n = 20000
    counts = torch.zeros(4)
    gen = Generation(temperature=1.0, top_p=1.0)
    sampler = SeededSampler(list(range(n)), 0, gen, "cpu")
    picks = sampler(torch.zeros(n, 0, dtype=torch.long), logits.expand(n, 4)).argmax(-1)
    counts += torch.bincount(picks, minlength=4)
    expected = torch.softmax(logits[0], -1) * n
    assert torch.all((counts - expected).abs() < 4 * expected.sqrt() + 5)
    # top-k 2 and top-p 0.5 never pick outside their sets
    topk = SeededSampler(list(range(500)), 0, Generation(temperature=1.0, top_k=2), "cpu")
    assert set(topk(torch.zeros(500, 0, dtype=torch.long), logits.expand(500, 4)).argmax(-1).tolist()) == {0, 1}
    topp = SeededSampler(list(range(500)), 0, Generation(temperature=1.0, top_p=0.5), "cpu")
    assert set(topp(torch.zeros(500, 0, dtype=torch.long), logits.expand(500, 4)).argmax(-1).tolist()) == {0}


def _requests(sample_images, n=4):
    return [
        Request(
            key=f"r{i}",
            image=str(sample_images[i % len(sample_images)]),
            messages=[user_message("Describe." + " Now." * i)],
            seed=i,
        )
        for i in range(n)
    ]


def test_sampling_does_not_depend_on_batch_composition(strong, sample_images):
    engine = Engine(strong)
    gen = Generation(max_new_tokens=10, temperature=1.0, top_p=0.9)
    requests = _requests(sample_images)
    together = engine.generate(requests, gen)
    alone = [engine.generate([r], gen)[0] for r in requests]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    assert len({tuple(o.token_ids) for o in together}) > 1


def test_greedy_generation_matches_plain_generate(strong, sample_images):
    engine = Engine(strong)
    request = _requests(sample_images, 2)[1]
    ours = engine.generate([request], Generation(max_new_tokens=12))[0]
    inputs = engine.batcher.encode([request])
    plain = strong.model.generate(**inputs, max_new_tokens=12, do_sample=False)[
        0, inputs["input_ids"].shape[1] :
    ].tolist()
    eos = strong.end_of_turn_ids()
    cut = next((i for i, t in enumerate(plain) if t in eos), len(plain))
    assert ours.token_ids == plain[:cut]
    assert ours.finish_reason == ("stop" if cut < len(plain) else "length")


def test_forward_logprobs_match_an_unbatched_forward(strong, sample_images):
    engine = Engine(strong)
    requests = _requests(sample_images, 3)
    requests[2].continuation = [5, 6, 7]
    batched = engine.forward_logprobs(requests)
    for request, got in zip(requests, batched):
        text = strong.processor.apply_chat_template(request.messages, tokenize=False, add_generation_prompt=True)
        from PIL import Image

        enc = strong.processor(text=[text], images=[Image.open(request.image).convert("RGB")], return_tensors="pt")
        ids = torch.cat([enc["input_ids"], torch.tensor([request.continuation], dtype=torch.long)], 1)
        enc["input_ids"] = ids
        enc["attention_mask"] = torch.ones_like(ids)
        if "mm_token_type_ids" in enc:
            enc["mm_token_type_ids"] = torch.cat(
                [enc["mm_token_type_ids"], torch.zeros(1, len(request.continuation), dtype=torch.long)], 1
            )
        with torch.no_grad():
            logits = strong.model(**enc).logits[0]
        n = len(request.continuation) + 1
        expected = torch.log_softmax(logits[-n:].float(), -1)
        assert got.shape == expected.shape
        assert torch.allclose(got, expected, atol=1e-4)


def test_out_of_memory_halves_the_batch():
    calls = []

    def fn(batch):
        calls.append(len(batch))
        if len(batch) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return [x * 10 for x in batch]

    assert run_halving(list(range(7)), fn) == [x * 10 for x in range(7)]
    assert calls == [7, 3, 1, 2, 4, 2, 2]  # halves until each piece fits, order kept
    with pytest.raises(ValueError):
        run_halving([1, 2], lambda b: (_ for _ in ()).throw(ValueError("not memory")))


@pytest.mark.parametrize("prefill_rows", [0, 1, 3])
@pytest.mark.parametrize("arch", ["strong", "qwen3vl", "llava"])
def test_static_decoder_is_token_identical_to_generate(tiny_models, sample_images, arch, prefill_rows, monkeypatch):
    """Also with the prefill in chunks of rows (images of different sizes, prompts of different lengths)."""
    import capdpo.generation.static_decoder as fastgen

    chunks, batched_positions = [], []
    original, original_rope = fastgen._cache_rows, fastgen.mrope_positions
    monkeypatch.setattr(fastgen, "_cache_rows", lambda *a: chunks.append(a[1:3]) or original(*a))

    def rope(*args):
        out = original_rope(*args)
        batched_positions.append(out is not None)
        return out

    monkeypatch.setattr(fastgen, "mrope_positions", rope)
    lm = load_vlm(str(tiny_models[arch]))
    fast, plain = Engine(lm, decoder="static", prefill_rows=prefill_rows), Engine(lm, decoder="hf")
    requests = _requests(sample_images, 4)
    for gen in (
        Generation(max_new_tokens=20),
        Generation(max_new_tokens=20, temperature=0.8, top_p=0.9, top_k=50, repetition_penalty=1.1),
    ):
        ours, theirs = fast.generate(requests, gen), plain.generate(requests, gen)
        assert [o.token_ids for o in ours] == [o.token_ids for o in theirs]
        assert [o.finish_reason for o in ours] == [o.finish_reason for o in theirs]
    assert batched_positions == (
        [] if arch == "llava" else [True, True]
    )  # Qwen-VL: positions from capdpo.generation.rope
    if prefill_rows and arch != "llava":  # Qwen-VL prefills chunk by chunk; LLaVA's inputs prefill whole
        expected = [(0, 1), (1, 2), (2, 3), (3, 4)] if prefill_rows == 1 else [(0, 3), (3, 4)]
        assert chunks == expected * 2


def test_the_compiled_sampler_traces_whole_and_samples_as_the_eager_one(strong, sample_images):
    """`sampled_scores` compiled as one graph (dynamo with the eager backend here; inductor on CUDA) gives the eager
    values, for an int step and a device step, and the static decoder sampling through it gives generate's tokens."""
    from capdpo.generation.sampling import sampled_scores

    torch.manual_seed(0)
    scores, seeds = torch.randn(5, 300) * 3, torch.arange(5) * 7919
    gen = Generation(temperature=0.7, top_p=0.9, top_k=40)
    for step in (3, torch.tensor(4)):
        expected = sampled_scores(scores, seeds, step, gen)
        assert torch.isinf(expected).any() and torch.equal(sampled_scores(scores, seeds, step, gen, "eager"), expected)
    fast = Engine(strong, decoder="static")
    fast.static.sampler_backend = "eager"
    requests, gen = _requests(sample_images, 3), Generation(max_new_tokens=12, temperature=1.0, top_p=0.9)
    ours, theirs = fast.generate(requests, gen), Engine(strong, decoder="hf").generate(requests, gen)
    assert [o.token_ids for o in ours] == [o.token_ids for o in theirs]


class _ReplayedGraph:
    """What `_capture` gives on CUDA, run eagerly: the step ran once as the warm-up, each replay runs it again."""

    def __init__(self, step_fn):
        self.replay = step_fn


@pytest.mark.parametrize("arch", ["strong", "qwen3vl", "llava"])
def test_static_decoder_windows_and_graph_replays_match_generate(tiny_models, sample_images, arch, monkeypatch):
    """Steps read growing windows of the cache, each window's step "captured" (warmed up once, then replayed): the
    tokens equal `generate`'s and the filled cache equals that of whole-cache eager decoding slot for slot (a step
    run twice must not write its token into a second slot), and attention reads only each window's keys."""
    import capdpo.generation.static_decoder as fastgen

    captured, read_lengths, caches = [], [], []

    def fake_capture(step_fn, pool=None):
        captured.append(pool)
        step_fn()
        return _ReplayedGraph(step_fn)

    layer_class = fastgen._decode_layer_class()
    update = layer_class.update

    def spy_update(self, *args, **kwargs):
        keys, values = update(self, *args, **kwargs)
        read_lengths.append(keys.shape[2])
        return keys, values

    prefill = fastgen.StaticDecoder._prefill
    monkeypatch.setattr(fastgen.StaticDecoder, "_prefill", lambda self, *a: caches.append(a[2]) or prefill(self, *a))
    monkeypatch.setattr(layer_class, "update", spy_update)
    monkeypatch.setattr(fastgen, "_capture", fake_capture)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: "pool")
    lm = load_vlm(str(tiny_models[arch]))
    requests, new = _requests(sample_images, 3), 20
    plain = Engine(lm, decoder="hf")
    whole = Engine(lm, decoder="static")
    whole.static.window_step = 0
    windowed = Engine(lm, decoder="static", prefill_rows=2)
    windowed.static.window_step, windowed.static.use_cuda_graph = 3, True
    # the second call: another batch of the same shape (the rows reversed), sampled; it replays the first call's
    # graphs on its own prompts
    sampled = Generation(max_new_tokens=new, temperature=0.9, top_p=0.9)
    calls = ((Generation(max_new_tokens=new), requests), (sampled, requests[::-1]))
    for call, (gen, batch) in enumerate(calls):
        captured.clear(), read_lengths.clear(), caches.clear()
        reference = whole.generate(batch, gen)
        assert captured == [] and caches  # no graphs on the CPU by default
        layers = len(caches[0].layers)
        assert set(read_lengths) == {caches[0].layers[0].max_cache_len}  # window_step 0: the whole cache every step
        read_lengths.clear()
        ours = windowed.generate(batch, gen)
        theirs = plain.generate(batch, gen)
        assert [o.token_ids for o in ours] == [o.token_ids for o in theirs] == [o.token_ids for o in reference]
        total = caches[1].layers[0].max_cache_len
        prompt = total - new
        last = new - 1  # the loop checks every 16 steps whether all rows have ended
        if all(o.finish_reason == "stop" for o in ours):
            last = min(last, -(-max(len(o.token_ids) for o in ours) // 16) * 16)
        # windows of 3 new positions: a graph each from the third step on, the last window capped at the cache
        steps = range(1, last + 1)
        ends = [min(total, prompt + -(-t // 3) * 3) for t in steps]
        firsts = [t for t, e in zip(steps, ends) if t >= 3 and (t == 3 or e != ends[t - 2])]
        assert len(firsts) >= 5
        if call == 0:
            assert captured == ["pool"] * len(firsts)
            runs = [e for t, e in zip(steps, ends) for _ in range(2 if t in firsts else 1)]  # warm-up + replay
        else:  # the kept graphs replay from the first step on; nothing is captured again
            assert captured == [] and caches[1] is windowed.static._session.cache
            runs = ends  # each step once
        assert read_lengths == [e for e in runs for _ in range(layers)]
        for a, b in zip(caches[0].layers, caches[1].layers):  # the last slot is never written
            torch.testing.assert_close(a.keys[..., : total - 1, :], b.keys[..., : total - 1, :], rtol=0, atol=1e-5)
            torch.testing.assert_close(a.values[..., : total - 1, :], b.values[..., : total - 1, :], rtol=0, atol=1e-5)


def test_the_kept_decode_session_follows_the_batch_shape_and_is_dropped_on_an_error(
    strong, sample_images, monkeypatch
):
    """One session (cache, step tensors, graphs) is kept: a call of the same shape reuses it, another shape replaces
    it, scoring drops it, and a call that fails (e.g. out of memory) leaves none behind."""
    import capdpo.generation.static_decoder as fastgen

    engine, gen = Engine(strong, decoder="static"), Generation(max_new_tokens=6)
    engine.generate(_requests(sample_images, 3), gen)
    first = engine.static._session
    assert first is not None and first.key[0] == 3
    engine.generate(_requests(sample_images, 3)[::-1], gen)
    assert engine.static._session is first
    engine.generate(_requests(sample_images, 2), gen)
    assert engine.static._session is not first and engine.static._session.key[0] == 2

    engine.score(_requests(sample_images, 2), batch_size=2)
    assert engine.static._session is None  # scoring does not hold the decoder's cache
    engine.generate(_requests(sample_images, 2), gen)
    assert engine.static._session is not None
    assert len(engine.forward_logprobs(_requests(sample_images, 2))) == 2
    assert engine.static._session is None  # nor does a teacher-forced forward
    engine.generate(_requests(sample_images, 2), gen)
    assert engine.static._session is not None

    def failing_prefill(self, *args):
        raise RuntimeError("the prefill failed")

    monkeypatch.setattr(fastgen.StaticDecoder, "_prefill", failing_prefill)
    with pytest.raises(RuntimeError, match="prefill failed"):
        engine.generate(_requests(sample_images, 2), gen)
    assert engine.static._session is None


@pytest.mark.parametrize("arch", ["strong", "llava"])
def test_static_decoder_handles_text_only_padded_batches(tiny_models, arch):
    lm = load_vlm(str(tiny_models[arch]))
    requests = [
        Request(key=f"t{i}", image=None, messages=[user_message("Rate this." + " Again." * i, with_image=False)])
        for i in range(3)
    ]
    gen = Generation(max_new_tokens=12)
    fast, chunked, plain = (
        Engine(lm, decoder="static").generate(requests, gen),
        Engine(lm, decoder="static", prefill_rows=2).generate(requests, gen),
        Engine(lm, decoder="hf").generate(requests, gen),
    )
    assert [o.token_ids for o in fast] == [o.token_ids for o in plain] == [o.token_ids for o in chunked]


@pytest.mark.parametrize("arch", ["strong", "qwen3vl", "llava"])
def test_static_decoder_with_fused_text_elementwise_is_token_identical(tiny_models, sample_images, arch):
    """The language model's norms and gating as (here: eagerly) compiled functions give the same tokens."""
    from capdpo.models.patches import fuse_text_elementwise

    lm = load_vlm(str(tiny_models[arch]))
    requests, gen = _requests(sample_images, 3), Generation(max_new_tokens=12)
    plain = Engine(lm, decoder="hf").generate(requests, gen)
    layers = lm.model.config.get_text_config().num_hidden_layers
    per_layer = 5 if arch == "qwen3vl" else 3  # 2 norms and an MLP per layer, Qwen3 also normalises q and k
    assert fuse_text_elementwise(lm.model, backend="eager") == per_layer * layers + 1
    attention = next(m for m in lm.model.model.language_model.modules() if type(m).__name__.endswith("Attention"))
    home = sys.modules[type(attention).__module__]
    assert home.apply_rotary_pos_emb.capdpo_plain.__module__ == home.__name__  # the rotary embedding is fused too
    fused = Engine(lm, decoder="static", prefill_rows=2).generate(requests, gen)
    assert [o.token_ids for o in fused] == [o.token_ids for o in plain]


@pytest.mark.parametrize("arch", ["strong", "qwen3vl", "llava"])
def test_static_decoder_with_joined_text_projections_is_token_identical(tiny_models, sample_images, arch, monkeypatch):
    """q/k/v and gate/up as one GEMM each for the decode steps (inputs of at most 8 rows here), apart for the prefill:
    same logits and tokens; the model keeps its parameters (names, shapes, values), and a projection called on
    another input still computes alone."""
    import torch.nn.functional as F

    from capdpo.models import patches
    from capdpo.models.patches import fuse_text_projections

    monkeypatch.setattr(patches, "JOINED_GEMM_MAX_ROWS", 8)
    joined_rows = []
    linear = F.linear
    monkeypatch.setattr(
        F,
        "linear",
        lambda x, w, b=None: (
            joined_rows.append((x.numel() // x.shape[-1], w.data_ptr(), w.shape[0])) or linear(x, w, b)
        ),
    )

    lm = load_vlm(str(tiny_models[arch]))
    requests, gen = _requests(sample_images, 3), Generation(max_new_tokens=12)
    plain = Engine(lm, decoder="hf").generate(requests, gen)
    state = {k: v.clone() for k, v in lm.model.state_dict().items()}
    text = lm.model.config.get_text_config()
    assert fuse_text_projections(lm.model) == 2 * text.num_hidden_layers
    assert fuse_text_projections(lm.model) == 0  # applied once
    after = lm.model.state_dict()
    assert list(after) == list(state) and all(torch.equal(after[k], v) for k, v in state.items())
    attention = next(m for m in lm.model.model.language_model.modules() if type(m).__name__.endswith("Attention"))
    x = torch.randn(2, 5, text.hidden_size)
    expected = torch.nn.functional.linear(x, attention.v_proj.weight, attention.v_proj.bias)
    assert torch.equal(attention.v_proj(x), expected)
    q, k, v = attention.q_proj(x), attention.k_proj(x), attention.v_proj(x)  # one GEMM, split
    assert torch.allclose(v, expected, atol=1e-6) and attention.q_proj.weight.shape[0] == q.shape[-1]
    assert k.shape[-1] == attention.k_proj.out_features
    joined_rows.clear()
    joined = Engine(lm, decoder="static", prefill_rows=2).generate(requests, gen)
    assert [o.token_ids for o in joined] == [o.token_ids for o in plain]
    q, k, v = (getattr(attention, name) for name in ("q_proj", "k_proj", "v_proj"))
    joined_weight = (q.weight.data_ptr(), q.out_features + k.out_features + v.out_features)
    assert (3, *joined_weight) in joined_rows  # a decode step of 3 rows: one GEMM
    assert any(rows > 8 and (ptr, out) == (k.weight.data_ptr(), k.out_features) for rows, ptr, out in joined_rows)
    assert not any(rows > 8 and (ptr, out) == joined_weight for rows, ptr, out in joined_rows)  # prefill: apart


def _flash_like_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """FlashAttention-2's semantics as transformers drives it, in plain torch: a 2-D mask shorter than the keys
    cuts them to its length (static caches); the mask's 1s are the real keys; each row's real queries attend to
    its real keys causally, aligned to the last real key; padded queries give zeros. Layout [B, L, heads, dim]."""
    batch, heads, q_len, _ = query.shape
    key = key.repeat_interleave(heads // key.shape[1], dim=1)
    value = value.repeat_interleave(heads // value.shape[1], dim=1)
    if attention_mask is not None:
        key, value = key[:, :, : attention_mask.shape[-1]], value[:, :, : attention_mask.shape[-1]]
    keys = torch.ones(batch, key.shape[2], dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    queries = keys[:, -q_len:]
    key_rank, query_rank = keys.cumsum(-1) - 1, queries.cumsum(-1) - 1
    offset = (keys.sum(-1) - queries.sum(-1))[:, None, None]
    allowed = keys[:, None, :] & queries[:, :, None] & (key_rank[:, None, :] <= query_rank[:, :, None] + offset)
    allowed |= ~queries[:, :, None]  # padded queries: any finite result, zeroed below
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=allowed[:, None], scale=scaling
    )
    return (out * queries[:, None, :, None]).transpose(1, 2).contiguous(), None


@pytest.mark.parametrize("arch", ["strong", "llava"])
def test_static_decoder_decodes_on_sdpa_when_the_model_uses_flash_attention(tiny_models, sample_images, arch):
    """A model loaded with FlashAttention (emulated here with its masking rules) decodes the static cache on SDPA:
    the same tokens as `generate` on FlashAttention, which the emulation reproduces, while FlashAttention's rules on
    the static cache would attend to positions not written yet and change them."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    import capdpo.generation.static_decoder as fastgen

    lm = load_vlm(str(tiny_models[arch]))
    requests, gen = _requests(sample_images, 3), Generation(max_new_tokens=16)
    on_sdpa = Engine(lm, decoder="hf").generate(requests, gen)
    text_config = lm.model.get_decoder().config if arch == "llava" else lm.model.model.language_model.config
    calls = []
    flash = ALL_ATTENTION_FUNCTIONS._global_mapping.get("flash_attention_2")
    ALL_ATTENTION_FUNCTIONS._global_mapping["flash_attention_2"] = lambda *a, **k: (
        calls.append(a[1].shape[2]) or _flash_like_attention(*a, **k)
    )
    assert "flash_attention_2" in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping
    text_config._attn_implementation_internal = "flash_attention_2"
    try:
        on_flash = Engine(lm, decoder="hf").generate(requests, gen)
        assert calls and [o.token_ids for o in on_flash] == [o.token_ids for o in on_sdpa]
        calls.clear()
        static = Engine(lm, decoder="static").generate(requests, gen)
        assert calls == [] and text_config._attn_implementation == "flash_attention_2"
        assert [o.token_ids for o in static] == [o.token_ids for o in on_flash]
        original = fastgen.masked_attention
        fastgen.masked_attention = lambda config: contextlib.nullcontext()
        try:
            unguarded = Engine(lm, decoder="static").generate(requests, gen)
        finally:
            fastgen.masked_attention = original
        assert calls and [o.token_ids for o in unguarded] != [o.token_ids for o in on_flash]
    finally:
        text_config._attn_implementation_internal = "sdpa"
        if flash is None:
            del ALL_ATTENTION_FUNCTIONS._global_mapping["flash_attention_2"]
        else:
            ALL_ATTENTION_FUNCTIONS._global_mapping["flash_attention_2"] = flash


def test_a_prepared_batch_is_tokenised_while_the_one_before_generates(strong, sample_images):
    """`Engine.prepare` tokenises the next batch in a worker while this one decodes: here the first batch's
    decoding waits until the second batch's tokenising has begun, which preparing after decoding never allows.
    The outputs are the ones of unprepared batches, and a batch never prepared still works."""
    import threading

    requests, gen = _requests(sample_images, 6), Generation(max_new_tokens=6)
    batches = [requests[:2], requests[2:4], requests[4:]]
    expected = [Engine(strong, decoder="static").generate(b, gen) for b in batches]

    engine = Engine(strong, decoder="static")
    decoding, begun = threading.Event(), threading.Event()
    encode, decode = engine.batcher.encode, engine.static.generate

    def encode_spy(batch):
        if batch[0].key == "r2":
            assert decoding.wait(timeout=20), "the next batch was tokenised before this one decoded, not meanwhile"
            begun.set()
        return encode(batch)

    def decode_spy(*args, **kwargs):
        if not decoding.is_set():
            decoding.set()
            assert begun.wait(timeout=20), "the next batch was not tokenised while this one decoded"
        return decode(*args, **kwargs)

    engine.batcher.encode, engine.static.generate = encode_spy, decode_spy
    engine.prepare(batches[0])
    engine.prepare(batches[1])
    got = [engine.generate(batches[0], gen), engine.generate(batches[1], gen), engine.generate(batches[2], gen)]
    assert [[o.token_ids for o in b] for b in got] == [[o.token_ids for o in b] for b in expected]
    assert not engine._prepared


@pytest.mark.parametrize("arch", ["strong", "qwen3vl", "llava"])
def test_requests_sharing_a_prompt_share_one_prefill_and_decode_as_if_alone(tiny_models, sample_images, arch):
    """Stage 3's k variants of a sentence (and stage 2's samples of an image) are requests with one image and one
    prompt: the static decoder prefills each distinct prompt once, in chunks too, and every request still gets the
    tokens it gets without sharing (its own seed; greedy rows agree)."""
    lm = load_vlm(str(tiny_models[arch]))
    base = _requests(sample_images, 3)
    # duplicates of r0 and r2 interleaved with r1 (different lengths, so left padding too), distinct seeds and keys
    order = [0, 1, 0, 2, 0, 2]
    batch = [
        Request(key=f"{base[i].key}:{j}", image=base[i].image, messages=base[i].messages, seed=100 + j)
        for j, i in enumerate(order)
    ]
    prefilled: list[int] = []
    for prefill_rows in (0, 2):
        shared = Engine(lm, decoder="static", prefill_rows=prefill_rows)
        apart = Engine(lm, decoder="static", prefill_rows=prefill_rows, share_prompts=False)
        prefill = shared.static._prefill
        shared.static._prefill = lambda inputs, *a, run=prefill: (
            prefilled.append(len(inputs["input_ids"])) or run(inputs, *a)
        )
        for gen in (
            Generation(max_new_tokens=12),
            Generation(max_new_tokens=12, temperature=1.0, top_p=0.95, repetition_penalty=1.1),
        ):
            ours, theirs = shared.generate(batch, gen), apart.generate(batch, gen)
            assert [o.key for o in ours] == [r.key for r in batch]
            assert [o.token_ids for o in ours] == [o.token_ids for o in theirs]
            assert [o.finish_reason for o in ours] == [o.finish_reason for o in theirs]
            if gen.temperature == 0:
                assert ours[0].token_ids == ours[2].token_ids == ours[4].token_ids
            else:  # one prompt, its own seed: the samples differ
                assert len({tuple(ours[i].token_ids) for i in (0, 2, 4)}) > 1
    assert prefilled == [3, 3, 3, 3]  # three distinct prompts per batch, never six
    assert Engine(lm, decoder="hf").share_prompts is False


@pytest.mark.parametrize("arch", ["strong", "llava"])
def test_the_prefill_attends_to_the_prompt_keys_only_on_grouped_query_sdpa(
    tiny_models, sample_images, arch, monkeypatch
):
    """The static cache holds prompt + answer slots; the prefill's attention reads the prompt's slots only, and a
    left-padded batch (a mask) runs on the folded grouped-query SDPA instead of copying each key/value head per
    query head. The answers stay those of `generate` (left padding included)."""
    import capdpo.generation.attention as attention

    seen = []
    folded = attention.folded_sdpa_attention

    def spy(module, query, key, value, attention_mask, *args, **kwargs):
        seen.append((query.shape[2], key.shape[2], attention_mask is not None))
        return folded(module, query, key, value, attention_mask, *args, **kwargs)

    monkeypatch.setattr(attention, "folded_sdpa_attention", spy)
    lm = load_vlm(str(tiny_models[arch]))
    text = lm.model.config.get_text_config()
    assert (text.num_key_value_heads < text.num_attention_heads) == (arch == "strong")  # LLaVA's: no grouped heads
    gen = Generation(max_new_tokens=8)
    padded = _requests(sample_images, 3)  # prompts of three lengths
    fast, plain = Engine(lm, decoder="static"), Engine(lm, decoder="hf")
    assert [o.token_ids for o in fast.generate(padded, gen)] == [o.token_ids for o in plain.generate(padded, gen)]
    prompt_len = fast.batcher.encode(padded)["input_ids"].shape[1]
    layers = text.num_hidden_layers
    assert seen == [(prompt_len, prompt_len, True)] * layers  # the prefill only: decode steps stay on plain SDPA
    seen.clear()
    same = [Request(key=f"s{i}", image=padded[0].image, messages=padded[0].messages, seed=i) for i in range(2)]
    fast.share_prompts = False  # two rows without padding: the causal path, no mask
    fast.generate(same, gen)
    assert [keys == queries and not masked for queries, keys, masked in seen] == [True] * layers
