"""Stage 6 end to end on the tiny Qwen2.5-VL: LoRA steps, full fine-tuning with Uni-DPO, resume after a kill,
DeepSpeed ZeRO-2 on two CPU processes, and one-line errors for bad input."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from capdpo.jsonl import read_jsonl
from tests.helpers import ROOT

CAPTIONS = [
    ("A red circle on a light wall.", "A blue dog runs across green grass."),
    ("A green ball lies on the floor.", "Two cats sleep on a wooden table."),
    ("A large blue circle in the center.", "A man rides a bicycle down the street."),
    ("A yellow round shape on white.", "A bus is parked near a tall building."),
]


def write_pairs(run_dir: Path, images: list[Path], n: int = 8, done: bool = True) -> Path:
    """A hand-built 05_pairs.jsonl: context and sentence pairs over the sample images, the last image held out."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "05_pairs.jsonl"
    with path.open("w") as fh:
        for i in range(n):
            chosen, rejected = CAPTIONS[i % len(CAPTIONS)]
            sentence = i % 2 == 1
            record = {
                "id": f"pair{i}",
                "image_id": f"image{i % 4}",
                "image": str(images[i % 4]),
                "prompt": "Describe this image in detail.",
                "chosen": chosen,
                "rejected": rejected,
                "score_chosen": 0.9 - 0.05 * (i % 3),
                "score_rejected": 0.2 + 0.05 * (i % 2),
                "mode": "sentence" if sentence else "context",
                "split": "val" if i == n - 1 else "train",
                "assistant_prefix": "The picture is simple." if sentence else "",
                "meta": {},
            }
            fh.write(json.dumps(record) + "\n")
    if done:
        (run_dir / "05_pairs.done").write_text("{}\n")
    return path


def write_config(path: Path, run_dir: Path, strong: Path, **train: object) -> Path:
    section = {
        "max_steps": 3,
        "batch_size": 1,
        "gradient_accumulation_steps": 2,
        "learning_rate": 2e-3,
        "warmup_ratio": 0.0,
        "save_steps": 2,
        "ref_batch_size": 4,
        **train,
    }
    config = {"run_dir": str(run_dir), "strong_model": str(strong), "seed": 3, "train": section}
    path.write_text(yaml.safe_dump(config))
    return path


def train_losses(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_jsonl(run_dir / "06_train" / "log.jsonl") if r["kind"] == "train"}


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _original_weights(strong: Path) -> dict[str, torch.Tensor]:
    """The model's weights as loaded from disk, under the names the loaded model uses."""
    from capdpo.models.loading import load_vlm

    return {n: p.detach().clone() for n, p in load_vlm(str(strong), device="cpu").model.named_parameters()}


# ---- LoRA ---------------------------------------------------------------------------------------------------


def test_lora_steps_train_only_the_language_model_adapter(tiny_models, sample_images, tmp_path) -> None:
    from capdpo.generation.batching import Request, user_message
    from capdpo.generation.engine import Engine
    from capdpo.generation.sampling import Generation
    from capdpo.models.loading import load_vlm
    from capdpo.models.lora import is_vision_parameter
    from capdpo.sections import load_config
    from capdpo.training.dpo import run_dpo as run_training

    strong = tiny_models["strong"]
    run_dir = tmp_path / "run"
    write_pairs(run_dir, sample_images)
    config = write_config(tmp_path / "run.yaml", run_dir, strong, merge=True)
    outcome = run_training(load_config("train", ["--config", str(config)]))

    losses = train_losses(run_dir)
    assert sorted(losses) == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in losses.values())
    assert losses[3]["loss"] != pytest.approx(losses[1]["loss"], abs=1e-4)  # the adapter moved the policy

    model = outcome.trainer.model
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert lora and all(p.requires_grad for p in lora.values())
    assert any("mlp.gate_proj.lora_B" in n for n in lora) and any("self_attn.q_proj.lora_B" in n for n in lora)
    assert all(float(p.detach().abs().max()) > 0 for n, p in lora.items() if "lora_B" in n)  # B starts at zero
    lora_modules = [n for n, _ in model.named_modules() if n.endswith(".lora_A")]
    assert lora_modules and not [n for n in lora_modules if is_vision_parameter(n)]
    # every base weight, vision tower included, is bit-for-bit what was loaded; the state dict (what a checkpoint
    # saves) has the loaded widths although the frozen vision MLPs run zero-padded
    original = _original_weights(strong)
    hf = model.get_base_model()
    loaded_width = original["model.visual.blocks.0.mlp.up_proj.weight"].shape[0]
    assert loaded_width % 128 and hf.model.visual.blocks[0].mlp.up_proj.out_features % 128 == 0
    base = {n.replace(".base_layer", ""): p for n, p in hf.state_dict().items() if "lora_" not in n}
    assert set(base) == set(original)
    assert all(torch.equal(base[n].detach().cpu(), original[n]) for n in original)
    assert not any(p.requires_grad for n, p in hf.named_parameters() if "lora_" not in n)

    out = run_dir / "06_train"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and math.isfinite(summary["final_loss"])
    assert {"accuracies", "margins", "chosen", "rejected"} <= set(summary["final_rewards"])
    assert summary["reference"]["precomputed"] and summary["reference"]["cached_pairs"] == 8
    assert summary["share_image_features"] is True and "eval_loss" in summary["eval"]
    meta = json.loads((run_dir / "06_train.meta.json").read_text())
    assert meta["versions"]["trl"] and meta["git_commit"] and meta["config"]["train"]["max_steps"] == 3
    assert (run_dir / "06_train.done").exists() and (out / "checkpoints" / "checkpoint-2").is_dir()
    assert list((out / "ref_logps").glob("*/fingerprint.json"))
    # the frozen vision tower encoded each training or validation image once, before training
    images = {r["image_id"] for r in map(json.loads, (run_dir / "05_pairs.jsonl").read_text().splitlines())}
    files = list((out / "image_features").rglob("*.safetensors"))
    assert summary["image_features"]["cached"] and len(files) == len(images) == summary["image_features"]["images"]
    assert summary["image_features"]["bytes"] == sum(f.stat().st_size for f in files) > 0

    # the saved adapter reloads through capdpo.models and generates; it changes the weights
    lm = load_vlm(str(strong), device="cpu", adapter=str(out / "adapter"))
    q_proj = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(lm.model.state_dict()[q_proj], original[q_proj])
    request = Request(key="k", image=str(sample_images[0]), messages=[user_message("Describe this image.")])
    (generated,) = Engine(lm).generate([request], Generation(max_new_tokens=6))
    assert generated.token_ids and generated.finish_reason in ("stop", "length")
    merged = load_vlm(str(out / "merged"), device="cpu").model.state_dict()
    assert torch.allclose(merged[q_proj], lm.model.state_dict()[q_proj], atol=1e-6)


# ---- full fine-tuning + Uni-DPO -------------------------------------------------------------------------------


def test_full_finetuning_with_unidpo_keeps_the_vision_tower_frozen(tiny_models, sample_images, tmp_path) -> None:
    from capdpo.models.lora import is_vision_parameter
    from capdpo.sections import load_config
    from capdpo.training.dpo import run_dpo as run_training

    strong = tiny_models["strong"]
    run_dir = tmp_path / "run"
    write_pairs(run_dir, sample_images)
    config = write_config(
        tmp_path / "run.yaml", run_dir, strong, method="full", loss_type=["unidpo"], max_steps=2, learning_rate=1e-3
    )
    outcome = run_training(load_config("train", ["--config", str(config)]))
    assert outcome.trainer.ref_model is None  # the reference lives in the cache, not in a second model

    losses = train_losses(run_dir)
    assert sorted(losses) == [1, 2] and all(math.isfinite(r["loss"]) for r in losses.values())
    assert {"unidpo/w_qual", "unidpo/w_perf", "rewards/accuracies"} <= set(losses[2])
    original = _original_weights(strong)
    trained = outcome.trainer.model.state_dict()  # the frozen vision MLPs run padded; the state has their widths
    vision = [n for n in original if is_vision_parameter(n)]
    language = [n for n in original if ".language_model.layers." in n]
    assert vision and all(torch.equal(trained[n].detach(), original[n]) for n in vision)
    assert any(not torch.equal(trained[n].detach(), original[n]) for n in language)
    assert (run_dir / "06_train" / "model" / "model.safetensors").is_file()


# ---- resume ---------------------------------------------------------------------------------------------------


def _kill_at_step(cmd: list[str], log: Path, step: int, err: Path, timeout: float = 300) -> None:
    with err.open("wb") as stderr:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.time() + timeout
        try:
            while time.time() < deadline:
                if log.exists() and any(r.get("step", 0) >= step for r in read_jsonl(log, allow_torn_tail=True)):
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    return
                if proc.poll() is not None:
                    raise AssertionError(
                        f"training ended (rc={proc.returncode}) before step {step}: {err.read_text()[-2000:]}"
                    )
                time.sleep(0.01)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    raise AssertionError(f"step {step} not reached in {timeout} s")


@pytest.mark.parametrize(
    "losses", [{}, {"loss_type": ["sigmoid", "mdpo"], "mdpo_corruption": "crop"}], ids=["dpo", "mdpo"]
)
def test_killed_then_resumed_run_logs_the_same_losses(tiny_models, sample_images, tmp_path, losses) -> None:
    from capdpo.sections import load_config
    from capdpo.training.dpo import run_dpo as run_training

    strong = tiny_models["strong"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for run_dir in (straight, resumed):
        write_pairs(run_dir, sample_images)
    settings = {"max_steps": 4, "save_steps": 2, "gradient_accumulation_steps": 2, **losses}
    run_training(
        load_config("train", ["--config", str(write_config(tmp_path / "a.yaml", straight, strong, **settings))])
    )

    config = write_config(tmp_path / "b.yaml", resumed, strong, **settings)
    cmd = [sys.executable, str(ROOT / "6_train_dpo.py"), "--config", str(config)]
    log = resumed / "06_train" / "log.jsonl"
    _kill_at_step(cmd, log, step=3, err=tmp_path / "killed.err")
    checkpoints = resumed / "06_train" / "checkpoints"
    assert (checkpoints / "checkpoint-2").is_dir()
    assert not (checkpoints / "checkpoint-4").exists(), "the run finished before the kill: nothing was resumed"
    assert not (resumed / "06_train.done").exists()

    rerun = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming from" in rerun.stdout and "checkpoint-2" in rerun.stdout
    a, b = train_losses(straight), train_losses(resumed)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert all(any(k.startswith("mdpo/") for k in r) == bool(losses) for r in [*a.values(), *b.values()])
    for step in a:
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-5, abs=1e-6), step
        assert b[step]["grad_norm"] == pytest.approx(a[step]["grad_norm"], rel=1e-4), step
    assert (resumed / "06_train.done").exists()
    assert json.loads((resumed / "06_train" / "summary.json").read_text())["resumed_from"].endswith("checkpoint-2")


# ---- DeepSpeed -------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_on_two_cpu_processes(tiny_models, sample_images, tmp_path, stage: str) -> None:
    pytest.importorskip("deepspeed", reason="requirements-deepspeed.txt is part of `make test`'s install")
    run_dir = tmp_path / "run"
    write_pairs(run_dir, sample_images)
    # ZeRO-3 also merges: the merge must not wait on the other process for a sharded load
    config = write_config(
        tmp_path / "run.yaml",
        run_dir,
        tiny_models["strong"],
        max_steps=2,
        gradient_accumulation_steps=1,
        merge=stage == "zero3",
    )
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(ROOT / "configs" / "accelerate" / f"{stage}.yaml"),
        "--num_processes", "2", "--main_process_port", str(_free_port()),
        str(ROOT / "6_train_dpo.py"), "--config", str(config),
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads((run_dir / "06_train" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["deepspeed"].endswith(f"{stage}.json")
    assert summary["reference"]["cached_pairs"] == 8  # both processes' shares of the reference pass
    # ZeRO-2: both processes' shares of the feature pass; ZeRO-3 partitions the vision tower, which then encodes
    assert summary["image_features"]["cached"] is (stage == "zero2")
    losses = train_losses(run_dir)
    assert sorted(losses) == [1, 2] and all(math.isfinite(r["loss"]) for r in losses.values())
    from safetensors.torch import load_file

    adapter = load_file(str(run_dir / "06_train" / "adapter" / "adapter_model.safetensors"))
    assert adapter and all(t.numel() > 0 for t in adapter.values())  # gathered, not this process's shard
    if stage == "zero3":
        assert (run_dir / "06_train" / "merged" / "model.safetensors").is_file()


# ---- bad input ------------------------------------------------------------------------------------------------


def _error_of(argv: list[str], capsys) -> str:
    from capdpo.stages.train_dpo import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1
    return lines[0]


def test_bad_input_gives_one_line_errors(tiny_models, sample_images, tmp_path, capsys) -> None:
    strong = tiny_models["strong"]
    run_dir = tmp_path / "run"
    config = str(write_config(tmp_path / "run.yaml", run_dir, strong))

    assert "05_pairs.jsonl: not found" in _error_of(["--config", config], capsys)

    write_pairs(run_dir, sample_images, done=False)
    message = _error_of(["--config", config], capsys)
    assert "has not finished" in message and "--allow_partial" in message

    (run_dir / "05_pairs.done").write_text("{}\n")
    assert "qlora needs a CUDA GPU" in _error_of(["--config", config, "--method", "qlora", "--device", "cpu"], capsys)
    message = _error_of(["--config", config, "--max_length", "30"], capsys)
    assert "pair pair0" in message and "image tokens" in message and "max_length is 30" in message

    records = read_jsonl(run_dir / "05_pairs.jsonl")
    duplicated = [*records, records[1]]
    (run_dir / "05_pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in duplicated))
    message = _error_of(["--config", config], capsys)
    assert f"pair id {records[1]['id']} appears twice" in message and f"record {len(duplicated)}" in message
    records[2]["image"] = str(tmp_path / "gone.png")
    (run_dir / "05_pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    message = _error_of(["--config", config], capsys)
    assert "record 3" in message and "pair pair2" in message and "gone.png not found" in message
    assert not (run_dir / "06_train").exists()  # refused before anything was written

    # the real command line: exit code 2 and the same one line
    done = subprocess.run(
        [sys.executable, str(ROOT / "6_train_dpo.py"), "--config", config],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error:") and "gone.png not found" in done.stderr


@pytest.mark.parametrize("precompute_ref", [True, False])
def test_a_resumed_full_fine_tune_continues_from_the_checkpoint_weights(
    tiny_models, sample_images, tmp_path, precompute_ref: bool
) -> None:
    """Full DPO stopped after a checkpoint and resumed logs the losses of an uninterrupted run: the policy restarts
    from the checkpoint's weights and the reference (precomputed, or copied from the policy) from the start's."""
    from capdpo.sections import load_config
    from capdpo.training.dpo import run_dpo as run_training

    strong = tiny_models["strong"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for run_dir in (straight, resumed):
        write_pairs(run_dir, sample_images)
    settings = {"max_steps": 4, "method": "full", "precompute_ref": precompute_ref, "lr_scheduler": "constant"}
    run_training(
        load_config("train", ["--config", str(write_config(tmp_path / "a.yaml", straight, strong, **settings))])
    )
    config = str(write_config(tmp_path / "b.yaml", resumed, strong, **settings))
    run_training(load_config("train", ["--config", config, "--max_steps", "2"]))
    run_training(load_config("train", ["--config", config]))
    summary = json.loads((resumed / "06_train" / "summary.json").read_text())
    assert summary["resumed_from"].endswith("checkpoint-2")
    a, b = train_losses(straight), train_losses(resumed)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-4, abs=1e-6), step


@pytest.mark.parametrize("damage", ["empty folder", "no trainer state", "corrupt weights"])
def test_a_broken_newest_checkpoint_is_skipped_with_a_warning(tiny_models, sample_images, tmp_path, capsys, damage):
    """A run killed while saving leaves a broken checkpoint: the next run resumes from the newest valid one and
    names the one it skipped; with no valid checkpoint at all it stops with one line naming it."""
    from capdpo.errors import InputError
    from capdpo.sections import load_config
    from capdpo.training.dpo import run_dpo

    run_dir = tmp_path / "run"
    write_pairs(run_dir, sample_images)
    config = str(write_config(tmp_path / "run.yaml", run_dir, tiny_models["strong"], max_steps=2, save_steps=1))
    run_dpo(load_config("train", ["--config", config]))
    checkpoints = run_dir / "06_train" / "checkpoints"
    broken = checkpoints / "checkpoint-3"  # newer than the two the run saved
    if damage == "empty folder":
        broken.mkdir()
    else:
        import shutil

        shutil.copytree(checkpoints / "checkpoint-2", broken)
        if damage == "no trainer state":
            (broken / "trainer_state.json").unlink()
        else:
            (broken / "adapter_model.safetensors").write_bytes(os.urandom(256))
    capsys.readouterr()
    outcome = run_dpo(load_config("train", ["--config", config, "--max_steps", "3"]))
    assert outcome.summary["resumed_from"].endswith("checkpoint-2")
    assert f"warning: skipping {broken}" in capsys.readouterr().out
    for folder in checkpoints.glob("checkpoint-*"):  # now every checkpoint is broken
        (folder / "trainer_state.json").unlink()
    with pytest.raises(InputError, match="no older checkpoint .* can be resumed either") as err:
        run_dpo(load_config("train", ["--config", config, "--max_steps", "4"]))
    assert "\n" not in str(err.value)
