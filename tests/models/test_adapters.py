"""LoRA adapter averaging: exact mean of the updates (delta), elementwise mean (naive), refusals via the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from capdpo.models.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, average_adapters
from capdpo.models.adapters import average_main as main
from capdpo.models.loading import load_vlm
from capdpo.models.lora import lora_target_regex


def make_adapter(base: Path, out: Path, seed: int, r: int = 4, alpha: int = 8, targets: str | None = None, **extra):
    """A LoRA adapter on the language model's linear layers with random A and B (so every update is non-zero)."""
    from peft import LoraConfig, get_peft_model

    model = load_vlm(str(base), device="cpu").model
    torch.manual_seed(seed)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=targets or lora_target_regex(model),
        init_lora_weights=False,  # B random instead of zero
        **extra,
    )
    get_peft_model(model, config).save_pretrained(out)
    return out


def merged_weights(base: Path, adapter: Path | None) -> dict[str, torch.Tensor]:
    """The base model's weights with `adapter` loaded through PeftModel and merged, in float64."""
    model = load_vlm(str(base), device="cpu", adapter=str(adapter) if adapter else None).model
    return {k: v.detach().to(torch.float64).clone() for k, v in model.state_dict().items()}


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v.to(torch.float64) for k, v in load_file(str(folder / ADAPTER_WEIGHTS)).items()}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def adapters(tiny_models, tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("adapters")
    return [make_adapter(tiny_models["strong"], folder / f"a{i}", seed=i) for i in range(3)]


@pytest.fixture(scope="module")
def merged_inputs(tiny_models, adapters) -> list[dict[str, torch.Tensor]]:
    return [merged_weights(tiny_models["strong"], a) for a in adapters]


@pytest.mark.parametrize("weights", [None, [3.0, 1.0, 0.0], [1.0, 2.0, 5.0]])
def test_delta_average_merges_to_the_weighted_mean_of_merged_models(
    tiny_models, adapters, merged_inputs, tmp_path, weights
):
    base = merged_weights(tiny_models["strong"], None)
    # The inputs really differ from the base and from each other, or the comparison below would prove nothing.
    assert max_diff(merged_inputs[0], base) > 1e-2
    assert max_diff(merged_inputs[0], merged_inputs[1]) > 1e-2

    out = average_adapters(adapters, tmp_path / "avg", weights=weights, method="delta")
    got = merged_weights(tiny_models["strong"], out)
    w = torch.tensor(weights or [1.0, 1.0, 1.0], dtype=torch.float64)
    w = w / w.sum()
    expected = {k: sum(wi * m[k] for wi, m in zip(w, merged_inputs)) for k in base}
    assert max_diff(got, expected) < 1e-5

    config = json.loads((out / ADAPTER_CONFIG).read_text())
    assert config["r"] == 12 and config["lora_alpha"] == 12  # rank 3 x 4, scale 1
    provenance = json.loads((out / "averaging.json").read_text())
    assert provenance["method"] == "delta" and provenance["normalised_weights"] == pytest.approx(w.tolist())


def test_delta_average_honours_rank_and_alpha_patterns_and_rslora(tiny_models, tmp_path):
    base_path = tiny_models["strong"]
    extra = {"rank_pattern": {"q_proj": 2}, "alpha_pattern": {"v_proj": 3, "down_proj": 16}, "use_rslora": True}
    inputs = [make_adapter(base_path, tmp_path / f"p{i}", seed=10 + i, r=4, alpha=8, **extra) for i in range(2)]
    out = average_adapters(inputs, tmp_path / "avg", weights=[1.0, 3.0])
    config = json.loads((out / ADAPTER_CONFIG).read_text())
    assert config["use_rslora"] is False and config["rank_pattern"] == {"q_proj": 4}
    tensors = read_tensors(out)
    q_a = next(k for k in tensors if k.endswith("q_proj.lora_A.weight"))
    assert tensors[q_a].shape[0] == 4  # 2 adapters x rank 2

    merged = [merged_weights(base_path, a) for a in inputs]
    expected = {k: 0.25 * merged[0][k] + 0.75 * merged[1][k] for k in merged[0]}
    assert max_diff(merged_weights(base_path, out), expected) < 1e-5


def test_naive_average_is_the_elementwise_mean_and_not_the_mean_update(tiny_models, adapters, merged_inputs, tmp_path):
    out = average_adapters(adapters[:2], tmp_path / "naive", weights=[1.0, 3.0], method="naive")
    inputs = [read_tensors(a) for a in adapters[:2]]
    expected = {k: 0.25 * inputs[0][k] + 0.75 * inputs[1][k] for k in inputs[0]}
    assert max_diff(read_tensors(out), expected) < 1e-6
    assert json.loads((out / ADAPTER_CONFIG).read_text())["r"] == 4  # rank and alpha unchanged

    # The documented caveat: mean(B)·mean(A) is not the mean of B·A for independently initialised adapters.
    mean_merged = {k: 0.25 * merged_inputs[0][k] + 0.75 * merged_inputs[1][k] for k in merged_inputs[0]}
    assert max_diff(merged_weights(tiny_models["strong"], out), mean_merged) > 1e-3


def cli_error(argv: list[str], capsys) -> str:
    capsys.readouterr()  # drop what earlier steps printed (progress bars)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_cli_averages_and_reports(adapters, tmp_path, capsys):
    main(["--adapters", str(adapters[0]), str(adapters[1]), "--out", str(tmp_path / "avg")])
    assert "Averaged 2 adapters (delta" in capsys.readouterr().out
    assert (tmp_path / "avg" / ADAPTER_WEIGHTS).is_file()
    # An existing output is kept unless --overwrite.
    err = cli_error(["--adapters", str(adapters[0]), str(adapters[1]), "--out", str(tmp_path / "avg")], capsys)
    assert "--overwrite" in err


@pytest.mark.parametrize(
    "variant, field",
    [
        ({"r": 2}, "'r'"),
        ({"targets": r"^(model\.language_model\.layers\.0\.self_attn\.q_proj)$"}, "'target_modules'"),
        ({"base": "weak"}, "'base_model_name_or_path'"),
    ],
)
def test_cli_refuses_mismatched_adapters(tiny_models, adapters, tmp_path, capsys, variant, field):
    variant = dict(variant)
    base = tiny_models[variant.pop("base", "strong")]
    other = make_adapter(base, tmp_path / "other", seed=7, **variant)
    err = cli_error(["--adapters", str(adapters[0]), str(other), "--out", str(tmp_path / "out")], capsys)
    assert field in err and str(adapters[0]) in err and str(other) in err
    assert not (tmp_path / "out").exists()


def test_cli_refuses_a_tensor_of_another_shape(adapters, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    other = tmp_path / "reshaped"
    shutil.copytree(adapters[1], other)
    tensors = load_file(str(other / ADAPTER_WEIGHTS))
    key = sorted(tensors)[0]
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1, *tensors[key].shape[1:])
    save_file(tensors, str(other / ADAPTER_WEIGHTS))
    err = cli_error(["--adapters", str(adapters[0]), str(other), "--out", str(tmp_path / "out")], capsys)
    assert key in err and "shape" in err


@pytest.mark.parametrize(
    "weights, message",
    [(["0", "0"], "sum"), (["1", "-1"], ">= 0"), (["1"], "one per adapter")],
)
def test_cli_refuses_bad_weights(adapters, tmp_path, capsys, weights, message):
    argv = ["--adapters", str(adapters[0]), str(adapters[1]), "--weights", *weights]
    err = cli_error([*argv, "--out", str(tmp_path / "out")], capsys)
    assert message in err


def test_cli_refuses_missing_inputs(adapters, tmp_path, capsys):
    err = cli_error(["--adapters", str(adapters[0]), str(tmp_path / "nope"), "--out", str(tmp_path / "o")], capsys)
    assert "nope" in err and "not found" in err
    no_weights = tmp_path / "bin_only"
    no_weights.mkdir()
    shutil.copy(adapters[0] / ADAPTER_CONFIG, no_weights / ADAPTER_CONFIG)
    (no_weights / "adapter_model.bin").write_bytes(b"")
    err = cli_error(["--adapters", str(adapters[0]), str(no_weights), "--out", str(tmp_path / "o")], capsys)
    assert "safe_serialization" in err
    err = cli_error(["--adapters", str(adapters[0]), "--out", str(tmp_path / "o")], capsys)
    assert "at least two" in err
