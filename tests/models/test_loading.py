import pytest
import torch

from capdpo.errors import ConfigError, InputError
from capdpo.models.loading import load_vlm
from capdpo.models.lora import lora_target_regex


@pytest.mark.parametrize(("name", "family"), [("strong", "qwen2_5_vl"), ("qwen3vl", "qwen3_vl"), ("llava", "llava")])
def test_each_architecture_loads_in_fp32_on_cpu(tiny_models, name, family):
    lm = load_vlm(str(tiny_models[name]))
    assert lm.family == family and lm.dtype == torch.float32 and lm.device.type == "cpu"
    assert lm.tokenizer.padding_side == "left"
    assert lm.end_of_turn_ids()


def test_missing_model_path_and_fp16_are_refused(tmp_path, tiny_models):
    with pytest.raises(InputError, match="neither a local model folder nor a hub id"):
        load_vlm(str(tmp_path / "nope" / "model"), field="strong_model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no config.json"):
        load_vlm(str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="float16"):
        load_vlm(str(tiny_models["strong"]), dtype="float16")


def test_lora_targets_never_include_the_vision_tower(tiny_models):
    import re

    lm = load_vlm(str(tiny_models["strong"]))
    pattern = re.compile(lora_target_regex(lm.model))
    names = [n for n, m in lm.model.named_modules() if isinstance(m, torch.nn.Linear)]
    vision_mlp = [n for n in names if "visual" in n and n.endswith(("gate_proj", "up_proj", "down_proj"))]
    assert vision_mlp, "the tiny Qwen2.5-VL should have vision MLP layers with language-model names"
    assert not any(pattern.match(n) for n in vision_mlp)
    language = [n for n in names if "language_model" in n and n.endswith(("q_proj", "down_proj"))]
    assert language and all(pattern.match(n) for n in language)
    with_vision = re.compile(lora_target_regex(lm.model, include_vision=True))
    assert all(with_vision.match(n) for n in vision_mlp)


def test_dtype_is_bf16_on_gpu_fp32_on_cpu_and_never_fp16(tiny_models):
    from capdpo.models.loading import resolve_dtype

    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16  # only the device's type is read
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    for fp16 in ("float16", "fp16"):
        with pytest.raises(ConfigError, match="float16"):
            resolve_dtype(fp16, torch.device("cuda", 0))
    lm = load_vlm(str(tiny_models["strong"]), dtype="bfloat16")
    assert lm.dtype == torch.bfloat16 and {p.dtype for p in lm.model.parameters()} == {torch.bfloat16}


def test_attention_kernel_choice(tiny_models, monkeypatch):
    import importlib.util

    from capdpo.models import loading

    assert loading.resolve_attention("auto", torch.device("cpu")) == "sdpa"
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        loading.importlib.util, "find_spec", lambda n: None if n == "flash_attn" else real_find_spec(n)
    )
    assert loading.resolve_attention("auto", torch.device("cuda", 0)) == "sdpa"  # no flash-attn installed
    with pytest.raises(ConfigError, match="flash-attn"):
        loading.resolve_attention("flash_attention_2", torch.device("cuda", 0))
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda n: object() if n == "flash_attn" else None)
    assert loading.resolve_attention("auto", torch.device("cuda", 0)) == "flash_attention_2"
    assert loading.resolve_attention("auto", torch.device("cpu")) == "sdpa"  # FlashAttention is GPU-only
    monkeypatch.undo()
    lm = load_vlm(str(tiny_models["strong"]), attn_implementation="eager")
    assert lm.model.config._attn_implementation == "eager"


@pytest.mark.parametrize("pixels", [(28 * 28 * 4, 28 * 28 * 16), (28 * 28 * 16, 28 * 28 * 64)])
def test_pixel_limits_bound_the_image_tokens(tiny_models, sample_images, pixels):
    from capdpo.images import load_image
    from capdpo.models.loading import load_processor

    low, high = pixels
    processor = load_processor(str(tiny_models["strong"]), min_pixels=low, max_pixels=high)
    assert processor.image_processor.size == {"shortest_edge": low, "longest_edge": high}
    patch = processor.image_processor.patch_size * processor.image_processor.merge_size
    for path in sample_images[:3]:
        grid = processor.image_processor(images=[load_image(str(path))], return_tensors="pt")["image_grid_thw"][0]
        area = int(grid[1] * grid[2]) * processor.image_processor.patch_size**2  # pixels after resizing
        assert low <= area <= high, (path.name, area)
        assert int(grid.prod()) // processor.image_processor.merge_size**2 == area // patch**2


@pytest.mark.parametrize("name", ["strong", "qwen3vl", "llava"])
def test_every_family_keeps_lora_and_trainable_parameters_out_of_the_vision_tower(tiny_models, name):
    import re

    from capdpo.models.lora import is_vision_parameter

    lm = load_vlm(str(tiny_models[name]))
    pattern = re.compile(lora_target_regex(lm.model))
    linears = [n for n, m in lm.model.named_modules() if isinstance(m, torch.nn.Linear)]
    vision = [n for n in linears if is_vision_parameter(n)]
    assert vision, f"{name} has no vision linears to test with"
    assert not any(pattern.match(n) for n in vision)
    assert any(pattern.match(n) for n in linears if not is_vision_parameter(n))


def test_training_load_turns_the_cache_off_and_merges_a_given_adapter(tiny_models, tmp_path):
    from peft import LoraConfig, get_peft_model

    from capdpo.models.loading import load_for_training

    base = load_for_training(str(tiny_models["strong"]))
    assert base.model.config.use_cache is False and base.dtype == torch.float32
    torch.manual_seed(0)
    peft = get_peft_model(
        base.model, LoraConfig(r=2, target_modules=lora_target_regex(base.model), init_lora_weights=False)
    )
    peft.save_pretrained(tmp_path / "adapter")
    expected = {k: v.clone() for k, v in peft.merge_and_unload().state_dict().items()}
    merged = load_for_training(str(tiny_models["strong"]), adapter=str(tmp_path / "adapter"))
    got = merged.model.state_dict()
    assert max((got[k] - v).abs().max().item() for k, v in expected.items()) < 1e-6
    untouched = load_for_training(str(tiny_models["strong"])).model.state_dict()
    assert any((got[k] - untouched[k]).abs().max().item() > 1e-4 for k in got)  # the adapter changed weights


def test_pickled_weights_and_repository_code_are_refused_by_default(tmp_path, tiny_models):
    """Weights load from safetensors only (a pickle can run code while it loads), and a model whose config asks for
    its repository's own Python code is refused unless trust_remote_code is set: one-line errors naming the field."""
    import json
    import shutil

    import torch

    source = tiny_models["strong"]
    pickled = tmp_path / "pickled"
    shutil.copytree(source, pickled, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
    from safetensors.torch import load_file

    state = {}
    for part in source.glob("*.safetensors"):
        state.update(load_file(part))
    torch.save(state, pickled / "pytorch_model.bin")
    assert load_vlm(str(source)).model is not None  # the control: the same model as safetensors loads
    with pytest.raises(InputError, match=r"strong_model: cannot load '.*pickled'"):
        load_vlm(str(pickled), field="strong_model")

    remote = tmp_path / "remote"
    shutil.copytree(source, remote)
    config = json.loads((remote / "config.json").read_text())
    config["model_type"] = "capdpo_repository_model"
    config["auto_map"] = {"AutoConfig": "configuration_custom.CustomConfig"}
    (remote / "config.json").write_text(json.dumps(config))
    ran = tmp_path / "ran"
    (remote / "configuration_custom.py").write_text(f"open({str(ran)!r}, 'w').write('ran')\n")
    with pytest.raises(ConfigError, match=r"weak_model: '.*remote' needs trust_remote_code: true"):
        load_vlm(str(remote), field="weak_model")
    assert not ran.exists(), "the repository's code ran"
