"""Qwen3-VL and LLaVA-1.5 through every stage (tiny offline models), and LLaVA's chat format in stage 6's encoder."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
import yaml

from capdpo.jsonl import read_jsonl
from capdpo.pipeline import STAGES
from capdpo.records import PairRecord

STAGE_OUTPUTS = tuple((info.module, info.stem) for info in STAGES[:5])
# The rendering of llava-hf's LLaVA-1.5 processors: content only as typed parts, "ASSISTANT:" as the generation
# prompt, every text followed by a space and no end-of-turn token (unlike the tiny model's own template).
LLAVA_HF_STYLE_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] != 'system' %}{{ m['role'].upper() + ': ' }}{% endif %}"
    "{% for part in m['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{% for part in m['content'] | selectattr('type', 'equalto', 'text') %}{{ part['text'] + ' ' }}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def pair(prefix: str = "") -> PairRecord:
    return PairRecord(
        id="p",
        image_id="i",
        image="x.png",
        prompt="Describe this image.",
        chosen="A red ball.",
        rejected="A blue car.",
        score_chosen=0.9,
        score_rejected=0.1,
        mode="sentence" if prefix else "context",
        assistant_prefix=prefix,
    )


@pytest.mark.parametrize("template", ["tiny", "llava-hf"])
def test_llava_completions_start_with_the_space_after_assistant(tiny_models, template: str) -> None:
    from capdpo.models.loading import load_processor
    from capdpo.training.data import PairEncoder

    processor = load_processor(str(tiny_models["llava"]))
    if template == "llava-hf":
        processor.chat_template = LLAVA_HF_STYLE_TEMPLATE
    encoder = PairEncoder(processor)
    eos = processor.tokenizer.eos_token_id

    prompt, completion = encoder.render(pair(), "A red ball.")
    assert prompt.endswith("ASSISTANT:") and completion.startswith(" A red ball.")
    ids = encoder.completion_ids(completion)
    assert ids[-1] == eos and eos not in ids[:-1]  # the completion ends the turn exactly once, with EOS
    assert processor.tokenizer.decode(ids[:-1]) == " A red ball."

    prompt, completion = encoder.render(pair("The wall is white."), "A red ball.")
    assert prompt.endswith("ASSISTANT: The wall is white.") and completion.startswith(" A red ball.")
    assert encoder.completion_ids(completion)[-1] == eos


def test_qwen_rendering_is_unchanged_by_the_llava_handling(tiny_models) -> None:
    from capdpo.models.loading import load_processor
    from capdpo.training.data import PairEncoder

    encoder = PairEncoder(load_processor(str(tiny_models["qwen3vl"])))
    prompt, completion = encoder.render(pair(), "A red ball.")
    assert prompt.endswith("<|im_start|>assistant\n") and completion == "A red ball.<|im_end|>\n"
    prompt, completion = encoder.render(pair("The wall is white."), "A red ball.")
    assert prompt.endswith("<|im_start|>assistant\nThe wall is white.") and completion.startswith(" A red ball.<|im")


@pytest.mark.parametrize(
    ("model", "mode", "family"), [("qwen3vl", "context", "qwen3_vl"), ("llava", "sentence", "llava")]
)
def test_every_stage_runs_on_the_architecture(
    tiny_models, sample_images, tmp_path: Path, model: str, mode: str, family: str
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for path in sample_images[:2]:
        (images / path.name).write_bytes(path.read_bytes())
    run_dir = tmp_path / "run"
    name = str(tiny_models[model])
    config = {
        "run_dir": str(run_dir),
        "strong_model": name,
        "weak_model": name,
        "images": {"source": "folder", "path": str(images)},
        "describe": {"max_new_tokens": 40, "samples_per_image": 2, "batch_size": 4},
        "variants": {"k": 2, "max_new_tokens": 10, "batch_size": 8},
        "validate": {"methods": ["yesno", "rating"], "batch_size": 16},
        "pairs": {
            "mode": mode,
            "min_gap": 0.0,
            "val_fraction": 0.0,
            "min_words": 1,
            "max_pairs_per_image": 2,
            "exports": ["trl"],
        },
        "train": {
            "max_steps": 1,
            "gradient_accumulation_steps": 1,
            "lora_r": 4,
            "lora_alpha": 8,
            "learning_rate": 5e-3,
            "warmup_ratio": 0.0,
            "lr_scheduler": "constant",
            "save_steps": 10,
        },
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    for stage, output in STAGE_OUTPUTS:
        importlib.import_module(stage).main(["--config", str(path)])
        assert (run_dir / f"{output}.done").is_file(), stage
        assert read_jsonl(run_dir / f"{output}.jsonl"), f"{stage} wrote no records"
    pairs = read_jsonl(run_dir / "05_pairs.jsonl")
    assert {p["mode"] for p in pairs} == {mode}
    assert {r["model"] for r in read_jsonl(run_dir / "02_descriptions.jsonl")} == {name}

    importlib.import_module(STAGES[5].module).main(["--config", str(path)])
    assert (run_dir / "06_train.done").is_file()
    adapter = run_dir / "06_train" / "adapter"
    from capdpo.models.loading import load_vlm

    base = load_vlm(name, device="cpu")
    tuned = load_vlm(name, device="cpu", adapter=str(adapter))
    assert tuned.family == family
    before, after = base.model.state_dict(), tuned.model.state_dict()
    changed = [k for k in before if "language_model" in k and not torch.equal(before[k], after[k])]
    assert changed and all("vision" not in k and "visual" not in k for k in changed)
