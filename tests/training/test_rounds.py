"""Iterative rounds: round k+1's strong model is round k's trained policy (adapter merged in everywhere), its
records carry the adapter's identity, and the composed policy adapter equals the two adapters merged in turn."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from capdpo.config import CommonConfig
from capdpo.errors import InputError
from capdpo.jsonl import read_json, read_jsonl, write_json
from capdpo.models.adapters import adapter_identity, compose_adapters
from capdpo.models.loading import load_role, load_vlm, role_model_id
from capdpo.models.lora import lora_target_regex
from capdpo.pipeline import STAGES, run_stage
from capdpo.sections import load_config
from capdpo.training.dpo import POLICY_ADAPTER
from capdpo.training.rounds import prepare_round


def run_stages(config: Path) -> None:
    """Stages 1-6 in this process (what scripts/run_all.sh does with one process per stage)."""
    for info in STAGES:
        run_stage(info.section, ["--config", str(config)])


def language_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "language_model" in k}


def save_random_adapter(model: torch.nn.Module, folder: Path, r: int, alpha: int, seed: int) -> Path:
    """A LoRA adapter with random (non-zero) A and B on the language model's linear layers."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=lora_target_regex(model), init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.05)
    peft_model.save_pretrained(str(folder))
    return folder


def test_composed_adapter_equals_merging_the_two_in_turn(tiny_models, tmp_path: Path) -> None:
    strong = str(tiny_models["strong"])
    first = save_random_adapter(load_vlm(strong, device="cpu").model, tmp_path / "first", r=4, alpha=8, seed=1)
    on_first = load_vlm(strong, device="cpu", adapter=str(first)).model  # the base with `first` merged in
    second = save_random_adapter(on_first, tmp_path / "second", r=2, alpha=1, seed=2)

    in_turn = load_vlm(strong, device="cpu", adapter=str(first)).model
    from peft import PeftModel

    in_turn = language_weights(PeftModel.from_pretrained(in_turn, str(second)).merge_and_unload())
    composed = compose_adapters(first, second, tmp_path / "composed")
    config = read_json(composed / "adapter_config.json")
    assert (config["r"], config["lora_alpha"], config["rank_pattern"]) == (6, 6, {})
    merged = language_weights(load_vlm(strong, device="cpu", adapter=str(composed)).model)
    base = language_weights(load_vlm(strong, device="cpu").model)
    changed = [k for k in base if not torch.equal(base[k], in_turn[k])]
    assert changed, "the adapters changed nothing: the comparison would be empty"
    for key in base:
        torch.testing.assert_close(merged[key], in_turn[key], rtol=0, atol=2e-6)
    assert read_json(composed / "composition.json")["adapters"][0]["identity"] == adapter_identity(str(first))

    # adapters on other modules cannot be composed: one line naming both folders
    from peft import LoraConfig, get_peft_model

    other = get_peft_model(load_vlm(strong, device="cpu").model, LoraConfig(r=2, target_modules=["q_proj"]))
    other.save_pretrained(str(tmp_path / "other"))
    with pytest.raises(InputError, match="different modules"):
        compose_adapters(first, tmp_path / "other", tmp_path / "bad")


def test_adapter_identity_is_a_content_hash(tiny_models, tmp_path: Path) -> None:
    strong = str(tiny_models["strong"])
    folder = save_random_adapter(load_vlm(strong, device="cpu").model, tmp_path / "a", r=2, alpha=2, seed=0)
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in folder.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    assert adapter_identity(str(folder)) == adapter_identity(str(copy))
    save_random_adapter(load_vlm(strong, device="cpu").model, copy, r=2, alpha=2, seed=5)  # retrained in place
    assert adapter_identity(str(folder)) != adapter_identity(str(copy))
    common = CommonConfig(strong_model=strong)
    assert role_model_id(common, "strong") == strong  # no adapter: ids stay what they were before rounds existed
    common.strong_adapter = str(folder)
    assert role_model_id(common, "strong") == f"{strong}+adapter:{adapter_identity(str(folder))}"
    with pytest.raises(InputError, match="no adapter_config.json"):
        adapter_identity(str(tmp_path))


def test_two_rounds_train_each_on_the_previous_policy(tiny_models, sample_images, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for path in sample_images[:3]:
        (images / path.name).write_bytes(path.read_bytes())
    strong = str(tiny_models["strong"])
    base = tmp_path / "run.yaml"
    config = {
        "run_dir": str(tmp_path / "runs" / "x"),
        "strong_model": strong,
        "weak_model": str(tiny_models["weak"]),
        "images": {"source": "folder", "path": str(images)},
        # enough text that round 2 has complete sentences to pair whatever the one-step adapter did to the model
        "describe": {"max_new_tokens": 64, "samples_per_image": 2, "batch_size": 6},
        "variants": {"k": 2, "max_new_tokens": 8, "batch_size": 8},
        "validate": {"methods": ["yesno"], "batch_size": 16},
        "pairs": {"min_gap": 0.0, "val_fraction": 0.0, "min_words": 1, "max_pairs_per_image": 2, "exports": []},
        "train": {
            "max_steps": 1,
            "gradient_accumulation_steps": 1,
            "lora_r": 4,
            "lora_alpha": 8,
            "learning_rate": 1e-3,  # one gentle step: the policy changes, its captions stay sentence-shaped
            "warmup_ratio": 0.0,
            "lr_scheduler": "constant",
            "save_steps": 10,
        },
    }
    base.write_text(yaml.safe_dump(config))
    with pytest.raises(InputError, match="round1: stage 6 has not finished"):
        prepare_round(base, 2)

    round1 = prepare_round(base, 1)
    assert round1 == tmp_path / "runs" / "x" / "round1" / "round.yaml"
    run_stages(round1)
    round2 = prepare_round(base, 2)
    run_stages(round2)

    r1, r2 = round1.parent, round2.parent
    adapter1 = r1 / "06_train" / "adapter"
    derived = yaml.safe_load(round2.read_text())
    assert derived["strong_adapter"] == str(adapter1) and derived["run_dir"] == str(r2)
    # round 2's records carry the adapter's identity; round 1's the bare model
    tagged = f"{strong}+adapter:{adapter_identity(str(adapter1))}"
    for stage_file in ("02_descriptions.jsonl", "03_variants.jsonl"):
        assert {r["model"] for r in read_jsonl(r1 / stage_file)} == {strong}
        assert {r["model"] for r in read_jsonl(r2 / stage_file)} == {tagged}
    # the same images and settings give other ids once the adapter is applied
    from capdpo.records import ImageRecord
    from capdpo.stages.generate_descriptions import plan_requests

    image_records = [ImageRecord.from_dict(r) for r in read_jsonl(r2 / "01_images.jsonl")]
    ids1 = set(plan_requests(image_records, load_config("describe", ["--config", str(round1)])))
    ids2 = set(plan_requests(image_records, load_config("describe", ["--config", str(round2)])))
    assert {r["id"] for r in read_jsonl(r2 / "02_descriptions.jsonl")} == ids2 and not ids1 & ids2

    # round 2 trained on round 1's policy: its reference cache says so, and its policy holds both adapters
    (fingerprint,) = (r2 / "06_train" / "ref_logps").glob("*/fingerprint.json")
    assert read_json(fingerprint)["strong_adapter"] == adapter_identity(str(adapter1))
    policy = Path(read_json(r2 / "06_train" / "summary.json")["policy"])
    assert policy == r2 / "06_train" / POLICY_ADAPTER and read_json(policy / "adapter_config.json")["r"] == 8
    assert read_json(r1 / "06_train" / "summary.json")["policy"] == str(adapter1)

    # the strong model of round 2 is not round 1's base: the adapter is applied
    common1 = load_config("describe", ["--config", str(round1)]).common
    common2 = load_config("describe", ["--config", str(round2)]).common
    lm1, lm2 = load_role(common1, "strong"), load_role(common2, "strong")
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        logits1 = lm1.model.model.language_model(input_ids=ids).last_hidden_state
        logits2 = lm2.model.model.language_model(input_ids=ids).last_hidden_state
    assert (logits1 - logits2).abs().max() > 1e-4

    round3 = prepare_round(base, 3)  # the next round would start from the composed policy
    assert yaml.safe_load(round3.read_text())["strong_adapter"] == str(policy)


def test_a_fully_fine_tuned_round_becomes_the_next_strong_model(tiny_models, tmp_path: Path) -> None:
    base = tmp_path / "run.yaml"
    base.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "r"), "strong_model": str(tiny_models["strong"])}))
    trained = tmp_path / "r" / "round1" / "06_train"
    (trained / "model").mkdir(parents=True)
    write_json(trained / "summary.json", {"policy": str(trained / "model")})
    (trained.parent / "06_train.done").write_text(json.dumps({"finished": "now"}) + "\n")
    derived = yaml.safe_load(prepare_round(base, 2).read_text())
    assert (derived["strong_model"], derived["strong_adapter"]) == (str(trained / "model"), "")
