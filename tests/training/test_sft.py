"""SFT on the tiny Qwen2.5-VL: exact label masks, loss going down on a repeated example, LoRA on the language model
only, full fine-tuning of the vision tower, adapter reload, resume, and one-line errors for bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from capdpo.errors import ConfigError, InputError
from capdpo.training.config import SftConfig

PROMPT = "Describe this image in detail."
RESPONSES = ["A red circle on a light wall.", "A green ball lies on the floor near a wall."]


def write_data(path: Path, images: list[Path], n: int = 8, **extra: object) -> Path:
    with path.open("w") as fh:
        for i in range(n):
            record = {"image": str(images[i % 2]), "prompt": PROMPT, "response": RESPONSES[i % 2], **extra}
            fh.write(json.dumps({**record, "id": f"ex{i}"}) + "\n")
    return path


def write_config(tmp: Path, strong: Path, data: Path, **sft: object) -> Path:
    section = {
        "data_file": str(data),
        "max_steps": 6,
        "batch_size": 2,
        "gradient_accumulation_steps": 1,
        "learning_rate": 5e-3,
        "lr_scheduler": "constant",
        "warmup_ratio": 0.0,
        "logging_steps": 1,
        "save_steps": 3,
        "gradient_checkpointing": False,
        **sft,
    }
    path = tmp / "run.yaml"
    path.write_text(
        yaml.safe_dump({"run_dir": str(tmp / "run"), "strong_model": str(strong), "seed": 5, "sft": section})
    )
    return path


def losses(output: Path) -> dict[int, float]:
    from capdpo.jsonl import read_jsonl

    return {r["step"]: r["loss"] for r in read_jsonl(output / "log.jsonl") if r["kind"] == "train"}


def response_loss(model: torch.nn.Module, processor, image: Path, response: str) -> float:
    """Mean next-token loss of the response given the image and prompt (through the SFT collator)."""
    from capdpo.training.sft import SftCollator, SftEncoder, SftExample, example_row

    example = SftExample(id="x", image_id="i", image=str(image), prompt=PROMPT, response=response)
    batch = SftCollator(SftEncoder(processor))([example_row(example)])
    with torch.no_grad():
        return float(model(**batch).loss)


# ---- labels ---------------------------------------------------------------------------------------------------


def test_labels_cover_exactly_the_response_and_its_end_token(tiny_models, sample_images) -> None:
    """Checked against an independent rendering: the whole conversation tokenized at once by the processor."""
    from capdpo.images import load_image
    from capdpo.models.loading import load_processor
    from capdpo.training.sft import SftCollator, SftEncoder, SftExample, example_row

    processor = load_processor(str(tiny_models["strong"]))
    tokenizer = processor.tokenizer
    image_token = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    examples = [
        SftExample(id=f"e{i}", image_id=f"i{i}", image=str(sample_images[i]), prompt=PROMPT, response=r)
        for i, r in enumerate(["A red circle.", "A green ball lies on the floor near a wooden table."])
    ]
    batch = SftCollator(SftEncoder(processor))([example_row(e) for e in examples])
    assert batch["labels"].shape == batch["input_ids"].shape
    for row, example in enumerate(examples):
        user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}
        full = processor.apply_chat_template(
            [user, {"role": "assistant", "content": [{"type": "text", "text": example.response}]}], tokenize=False
        )
        header = processor.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
        image = load_image(example.image)
        ids = processor(text=[full], images=[image], return_tensors="pt")["input_ids"][0].tolist()
        start = len(processor(text=[header], images=[image], return_tensors="pt")["input_ids"][0])
        end = ids.index(im_end, start)  # the response ends with the turn's end token; the template's "\n" follows
        expected = [-100] * start + ids[start : end + 1]
        labels = batch["labels"][row].tolist()
        assert labels[: len(expected)] == expected
        assert all(v == -100 for v in labels[len(expected) :])  # padding
        assert batch["input_ids"][row, : end + 1].tolist() == ids[: end + 1]
        assert int(batch["attention_mask"][row].sum()) == end + 1
        image_positions = [i for i, t in enumerate(ids[:start]) if t == image_token]
        assert len(image_positions) >= 4 and all(labels[i] == -100 for i in image_positions)
        n_response = len(tokenizer(example.response, add_special_tokens=False)["input_ids"]) + 1
        assert sum(v != -100 for v in labels) == n_response
    assert batch["pixel_values"].shape[0] == int(batch["image_grid_thw"].prod(dim=1).sum())


def test_cached_images_give_the_same_batches(tiny_models, sample_images) -> None:
    from capdpo.models.loading import load_processor
    from capdpo.training.sft import SftCollator, SftEncoder, SftExample, example_row

    processor = load_processor(str(tiny_models["strong"]))
    rows = [
        example_row(SftExample(id=f"e{i}", image_id="i", image=str(sample_images[i % 3]), prompt=PROMPT, response=r))
        for i, r in enumerate(RESPONSES * 3)
    ]
    plain = SftCollator(SftEncoder(processor))(rows)
    encoder = SftEncoder(processor, cache_images=True)
    cached = SftCollator(encoder)
    for batch in (cached(rows), cached(rows[::-1])):
        assert encoder.image_cache is not None and len(encoder.image_cache) == 3
        assert set(batch) == set(plain)
    again = cached(rows)
    assert all(torch.equal(plain[k], again[k]) for k in plain)


# ---- training -------------------------------------------------------------------------------------------------


def test_lora_sft_lowers_the_loss_and_the_adapter_reloads(tiny_models, sample_images, tmp_path) -> None:
    from capdpo.models.loading import load_vlm
    from capdpo.models.lora import is_vision_parameter
    from capdpo.sections import load_config
    from capdpo.training.sft import run_sft

    strong = tiny_models["strong"]
    data = write_data(tmp_path / "sft.jsonl", sample_images)
    outcome = run_sft(load_config("sft", ["--config", str(write_config(tmp_path, strong, data))]))

    steps = losses(outcome.output)
    assert sorted(steps) == [1, 2, 3, 4, 5, 6] and all(math.isfinite(v) for v in steps.values())
    assert steps[6] < 0.8 * steps[1], steps  # two repeated examples: the loss must fall clearly
    model = outcome.trainer.model
    lora = [n for n, _ in model.named_modules() if n.endswith(".lora_A")]
    assert lora and not [n for n in lora if is_vision_parameter(n)]
    assert any("mlp.down_proj" in n for n in lora) and any("self_attn.v_proj" in n for n in lora)
    # the one-GEMM LoRA update (fused_kernels) is on, and the trained adapter gives PEFT's own loss through it
    # and the frozen vision tower's exact tunings (patch embedding as a matmul, MLP padded) are too
    depth = model.get_base_model().config.vision_config.depth
    assert outcome.trainer.tuned == {"lora": len(lora), "patch_embedding": 1, "vision_mlp": depth}
    from capdpo.training.sft import SftCollator, SftEncoder, SftExample, example_row
    from tests.training.test_kernels import _peft_forward_back

    example = SftExample(id="x", image_id="i", image=str(sample_images[0]), prompt=PROMPT, response=RESPONSES[0])
    batch = SftCollator(SftEncoder(outcome.trainer.processing_class))([example_row(example)])
    model.eval()
    with torch.no_grad():
        fused = model(**batch).loss
        assert _peft_forward_back(model) == len(lora)
        assert torch.allclose(model(**batch).loss, fused, atol=1e-5)
    summary = json.loads((outcome.output / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["final_loss"] < summary["first_loss"]
    run_dir = tmp_path / "run"
    meta = json.loads((run_dir / "sft.meta.json").read_text())
    assert meta["config"]["sft"]["max_steps"] == 6 and meta["versions"]["trl"] and meta["git_commit"]
    assert (run_dir / "sft.done").exists() and (outcome.output / "checkpoints" / "checkpoint-3").is_dir()

    # the saved adapter reloads through capdpo.models and carries what was learned
    base = load_vlm(str(strong), device="cpu")
    tuned = load_vlm(str(strong), device="cpu", adapter=str(outcome.saved))
    before = response_loss(base.model, base.processor, sample_images[0], RESPONSES[0])
    after = response_loss(tuned.model, tuned.processor, sample_images[0], RESPONSES[0])
    assert after < before - 1.0, (before, after)


def test_full_finetuning_from_scratch_trains_the_vision_tower(tiny_models, sample_images, tmp_path) -> None:
    from capdpo.models.loading import load_vlm
    from capdpo.models.lora import is_vision_parameter
    from capdpo.sections import load_config
    from capdpo.training.sft import run_sft

    strong = tiny_models["strong"]
    data = write_data(tmp_path / "sft.jsonl", sample_images, n=4)
    config = write_config(tmp_path, strong, data, method="full", freeze_vision=False, max_steps=2, learning_rate=1e-3)
    outcome = run_sft(load_config("sft", ["--config", str(config)]))
    assert outcome.saved.name == "model" and (outcome.saved / "model.safetensors").is_file()
    original = load_vlm(str(strong), device="cpu").model.state_dict()
    trained = load_vlm(str(outcome.saved), device="cpu").model.state_dict()
    vision = [n for n in original if is_vision_parameter(n) and n.endswith("weight")]
    language = [n for n in original if "language_model" in n and n.endswith("proj.weight")]
    assert vision and language
    assert all(not torch.equal(original[n], trained[n]) for n in vision + language)


def _straight_and_resumed(strong: Path, sample_images, tmp_path: Path, settings: dict) -> tuple[Path, Path, str]:
    """One uninterrupted SFT run and one stopped after checkpoint-2, then resumed; their output folders and the
    resumed run's config."""
    from capdpo.sections import load_config
    from capdpo.training.sft import run_sft

    data = write_data(tmp_path / "sft.jsonl", sample_images)
    straight = tmp_path / "straight"
    straight.mkdir()
    run_sft(load_config("sft", ["--config", str(write_config(straight, strong, data, **settings))]))

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    config = str(write_config(resumed, strong, data, **settings))
    run_sft(load_config("sft", ["--config", config, "--max_steps", "2"]))  # stops after checkpoint-2
    outcome = run_sft(load_config("sft", ["--config", config]))
    assert outcome.summary["resumed_from"].endswith("checkpoint-2")
    return straight / "run" / "sft", resumed / "run" / "sft", config


def test_resumed_run_logs_the_same_losses(tiny_models, sample_images, tmp_path) -> None:
    from capdpo.sections import load_config
    from capdpo.training.sft import run_sft

    straight, resumed, config = _straight_and_resumed(
        tiny_models["strong"], sample_images, tmp_path, {"max_steps": 4, "save_steps": 2, "lora_dropout": 0.0}
    )
    a, b = losses(straight), losses(resumed)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), step

    with pytest.raises(ConfigError, match="other lora_r"):
        run_sft(load_config("sft", ["--config", config, "--max_steps", "6", "--lora_r", "4"]))


@pytest.mark.slow
def test_deepspeed_zero2_on_two_cpu_processes(tiny_models, sample_images, tmp_path) -> None:
    import os
    import socket
    import subprocess
    import sys

    from tests.helpers import ROOT

    pytest.importorskip("deepspeed", reason="requirements-deepspeed.txt is part of `make test`'s install")
    data = write_data(tmp_path / "sft.jsonl", sample_images)
    config = write_config(tmp_path, tiny_models["strong"], data, max_steps=2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(ROOT / "configs" / "accelerate" / "zero2.yaml"),
        "--num_processes", "2", "--main_process_port", str(port),
        "-m", "capdpo", "sft", "--config", str(config),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads((tmp_path / "run" / "sft" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["deepspeed"].endswith("zero2.json")
    assert sorted(losses(tmp_path / "run" / "sft")) == [1, 2] and math.isfinite(summary["final_loss"])
    assert (tmp_path / "run" / "sft" / "adapter" / "adapter_model.safetensors").is_file()


# ---- inputs and errors ----------------------------------------------------------------------------------------


def test_descriptions_records_train_and_val_fraction_splits_by_image(tiny_models, sample_images, tmp_path) -> None:
    from capdpo.jsonl import write_jsonl
    from capdpo.sections import load_config
    from capdpo.training.sft import load_examples

    run_dir = tmp_path / "run"
    records = [
        {
            "id": f"d{i}",
            "image_id": f"img{i % 12}",
            "image": str(sample_images[i % 6]),
            "prompt": PROMPT,
            "text": RESPONSES[i % 2],
            "sentences": [RESPONSES[i % 2]],
            "model": "m",
            "generation": {},
        }
        for i in range(24)
    ]
    run_dir.mkdir()
    write_jsonl(run_dir / "02_descriptions.jsonl", records)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"run_dir": str(run_dir), "sft": {"val_fraction": 0.5}}))
    with pytest.raises(InputError, match="stage 'describe' has not finished"):
        load_examples(load_config("sft", ["--config", str(config)]))
    (run_dir / "02_descriptions.done").write_text("{}\n")
    _, examples = load_examples(load_config("sft", ["--config", str(config)]))
    assert [e.response for _, e in examples] == [r["text"] for r in records]
    val_images = {e.image_id for _, e in examples if e.split == "val"}
    train_images = {e.image_id for _, e in examples if e.split == "train"}
    assert val_images and train_images and not val_images & train_images


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "dora"}, "sft.method"),
        ({"val_fraction": 1.0}, "sft.val_fraction"),
        ({"val_file": "v.jsonl", "val_fraction": 0.1}, "either val_file or val_fraction"),
        ({"deepspeed": "zero9"}, "sft.deepspeed"),
        ({"method": "qlora", "deepspeed": "zero3"}, "ZeRO-3"),
        ({"epochs": 0.0}, "sft.epochs"),
        ({"batch_size": 0}, "sft.batch_size"),
    ],
)
def test_config_refuses_bad_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SftConfig(**kwargs)


def test_bad_input_gives_one_line_errors(tiny_models, sample_images, tmp_path, capsys) -> None:
    from capdpo.training.sft import main

    strong = tiny_models["strong"]
    data = tmp_path / "sft.jsonl"

    def error(*extra: str) -> str:
        with pytest.raises(SystemExit) as exit_info:
            main(["--config", str(write_config(tmp_path, strong, data)), *extra])
        assert exit_info.value.code == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1
        return lines[0]

    assert "sft.data_file" in error() and "not found" in error()
    write_data(data, sample_images)
    records = [json.loads(line) for line in data.read_text().splitlines()]
    records[2]["image"] = str(tmp_path / "gone.png")
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert "record 3" in error() and "gone.png not found" in error()
    records[2] = {"image": str(sample_images[0]), "prompt": PROMPT}
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert "record 3: missing or empty field(s) response" in error()
    write_data(data, sample_images)
    message = error("--max_length", "20")
    assert "image tokens" in message and "max_length is 20" in message
    assert "qlora needs a CUDA GPU" in error("--method", "qlora")
    assert not (tmp_path / "run" / "sft" / "adapter").exists()


def test_a_resumed_full_fine_tune_continues_from_the_checkpoint_weights(tiny_models, sample_images, tmp_path) -> None:
    """Full fine-tuning (vision tower included) stopped at a checkpoint and resumed gives the losses and weights of
    an uninterrupted run: the checkpoint's weights are loaded, not the starting model's."""
    from safetensors.torch import load_file

    strong = tiny_models["strong"]
    settings = {"max_steps": 4, "save_steps": 2, "method": "full", "freeze_vision": False, "learning_rate": 1e-3}
    straight, resumed, _ = _straight_and_resumed(strong, sample_images, tmp_path, settings)
    a, b = losses(straight), losses(resumed)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4, abs=1e-6), step
    w_a = load_file(straight / "model" / "model.safetensors")
    w_b = load_file(resumed / "model" / "model.safetensors")
    start = load_file(strong / "model.safetensors")
    assert w_a.keys() == w_b.keys()
    for key in w_a:
        assert torch.allclose(w_a[key], w_b[key], atol=1e-5), key
    assert any(not torch.equal(w_b[k], start[k]) for k in w_b if k.startswith("visual"))
