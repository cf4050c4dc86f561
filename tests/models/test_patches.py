import pytest
import torch

from capdpo.models.patches import _grouped_vision_attention


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen3_vl"])
def test_grouped_vision_attention_equals_the_per_chunk_loop(arch):
    if arch == "qwen2_5_vl":
        from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as mod

        cls, cfg = mod.Qwen2_5_VLVisionAttention, mod.Qwen2_5_VLVisionConfig(hidden_size=32, num_heads=2)
    else:
        from transformers.models.qwen3_vl import modeling_qwen3_vl as mod

        cls, cfg = mod.Qwen3VLVisionAttention, mod.Qwen3VLVisionConfig(hidden_size=32, num_heads=2)
    cfg._attn_implementation = "sdpa"
    original = getattr(cls.forward, "__wrapped_original__", cls.forward)
    torch.manual_seed(0)
    layer = cls(cfg).eval()
    grouped = _grouped_vision_attention(original, mod.apply_rotary_pos_emb_vision)
    for bounds in ([0, 16, 32, 48, 64], [0, 16, 32, 40, 56, 60, 64]):  # equal windows; mixed sizes
        cu = torch.tensor(bounds, dtype=torch.int32)
        x = torch.randn(64, 32)
        angle = torch.randn(64, 8)
        emb = torch.cat([angle, angle], -1)
        pos = (emb.cos(), emb.sin())
        with torch.no_grad():
            expected = original(layer, x, cu, pos)
            got = grouped(layer, x, cu, pos)
            again = grouped(layer, x, cu, pos)  # the window plan (and index) worked out by the first call
        assert torch.allclose(got, expected, atol=1e-5), bounds
        assert torch.equal(again, got), bounds


def test_vision_windows_are_read_from_the_device_once_per_forward(monkeypatch):
    """Every block of a Qwen2.5-VL vision forward gets one of two window layouts (windowed, full): each is read
    from the device once, not once per block (each read waits for all the queued work)."""
    import sys

    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from capdpo.models.patches import use_grouped_vision_attention

    vision = dict(depth=6, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32, window_size=56,
                  fullatt_block_indexes=[2, 5])  # fmt: skip
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=128, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3]})  # fmt: skip
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision)).eval()
    use_grouped_vision_attention()
    grid = torch.tensor([[1, 8, 8], [1, 8, 12]])
    pixels = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 14 * 14)
    tolist = torch.Tensor.tolist
    reads = []

    def counting(self):
        reads.append(sys._getframe(1).f_globals["__name__"])
        return tolist(self)

    with torch.no_grad():
        monkeypatch.setattr(torch.Tensor, "tolist", counting)
        for _ in range(2):  # a fresh forward makes fresh layouts, read again
            model.model.visual(pixels, grid_thw=grid)
    assert reads.count("capdpo.models.patches") == 2 * 2


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen3_vl"])
def test_linear_patch_embedding_is_the_same_function(arch):
    from capdpo.models.patches import linear_patch_embedding

    if arch == "qwen2_5_vl":
        from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as mod

        embed = mod.Qwen2_5_VisionPatchEmbed(patch_size=14, temporal_patch_size=2, in_channels=3, embed_dim=16)
    else:
        from transformers.models.qwen3_vl import modeling_qwen3_vl as mod

        embed = mod.Qwen3VLVisionPatchEmbed(mod.Qwen3VLVisionConfig(hidden_size=16, patch_size=14))
    torch.manual_seed(0)
    for p in embed.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(10, 3 * 2 * 14 * 14)
    with torch.no_grad():
        expected = embed(x)
        assert linear_patch_embedding(torch.nn.Sequential(embed)) == 1
        got = embed(x)
    assert got.shape == expected.shape == (10, 16)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen3_vl"])
def test_cuda_inference_tunings_keep_the_vision_tower_and_model_outputs(arch):
    """Padded MLP, matmul patch embedding, compiled elementwise parts (dynamo with the eager backend on CPU):
    the vision features and the model's logits stay the same (float32)."""
    from capdpo.models import patches as models

    if arch == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig as Config
        from transformers import Qwen2_5_VLForConditionalGeneration as Model

        vision = dict(depth=2, hidden_size=32, intermediate_size=60, num_heads=2, out_hidden_size=32, window_size=56,
                      fullatt_block_indexes=[1])  # fmt: skip
    else:
        from transformers import Qwen3VLConfig as Config
        from transformers import Qwen3VLForConditionalGeneration as Model

        vision = dict(depth=2, hidden_size=32, intermediate_size=60, num_heads=2, out_hidden_size=32,
                      deepstack_visual_indexes=[0])  # fmt: skip
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=128, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3]})  # fmt: skip
    torch.manual_seed(0)
    model = Model(Config(text_config=text, vision_config=vision)).eval()
    models.use_grouped_vision_attention()
    grid = torch.tensor([[1, 4, 4], [1, 4, 8]])
    side = model.config.vision_config.patch_size
    pixels = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * side * side)
    with torch.no_grad():
        expected = model.model.visual(pixels, grid_thw=grid)
    assert models.linear_patch_embedding(model) == 1
    assert models.pad_vision_mlp(model) == (2 if arch == "qwen2_5_vl" else 0)  # Qwen3-VL has no gated MLP
    assert models.fuse_vision_elementwise(model, backend="eager") >= 2
    with torch.no_grad():
        got = model.model.visual(pixels, grid_thw=grid)

    def features(out):  # a tensor, or an output object (Qwen3-VL) whose pooler_output holds the merged features
        return getattr(out, "pooler_output", out)

    assert features(got).shape == features(expected).shape
    assert torch.allclose(features(got), features(expected), atol=1e-5)


def test_a_padded_vision_mlp_saves_and_loads_at_its_original_width(tmp_path):
    """The padded model's state dict is the original one (keys, shapes, values); the original state loads into a
    padded model; `save_pretrained` writes a checkpoint that loads as the original model."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from capdpo.models.patches import pad_vision_mlp

    vision = dict(depth=2, hidden_size=32, intermediate_size=60, num_heads=2, out_hidden_size=32, window_size=56,
                  fullatt_block_indexes=[1])  # fmt: skip
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=128, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3]})  # fmt: skip
    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    assert pad_vision_mlp(model) == 2
    assert model.model.visual.blocks[0].mlp.down_proj.weight.shape == (32, 128)
    state = model.state_dict()
    assert state.keys() == original.keys()
    for key, value in original.items():
        assert state[key].shape == value.shape and torch.equal(state[key], value), key

    other = Qwen2_5_VLForConditionalGeneration(config).eval()  # other random weights
    assert pad_vision_mlp(other) == 2
    other.load_state_dict(original)  # strict: every key at its original width
    grid = torch.tensor([[1, 4, 4]])
    pixels = torch.randn(16, 3 * 2 * 14 * 14)
    with torch.no_grad():
        expected = model.model.visual(pixels, grid_thw=grid).pooler_output
        assert torch.equal(other.model.visual(pixels, grid_thw=grid).pooler_output, expected)
        assert other.model.visual.blocks[1].mlp.gate_proj.weight[60:].abs().sum() == 0

    model.save_pretrained(tmp_path, safe_serialization=True)
    reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert reloaded.model.visual.blocks[0].mlp.up_proj.weight.shape == (60, 32)
    with torch.no_grad():
        assert torch.allclose(reloaded.model.visual(pixels, grid_thw=grid).pooler_output, expected, atol=1e-6)


def test_zero3_partitioned_weights_are_left_as_they_are():
    """ZeRO-3 marks each partitioned parameter (`ds_id`); no patch may reshape it or replace its module's call."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from capdpo.models.patches import compile_decoder_layers, pad_vision_mlp, tune_for_training

    vision = dict(depth=2, hidden_size=32, intermediate_size=60, num_heads=2, out_hidden_size=32, window_size=56,
                  fullatt_block_indexes=[1])  # fmt: skip
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=128, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3]})  # fmt: skip
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision)

    def partitioned():  # noqa: ANN202
        model = Qwen2_5_VLForConditionalGeneration(config).eval()
        for i, p in enumerate(model.parameters()):
            p.requires_grad_(False)
            p.ds_id = i
        return model

    model = partitioned()
    assert pad_vision_mlp(model) == 0 and compile_decoder_layers(model, backend="eager") == 0
    assert model.model.visual.blocks[0].mlp.gate_proj.weight.shape == (60, 32)
    assert all(getattr(layer, "_compiled_call_impl", None) is None for layer in model.model.language_model.layers)
    tuned = partitioned()
    changed = tune_for_training(tuned, cuda=False, backend="eager", compile_layers=True)
    assert "patch_embedding" not in changed and "vision_mlp" not in changed and changed["compiled_layers"] == 0
    plain = Qwen2_5_VLForConditionalGeneration(config).eval()
    assert pad_vision_mlp(plain) == 2 and compile_decoder_layers(plain, backend="eager") == 2  # the control


def test_decoder_layers_whose_compiler_fails_run_eagerly(capsys):
    """A backend that fails: one message, and every layer gives the eager output from then on."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from capdpo.models.patches import compile_decoder_layers

    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=128, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3]})  # fmt: skip
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32)
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision)).eval()
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    calls = []

    def broken(graph, example_inputs):  # noqa: ANN001
        calls.append(1)
        raise RuntimeError("no compiler here")

    torch._dynamo.reset()
    assert compile_decoder_layers(model, backend=broken) == 2
    with torch.no_grad():
        got = model(input_ids=ids).logits
        again = model(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-6) and torch.allclose(again, expected, atol=1e-6)
    assert len(calls) == 1, "after the first failure no layer compiles again"
    out = capsys.readouterr().out
    assert out.count("torch.compile failed for the decoder layers") == 1 and "broken" in out


def test_compiled_vision_blocks_give_the_eager_tower_and_fall_back_when_the_compiler_fails(capsys):
    """The vision blocks compiled whole (AOTAutograd on CPU: the graph inductor would get) give the eager features for
    two image batches of different sizes; with a failing backend, one message and the eager features."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from capdpo.models.patches import compile_vision_blocks, use_grouped_vision_attention

    use_grouped_vision_attention()
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=128, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3]})  # fmt: skip
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                  fullatt_block_indexes=[1], window_size=56)  # fmt: skip
    grids = (torch.tensor([[1, 8, 8], [1, 8, 12], [1, 8, 8]]), torch.tensor([[1, 8, 12], [1, 16, 8]]))
    for backend, fails in (("aot_eager", False), ("broken", True)):
        torch.manual_seed(0)
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision)
        config.vision_config._attn_implementation = "sdpa"
        model = Qwen2_5_VLForConditionalGeneration(config).eval()
        tower = model.model.visual
        pixels = [torch.randn(int(g.prod(-1).sum()), 3 * 2 * 14 * 14) for g in grids]
        with torch.no_grad():
            expected = [tower(p, grid_thw=g).pooler_output for p, g in zip(pixels, grids)]

        def broken(graph, example_inputs):  # noqa: ANN001
            raise RuntimeError("no compiler here")

        torch._dynamo.reset()
        assert compile_vision_blocks(model, backend=broken if fails else backend) == 2
        with torch.no_grad():
            got = [tower(p, grid_thw=g).pooler_output for p, g in zip(pixels, grids)]
        for g, e in zip(got, expected):
            assert g.shape == e.shape and torch.allclose(g, e, atol=1e-5), backend
        assert capsys.readouterr().out.count("torch.compile failed for the vision blocks") == int(fails)


def test_decoder_layers_whose_backward_compiler_fails_train_eagerly(capsys):
    """A backend whose forward compiles and whose backward fails: the failure comes with the forward's compilation
    (not in the middle of the backward pass), and the loss and every gradient are the eager ones."""
    from torch._dynamo.backends.common import aot_autograd
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from capdpo.models.patches import compile_decoder_layers

    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=128, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3]})  # fmt: skip
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32)
    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision)
    model = Qwen2_5_VLForConditionalGeneration(config).train()
    ids = torch.randint(0, 128, (2, 7))

    def step() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad()
        loss = model(input_ids=ids).logits.float().pow(2).mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    expected_loss, expected_grads = step()
    compiled = []

    def forward_compiler(graph, example_inputs):  # noqa: ANN001
        compiled.append("forward")
        return graph

    def backward_compiler(graph, example_inputs):  # noqa: ANN001
        compiled.append("backward")
        raise RuntimeError("no backward compiler here")

    torch._dynamo.reset()
    assert (
        compile_decoder_layers(
            model, backend=aot_autograd(fw_compiler=forward_compiler, bw_compiler=backward_compiler)
        )
        == 2
    )
    loss, grads = step()
    again, _ = step()
    assert compiled == ["forward", "backward"], "compiled once, the backward with the forward"
    assert torch.allclose(loss, expected_loss, atol=1e-6) and torch.allclose(again, expected_loss, atol=1e-6)
    assert grads.keys() == expected_grads.keys() and len(grads) > 10
    for name, grad in grads.items():
        assert torch.allclose(grad, expected_grads[name], atol=1e-6), name
    assert capsys.readouterr().out.count("torch.compile failed for the decoder layers") == 1


def test_a_failing_compiler_falls_back_to_the_eager_function(capsys):
    from capdpo.models.patches import _CompiledOrEager, _silu_mul

    def broken(graph, example_inputs):
        raise RuntimeError("no working compiler")

    fused = _CompiledOrEager(_silu_mul, broken)
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    assert torch.equal(fused(a, b), _silu_mul(a, b))
    assert fused.compiled is None and "running it eagerly" in capsys.readouterr().out
    assert torch.equal(fused(b, a), _silu_mul(b, a))  # later calls: eager, no new message
    assert capsys.readouterr().out == ""


def test_inputs_past_the_recompile_limit_run_eagerly_and_compiled_variants_stay_compiled():
    from capdpo.models.patches import _CompiledOrEager, _rms_norm

    compiles = []

    def counting(graph, example_inputs):
        compiles.append(len(example_inputs))
        return graph.forward

    fused = _CompiledOrEager(_rms_norm, counting, site="limit")
    weight = torch.randn(8)
    two, seven, three = torch.randn(5, 8), torch.randn(7, 8), torch.randn(2, 5, 8)
    with torch._dynamo.config.patch(recompile_limit=2):
        torch._dynamo.reset()
        assert torch.allclose(fused(two, weight, 1e-6), _rms_norm(two, weight, 1e-6))
        assert torch.allclose(fused(seven, weight, 1e-6), _rms_norm(seven, weight, 1e-6))  # the row count symbolic
        assert len(compiles) == 2
        # a rank-3 input needs a third variant: over the limit of two, so it runs eagerly instead of failing
        assert torch.allclose(fused(three, weight, 1e-6), _rms_norm(three, weight, 1e-6))
        assert fused.compiled is not None and len(fused.eager_kinds) == 1
        assert len(compiles) == 2
        nine = torch.randn(9, 8)
        assert torch.allclose(fused(nine, weight, 1e-6), _rms_norm(nine, weight, 1e-6))
        assert len(compiles) == 2  # rank 2 again (another size): the compiled variant, not a new one
    torch._dynamo.reset()


def test_each_call_site_keeps_its_constant_widths_and_makes_only_changing_sizes_symbolic():
    """Compiled per call site with torch's automatic dynamic shapes: a site's first call compiles for its sizes, a
    size that changes becomes symbolic, a width that never changes stays a constant, and one site's inputs (rank 2)
    do not turn another's (rank 3) sizes symbolic."""
    from capdpo.models.patches import _CompiledOrEager, _rms_norm

    graphs = []

    def recording(site):
        def backend(graph, example_inputs):
            shapes = [n.meta["example_value"] for n in graph.graph.nodes if n.op == "placeholder"]
            graphs.append((site, [tuple(str(d) for d in v.shape) for v in shapes if isinstance(v, torch.Tensor)]))
            return graph.forward

        return backend

    torch._dynamo.reset()
    vision = _CompiledOrEager(_rms_norm, recording("vision"), site="vision_test")
    text = _CompiledOrEager(_rms_norm, recording("text"), site="text_test")
    weight = torch.randn(8)
    for rows in (5, 7, 9):
        x = torch.randn(rows, 8)
        assert torch.equal(vision(x, weight, 1e-6), _rms_norm(x, weight, 1e-6))
    for shape in ((2, 5, 8), (3, 6, 8), (4, 7, 8)):
        x = torch.randn(shape)
        assert torch.equal(text(x, weight, 1e-6), _rms_norm(x, weight, 1e-6))
    vision_graphs = [shapes for site, shapes in graphs if site == "vision"]
    text_graphs = [shapes for site, shapes in graphs if site == "text"]
    assert vision_graphs[0] == [("5", "8"), ("8",)]  # the first call: its sizes as constants
    assert len(vision_graphs) == 2 and vision_graphs[1][0][1] == "8" and not vision_graphs[1][0][0].isdigit()
    assert text_graphs[0] == [("2", "5", "8"), ("8",)]  # not made symbolic by the other site's calls
    assert len(text_graphs) == 2 and text_graphs[1][0][2] == "8"
    assert not any(d.isdigit() for d in text_graphs[1][0][:2])  # rows and tokens symbolic
    torch._dynamo.reset()


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "qwen2"])
def test_fused_text_rotary_is_transformers_function_with_its_gradients(family):
    """The language model's rotary embedding as one compiled kernel per tensor computes transformers' function:
    values and gradients in float32, for the non-contiguous [batch, heads, tokens, dim] views attention passes."""
    import importlib

    from capdpo.models.patches import _fuse_text_rotary

    home = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    plain = home.apply_rotary_pos_emb
    attention = type("Qwen2_5_VLAttention", (torch.nn.Module,), {"__module__": home.__name__})
    assert _fuse_text_rotary(torch.nn.ModuleList([attention(), attention()]), "eager") == [home.__name__]
    fused = home.apply_rotary_pos_emb
    assert fused is not plain and fused.capdpo_plain is plain
    assert _fuse_text_rotary(torch.nn.ModuleList([attention()]), "eager") == [home.__name__]  # no double wrap
    assert home.apply_rotary_pos_emb.capdpo_plain is plain

    torch.manual_seed(0)
    batch, heads, kv_heads, tokens, dim = 2, 4, 2, 5, 16
    q = torch.randn(batch, tokens, heads, dim).transpose(1, 2).requires_grad_()
    k = torch.randn(batch, tokens, kv_heads, dim).transpose(1, 2).requires_grad_()
    cos, sin = torch.randn(2, batch, tokens, dim).unbind(0)
    weights = torch.randn(batch, heads, tokens, dim), torch.randn(batch, kv_heads, tokens, dim)
    results = []
    for function in (plain, home.apply_rotary_pos_emb):
        q_out, k_out = function(q, k, cos, sin)
        ((q_out * weights[0]).sum() + (k_out * weights[1]).sum()).backward()
        results.append((q_out.detach(), k_out.detach(), q.grad.clone(), k.grad.clone()))
        q.grad = k.grad = None
    for expected, got in zip(*results):
        assert (got - expected).abs().max().item() < 1e-6
    # another layout than the attention modules use goes to transformers' function itself
    q4, k4 = torch.randn(batch, tokens, heads, dim), torch.randn(batch, tokens, kv_heads, dim)
    for expected, got in zip(plain(q4, k4, cos, sin, 2), home.apply_rotary_pos_emb(q4, k4, cos, sin, 2)):
        assert torch.equal(got, expected)
