"""capdpo.training.setup: which DeepSpeed JSON the trainer gets."""

from __future__ import annotations

import pytest

from capdpo.errors import ConfigError
from capdpo.training.config import DpoConfig
from capdpo.training.setup import DEEPSPEED_DIR, resolve_deepspeed


def test_the_deepspeed_json_comes_from_the_config_or_the_launcher_and_two_different_ones_are_an_error(
    tmp_path, monkeypatch
) -> None:
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", raising=False)
    assert resolve_deepspeed(DpoConfig(deepspeed="")) is None
    preset = resolve_deepspeed(DpoConfig(deepspeed="zero2"))
    assert preset == str(DEEPSPEED_DIR / "zero2.json")
    with pytest.raises(ConfigError, match=r"deepspeed: .*missing\.json not found"):
        resolve_deepspeed(DpoConfig(deepspeed=str(tmp_path / "missing.json")))

    launcher = tmp_path / "launcher.json"
    launcher.write_text("{}")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(launcher))
    assert resolve_deepspeed(DpoConfig(deepspeed="")) == str(launcher)  # the accelerate config's JSON
    assert resolve_deepspeed(DpoConfig(deepspeed=str(launcher))) == str(launcher)  # the same file named twice
    with pytest.raises(ConfigError, match="differs from the accelerate config's deepspeed_config_file"):
        resolve_deepspeed(DpoConfig(deepspeed="zero2"))


def test_qlora_without_bitsandbytes_is_a_clear_error_before_anything_runs(monkeypatch) -> None:
    """On a GPU without bitsandbytes installed, QLoRA stops with the package to install (on CPU: the GPU it needs)."""
    import importlib.util

    import torch

    from capdpo.training.setup import check_qlora

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a)
    )
    with pytest.raises(ConfigError, match=r"train\.method: qlora needs the bitsandbytes package; `pip install -r "
                       r"requirements-qlora\.txt`"):  # fmt: skip
        check_qlora(DpoConfig(method="qlora"), torch.device("cuda"))
    with pytest.raises(ConfigError, match="qlora needs a CUDA GPU"):
        check_qlora(DpoConfig(method="qlora"), torch.device("cpu"))
    check_qlora(DpoConfig(method="lora"), torch.device("cpu"))  # other methods need neither
