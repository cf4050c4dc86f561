"""Training speed-ups (`capdpo.models.patches.tune_for_training`) against the plain modules: the LoRA update inside
the B GEMM, the frozen vision tower's matmul patch embedding and padded MLP, and the compiled norms / gating (dynamo
with the eager backend on CPU) give the same log-probs, loss and
gradients as PEFT's and transformers' own forwards in fp32, for Qwen2.5-VL, Qwen3-VL and LLaVA."""

from __future__ import annotations

import pytest
import torch

from capdpo.models.lora import fuse_lora_updates
from capdpo.models.patches import tune_for_training
from capdpo.training.data import pair_to_example
from capdpo.training.trainer import hf_model
from tests.training.test_dpo import _set_lora_b, _trainer
from tests.training.test_packing import _left_padded, _pairs, _step


def _peft_forward_back(model: torch.nn.Module) -> int:
    """Undo `fuse_lora_updates`: PEFT's own forward on every layer it changed."""
    restored = 0
    for module in model.modules():
        if "_capdpo_peft_forward" in vars(module):
            module.forward = vars(module).pop("_capdpo_peft_forward")
            restored += 1
    return restored


def _assert_same(a: tuple, b: tuple, what: str) -> None:
    loss_a, grads_a, metrics_a, logps_a = a
    loss_b, grads_b, metrics_b, logps_b = b
    assert loss_a == pytest.approx(loss_b, abs=1e-5), what
    assert torch.allclose(logps_a, logps_b, atol=1e-5), what
    assert metrics_a.keys() == metrics_b.keys()
    for name, value in metrics_b.items():
        # abs 1e-5, or relative 1e-6 for sums of many log-probs (float32 rounding of a ~200 magnitude)
        assert metrics_a[name] == pytest.approx(value, abs=1e-5, rel=1e-6), (what, name)
    assert grads_a.keys() == grads_b.keys() and any("lora_A" in n for n in grads_a)
    for name, grad in grads_b.items():
        assert torch.allclose(grads_a[name], grad, atol=1e-5, rtol=1e-4), (what, name)


@pytest.mark.parametrize("family", ["strong", "qwen3vl", "llava"])
def test_training_kernels_give_the_plain_step(tiny_models, sample_images, tmp_path, family: str) -> None:
    pairs = _pairs(sample_images[:2])
    trainer = _trainer(tiny_models[family], tmp_path, pairs, precompute_ref=True)
    model = hf_model(trainer.model)
    layers = model.config.get_text_config().num_hidden_layers
    # on CPU: the LoRA update, and the frozen vision tower's patch embedding and MLP padding (Qwen-VL only)
    vision_mlps = model.config.vision_config.depth if family == "strong" else 0  # Qwen3-VL's MLP is not gated
    assert trainer.tuned == {"lora": 7 * layers, "patch_embedding": int(family != "llava"), "vision_mlp": vision_mlps}
    _set_lora_b(trainer.model)
    right = trainer._prepare_inputs(trainer.data_collator([pair_to_example(p) for p in pairs]))
    for batch in (right, _left_padded(right)):
        for share_prompt in (True, False):
            fused = _step(trainer, batch, share_prompt=share_prompt)
            assert _peft_forward_back(model) == 7 * layers
            plain = _step(trainer, batch, share_prompt=share_prompt)
            assert abs(plain[0] - 0.6931) > 1e-3, "policy and reference must differ for the gradients to mean much"
            _assert_same(fused, plain, f"lora update, share_prompt={share_prompt}")
            assert fuse_lora_updates(model) == 7 * layers


@pytest.mark.parametrize("family", ["strong", "qwen3vl", "llava"])
def test_compiled_norms_and_gating_equal_a_fresh_plain_model(tiny_models, sample_images, tmp_path, family) -> None:
    pairs = _pairs(sample_images[:2])
    plain_trainer = _trainer(tiny_models[family], tmp_path / "plain", pairs, precompute_ref=True, fused_kernels=False)
    tuned_trainer = _trainer(tiny_models[family], tmp_path / "tuned", pairs, precompute_ref=True)
    for trainer in (plain_trainer, tuned_trainer):
        _set_lora_b(trainer.model)
    tuned = hf_model(tuned_trainer.model)
    if family == "strong":  # the padding is in place (the MLP width is not a multiple of 128 in the plain model)
        plain_mlp = hf_model(plain_trainer.model).model.visual.blocks[0].mlp
        tuned_mlp = tuned.model.visual.blocks[0].mlp
        assert plain_mlp.up_proj.out_features % 128 != 0 and tuned_mlp.up_proj.out_features % 128 == 0
    changed = tune_for_training(tuned, cuda=False, backend="eager")
    layers = tuned.config.get_text_config().num_hidden_layers
    per_layer = 5 if family == "qwen3vl" else 3  # 2 norms and an MLP per layer, Qwen3 also normalises q and k
    assert changed["lora"] == 0 and changed["vision_mlp"] == 0, "each module is changed once"
    assert changed["text"] == per_layer * layers + 1
    assert (changed["vision"] > 0) == (family != "llava")  # LLaVA's CLIP tower has no RMSNorm or SiLU gating
    right = plain_trainer._prepare_inputs(plain_trainer.data_collator([pair_to_example(p) for p in pairs]))
    for batch in (right, _left_padded(right)):
        tuned_step, plain_step = _step(tuned_trainer, batch, True), _step(plain_trainer, batch, True)
        assert abs(plain_step[0] - 0.6931) > 1e-3
        _assert_same(tuned_step, plain_step, "all training kernels")


@pytest.mark.parametrize("family", ["strong", "llava"])  # Qwen3-VL's layers are Qwen2.5-VL's plus q/k norms
def test_compiled_layers_under_recomputation_give_the_plain_step(tiny_models, sample_images, tmp_path, family) -> None:
    """Each language-model layer compiled whole (AOTAutograd on CPU: the graphs inductor would get), with gradient
    checkpointing traced inside the compiled region and the other training kernels inside it too."""
    import torch._dynamo

    from capdpo.models.patches import compile_decoder_layers

    pairs = _pairs(sample_images[:2])
    plain_trainer = _trainer(tiny_models[family], tmp_path / "plain", pairs, precompute_ref=True, fused_kernels=False)
    tuned_trainer = _trainer(tiny_models[family], tmp_path / "tuned", pairs, precompute_ref=True)
    for trainer in (plain_trainer, tuned_trainer):
        _set_lora_b(trainer.model)
        hf_model(trainer.model).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    tuned = hf_model(tuned_trainer.model)
    layers = tuned.config.get_text_config().num_hidden_layers
    assert tune_for_training(tuned, cuda=False, backend="eager")["text"] > 0
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # counts of this test's compilations only
    assert compile_decoder_layers(tuned, backend="aot_eager") == layers
    language_model = tuned.model.language_model
    assert all(layer.gradient_checkpointing for layer in language_model.layers)
    calls = []
    language_model.layers[0].register_forward_hook(lambda *_: calls.append(1))
    right = plain_trainer._prepare_inputs(plain_trainer.data_collator([pair_to_example(p) for p in pairs]))
    for batch in (right, _left_padded(right)):
        tuned_step, plain_step = _step(tuned_trainer, batch, True), _step(plain_trainer, batch, True)
        assert abs(plain_step[0] - 0.6931) > 1e-3
        _assert_same(tuned_step, plain_step, "compiled layers")
    assert calls, "the layers ran"
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])


def test_lora_update_falls_back_to_peft_where_it_cannot_fuse() -> None:
    """Dropout in train mode (same random mask), disabled adapters, two active adapters, mixed dtypes: PEFT's
    result every time; a layer with a LoRA bias is left to PEFT too."""
    from peft import LoraConfig, get_peft_model

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj = torch.nn.Linear(16, 24)
            self.o_proj = torch.nn.Linear(24, 8, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.o_proj(torch.relu(self.q_proj(x)))

    torch.manual_seed(0)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.2, target_modules=["q_proj", "o_proj"])
    net = get_peft_model(Net(), cfg, autocast_adapter_dtype=False)
    _set_lora_b(net, scale=0.3)
    x = torch.randn(3, 5, 16)

    def both(run) -> tuple[torch.Tensor, torch.Tensor]:
        _peft_forward_back(net)
        torch.manual_seed(1)
        plain = run()
        assert fuse_lora_updates(net) == 2
        torch.manual_seed(1)
        return run(), plain

    net.train()
    fused, plain = both(lambda: net(x))
    assert torch.allclose(fused, plain, atol=1e-6) and not torch.allclose(fused, net.get_base_model()(x), atol=1e-3)
    with net.disable_adapter():
        fused, plain = both(lambda: net(x))
    assert torch.allclose(fused, plain, atol=1e-6)
    net.eval()
    net.add_adapter("second", cfg)
    _set_lora_b(net, scale=0.3)
    net.base_model.set_adapter(["default", "second"])
    fused, plain = both(lambda: net(x))
    assert torch.allclose(fused, plain, atol=1e-6)
    net.base_model.set_adapter("default")
    layer = net.base_model.model.q_proj
    layer.lora_A["default"].to(torch.float64)  # an adapter in another dtype than its input: PEFT casts the input
    layer.lora_B["default"].to(torch.float64)
    fused, plain = both(lambda: net(x))
    assert torch.allclose(fused, plain, atol=1e-6) and fused.dtype == torch.float32

    biased = get_peft_model(Net(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], lora_bias=True))
    _set_lora_b(biased, scale=0.3)
    assert fuse_lora_updates(biased) == 1
    fused = biased(x)
    _peft_forward_back(biased)
    assert torch.allclose(fused, biased(x), atol=1e-6)


def test_fused_kernels_off_leaves_the_library_modules(tiny_models, sample_images, tmp_path) -> None:
    trainer = _trainer(tiny_models["strong"], tmp_path, _pairs(sample_images[:2])[:1], fused_kernels=False)
    assert trainer.tuned == {}
    assert not any("_capdpo_peft_forward" in vars(m) for m in trainer.model.modules())


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_lora_update_under_autocast_skips_the_float32_copies() -> None:
    """A run without DeepSpeed: bf16 base, float32 adapter (PEFT's default), bf16 autocast. The fused path runs
    (PEFT's forward is never called) and gives PEFT's output and adapter gradients within bf16 rounding."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(64, 96, bias=False), torch.nn.SiLU(), torch.nn.Linear(96, 32))
    net = get_peft_model(base.to(torch.bfloat16), LoraConfig(r=8, lora_alpha=16, target_modules=["0", "2"]))
    assert {p.dtype for n, p in net.named_parameters() if "lora_" in n} == {torch.float32}
    _set_lora_b(net, scale=0.3)
    x = torch.randn(4, 7, 64, dtype=torch.bfloat16)

    def run() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        net.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(x)
        out.float().square().mean().backward()
        return out, {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}

    plain, plain_grads = run()
    with torch.no_grad(), net.disable_adapter(), torch.autocast("cpu", dtype=torch.bfloat16):
        without = net(x)
    assert fuse_lora_updates(net) == 2
    peft_calls = []
    for module in net.modules():
        if "_capdpo_peft_forward" in vars(module):
            original = module._capdpo_peft_forward
            module._capdpo_peft_forward = lambda *a, _f=original, **k: peft_calls.append(1) or _f(*a, **k)
    fused, fused_grads = run()
    assert peft_calls == [], "the fused path must run under autocast"
    assert fused.dtype == plain.dtype == torch.bfloat16
    assert _relative_error(without, plain) > 0.1, "the adapter must change the output"
    assert _relative_error(fused, plain) < 1e-2
    assert fused_grads.keys() == plain_grads.keys() and len(plain_grads) == 4
    for name, grad in plain_grads.items():
        assert fused_grads[name].dtype == torch.float32
        assert _relative_error(fused_grads[name], grad) < 2e-2, name
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a float32 input under autocast is left to PEFT: the first
        net(x.float())  # layer's (the second gets the first's bf16 output)
    assert peft_calls == [1]
