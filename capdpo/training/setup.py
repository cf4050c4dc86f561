"""What every fine-tuning run shares: the trainer arguments, PEFT / freezing, DeepSpeed, checkpoints and
resuming, the step log, saving, merging, and the run itself (`run_training`).

DPO (`capdpo.training.dpo`) and SFT (`capdpo.training.sft`) are recipes: each describes its data, its trainer and
its summary as a `Recipe`, and `run_training` does the rest the same way for both. Recipes never import each
other.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capdpo.config import CommonConfig, LoadedConfig
from capdpo.errors import ConfigError, InputError
from capdpo.jsonl import JsonlAppender, iter_jsonl, write_json, write_jsonl
from capdpo.models.lora import is_vision_parameter, lora_target_regex
from capdpo.run import Stage
from capdpo.training.config import DEEPSPEED_PRESETS, TrainingConfig

ROOT = Path(__file__).resolve().parent.parent.parent
DEEPSPEED_DIR = ROOT / "configs" / "deepspeed"
SIGNATURE = "capdpo_signature.json"


# ---- trainer arguments ------------------------------------------------------------------------------------------
def resolve_deepspeed(settings: TrainingConfig) -> str | None:
    """The DeepSpeed JSON the trainer gets: the configured one, or the one `accelerate launch` was given."""
    from_launcher = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or None
    chosen = settings.deepspeed
    if chosen in DEEPSPEED_PRESETS:
        chosen = str(DEEPSPEED_DIR / f"{chosen}.json")
    if chosen and not Path(chosen).is_file():
        raise ConfigError(f"{settings.section}.deepspeed: {chosen} not found")
    if chosen and from_launcher and Path(chosen).resolve() != Path(from_launcher).resolve():
        raise ConfigError(
            f"{settings.section}.deepspeed: {chosen} differs from the accelerate config's deepspeed_config_file "
            f"{from_launcher}; name one of them only"
        )
    return chosen or from_launcher


def trainer_arguments(
    settings: TrainingConfig,
    common: CommonConfig,
    output_dir: Path,
    *,
    deepspeed: str | None,
    bf16: bool,
    use_cpu: bool,
    has_eval: bool,
) -> dict[str, Any]:
    """The TRL / transformers arguments every recipe passes (its own are added to these)."""
    return dict(
        output_dir=str(output_dir),
        seed=common.seed,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps or -1,
        learning_rate=settings.resolved_learning_rate(),
        lr_scheduler_type=settings.lr_scheduler,
        warmup_steps=settings.warmup_ratio,
        weight_decay=settings.weight_decay,
        max_grad_norm=settings.max_grad_norm,
        optim=settings.optim,
        bf16=bf16,
        fp16=False,
        use_cpu=use_cpu,
        deepspeed=deepspeed,
        activation_checkpointing=settings.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if settings.gradient_checkpointing else None,
        logging_steps=settings.logging_steps,
        save_strategy="steps",
        save_steps=settings.save_steps,
        save_total_limit=settings.save_total_limit or None,
        eval_strategy="steps" if (has_eval and settings.eval_steps) else "no",
        eval_steps=settings.eval_steps or None,
        report_to=[r for r in settings.report_to if r != "none"] or "none",
        remove_unused_columns=False,  # the collators read the example columns
        dataloader_num_workers=dataloader_workers(settings, use_cpu),
        disable_tqdm=True,  # one dense line per logged step instead (see StepLog)
        max_length=None,  # the collators tokenize, check lengths and truncate
    )


def dataloader_workers(settings: TrainingConfig, use_cpu: bool) -> int:
    """The DataLoader's worker processes: `dataloader_workers`, or where that is null 2 on a GPU (images decoded and
    preprocessed while the GPU runs the step) and none on CPU (where the workers would take the step's cores)."""
    if settings.dataloader_workers is not None:
        return settings.dataloader_workers
    return 0 if use_cpu else 2


def peft_setup(settings: TrainingConfig, model: Any) -> Any:
    """LoRA config whose targets are the language model's linear layers (vision only when asked); for full
    fine-tuning None, with the vision tower and projector frozen unless `freeze_vision` is off."""
    if settings.method == "full":
        if settings.freeze_vision:
            for name, param in model.named_parameters():
                if is_vision_parameter(name):
                    param.requires_grad_(False)
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=lora_target_regex(model, tuple(settings.lora_targets), include_vision=settings.lora_vision),
        bias="none",
        task_type="CAUSAL_LM",
    )


def check_qlora(settings: TrainingConfig, device: Any) -> None:
    """QLoRA's needs, checked before anything is written (the loader checks them again)."""
    if settings.method != "qlora":
        return
    if device.type != "cuda":
        raise ConfigError(
            f"{settings.section}.method: qlora needs a CUDA GPU (bitsandbytes 4-bit kernels); use lora on CPU"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            f"{settings.section}.method: qlora needs the bitsandbytes package; "
            "`pip install -r requirements-qlora.txt` (or use lora)"
        )


def speed_up_training(trainer: Any, model: Any, fused_kernels: bool, compile_layers: bool) -> dict[str, int]:
    """What DPO and SFT trainers both get once built: under DeepSpeed, ZeRO's inf/NaN check and gradient norm over
    all gradients at once (`capdpo.training.zero`, same answers); with `fused_kernels`, the training kernels of
    `tune_for_training` on `model` (the transformers model, inside any PEFT wrapper). Returns what it changed."""
    if trainer.is_deepspeed_enabled:
        from capdpo.training.zero import fast_zero_reductions

        fast_zero_reductions()
    if not fused_kernels:
        return {}
    from capdpo.models.patches import tune_for_training

    return tune_for_training(model, cuda=trainer.args.device.type == "cuda", compile_layers=compile_layers)


# ---- distributed --------------------------------------------------------------------------------------------
def init_deepspeed_comm() -> None:
    """Let DeepSpeed's comm layer adopt the process group before ZeRO-3 shards the model while it loads.

    On GPUs accelerate has done this already; on CPU processes (gloo) it has not, and ZeRO-3's loader would then
    see a world of one process.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        import deepspeed

        deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)


def end_distributed() -> None:
    """Tear the process group down (left up, the second process of a CPU run aborts at exit)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---- checkpoints ------------------------------------------------------------------------------------------------
def signature(recipe: Recipe, example_ids: list[str]) -> dict[str, Any]:
    """What a run's checkpoints are bound to: the settings in `resume_fields`, the model (and a merged-in
    adapter's hash), the seed and the data, under the recipe's key names."""
    model_key, data_key = recipe.signature_keys
    data_hash = hashlib.sha256("\n".join(example_ids).encode()).hexdigest()[:16]
    return {
        **{name: getattr(recipe.settings, name) for name in recipe.settings.resume_fields},
        model_key: recipe.model,
        **recipe.signature_extra(),
        "seed": recipe.cfg.common.seed,
        data_key: data_hash,
    }


def checkpoint_problem(folder: Path) -> str | None:
    """Why a `checkpoint-N` folder cannot be resumed from (None: it can): no or unreadable `trainer_state.json`,
    or no weights whose safetensors header reads."""
    state = folder / "trainer_state.json"
    try:
        json.loads(state.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"{'no' if not state.exists() else 'an unreadable'} trainer_state.json"
    weights = [folder / n for n in ("adapter_model.safetensors", "model.safetensors") if (folder / n).exists()]
    weights += sorted(folder.glob("model-*-of-*.safetensors"))
    if not weights:
        return "no adapter_model.safetensors or model.safetensors"
    from safetensors import safe_open

    for path in weights:
        try:
            with safe_open(str(path), framework="pt") as fh:
                fh.keys()
        except Exception as err:  # noqa: BLE001 - safetensors raises several types for a damaged file
            return f"{path.name} is not a readable safetensors file ({type(err).__name__})"
    return None


def newest_valid_checkpoint(checkpoints: Path) -> str | None:
    """The newest `checkpoint-N` folder that can be resumed from; newer broken ones are named in a warning (a run
    killed while saving leaves one) and skipped."""
    if not checkpoints.is_dir():
        return None
    found = sorted(
        (int(p.name.rsplit("-", 1)[1]), p)
        for p in checkpoints.iterdir()
        if p.is_dir() and p.name.startswith("checkpoint-") and p.name.rsplit("-", 1)[1].isdigit()
    )
    for _, folder in reversed(found):
        problem = checkpoint_problem(folder)
        if problem is None:
            return str(folder)
        print(f"warning: skipping {folder}: {problem}; resuming from an older checkpoint if there is one", flush=True)
    if found:
        newest = found[-1][1]
        raise InputError(
            f"{newest}: {checkpoint_problem(newest)}, and no older checkpoint in {checkpoints} can be resumed "
            "either; delete the broken checkpoint folders to start this training over"
        )
    return None


def checkpoint_to_resume(checkpoints: Path, settings: TrainingConfig, new: dict[str, Any], fresh: str) -> str | None:
    """The checkpoint to resume from (None: start fresh); refuses one made with other settings.

    `fresh` names what the user changes to start over instead (`run_dir`, `output_dir`).
    """
    last = newest_valid_checkpoint(checkpoints)
    if last is None:
        return None
    if not settings.resume:
        raise ConfigError(
            f"{settings.section}.resume: {checkpoints} holds checkpoints; pass --resume true to continue from "
            f"{Path(last).name}, or use a new {fresh}"
        )
    signature_path = checkpoints / SIGNATURE
    if signature_path.is_file():
        old = json.loads(signature_path.read_text())
        changed = sorted(k for k in new if old.get(k) != new[k])
        if changed:
            raise ConfigError(
                f"{checkpoints}: its checkpoints were made with other {', '.join(changed)}; resuming would mix two "
                f"trainings. Restore those settings, or use a new {fresh}"
            )
    return last


def step_of(checkpoint: str | None) -> int:
    """The optimizer step a checkpoint folder (`checkpoint-N`) was saved at; 0 for none."""
    return int(Path(checkpoint).name.rsplit("-", 1)[-1]) if checkpoint else 0


# ---- logging ----------------------------------------------------------------------------------------------------
def step_log(path: Path, resumed_step: int, tag: str, train_fields: tuple[tuple[str, str, str], ...]) -> Any:
    """A callback that appends every log to `path` and prints one dense line per logged step (main process).

    `train_fields`: (label, log key, format) of the values a training line shows after the loss.
    """
    from transformers import TrainerCallback

    class StepLog(TrainerCallback):
        def __init__(self) -> None:
            if resumed_step and path.exists():
                # steps after the checkpoint are redone: drop their old records
                kept = [r for r in iter_jsonl(path, allow_torn_tail=True) if r.get("step", 0) <= resumed_step]
                write_jsonl(path, kept)
            elif not resumed_step:
                path.unlink(missing_ok=True)
            self.last = time.time()

        def on_log(
            self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
        ) -> None:
            if not state.is_world_process_zero or not logs:
                return
            kind = (
                "eval" if any(k.startswith("eval_") for k in logs) else "end" if "train_runtime" in logs else "train"
            )
            record = {"id": f"{kind}-{state.global_step}", "kind": kind, "step": state.global_step}
            record.update({"epoch": state.epoch, **logs})
            with JsonlAppender(path) as out:
                out.write([record])
            now = time.time()
            if kind == "train":
                parts = [
                    f"[{tag}] step {state.global_step}/{state.max_steps}",
                    f"loss {logs.get('loss', float('nan')):.4f}",
                ]
                parts += [f"{label} {format(logs.get(key, float('nan')), spec)}" for label, key, spec in train_fields]
                parts += [f"lr {logs.get('learning_rate', 0):.2e}", f"{now - self.last:.1f} s"]
                print(" | ".join(parts), flush=True)
            elif kind == "eval":
                shown = {k: round(v, 4) for k, v in logs.items() if isinstance(v, float)}
                print(f"[{tag}] eval at step {state.global_step}: {json.dumps(shown)}", flush=True)
            self.last = now

    return StepLog()


# ---- saving -------------------------------------------------------------------------------------------------
def merge_adapter(common: CommonConfig, model: str, adapter: Path, target: Path, dtype: Any) -> Path:
    """Base model + adapter, merged, saved with its processor (loaded afresh on CPU: exact under ZeRO-3 and for
    QLoRA, whose training weights are 4-bit)."""
    import torch
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from capdpo.models.loading import load_vlm

    # Training is over: without this, a ZeRO-3 run would load the base model sharded (collectively) on this one
    # process and wait forever for the others.
    unset_hf_deepspeed_config()
    merged = load_vlm(
        model,
        device="cpu",
        dtype="bfloat16" if dtype == torch.bfloat16 else "float32",
        attn_implementation="sdpa",
        min_pixels=common.min_pixels or None,
        max_pixels=common.max_pixels or None,
        trust_remote_code=common.trust_remote_code,
        adapter=str(adapter),
        field="model",
    )
    merged.model.save_pretrained(str(target), safe_serialization=True)
    merged.processor.save_pretrained(str(target))
    return target


# ---- the run ----------------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    """What `run_training` leaves: the trainer (trained model included), the summary, the output folder and the
    saved adapter (or full model) folder."""

    trainer: Any
    summary: dict[str, Any]
    output: Path
    saved: Path


@dataclass
class Prepared:
    """A recipe's checked data: what `run_training` needs to know of it."""

    train: list[Any]
    val: list[Any]
    example_ids: list[str]  # every example used (train and val), sorted: the checkpoints are bound to them
    length_stats: dict[str, int]


class Recipe(ABC):
    """The parts of a fine-tuning run that differ between DPO and SFT (see `run_training`).

    Attributes set by the subclass: `cfg` (the loaded config), `settings` (its section), `tag` (the log prefix),
    `output` (the output folder), `model` (the model to train) and `model_field` (the config field that names it),
    `adapter` (an adapter merged in first, or ""), `fresh` (what to change to start over), `train_fields` (the
    step line's values; see `step_log`), `signature_keys` (the checkpoint signature's names of model and data).
    """

    cfg: LoadedConfig
    settings: TrainingConfig
    tag: str
    output: Path
    model: str
    model_field: str
    adapter: str = ""
    fresh: str = "run_dir"
    train_fields: tuple[tuple[str, str, str], ...] = ()
    signature_keys: tuple[str, str] = ("model", "data")

    @abstractmethod
    def stage(self) -> Stage:
        """The bookkeeping files beside the output folder."""

    @abstractmethod
    def prepare(self, processor: Any) -> Prepared:
        """Read and check the data before any model is loaded (one-line errors for bad input)."""

    def signature_extra(self) -> dict[str, Any]:
        """More of what the checkpoints are bound to (e.g. a merged-in adapter's hash)."""
        return {}

    @abstractmethod
    def arguments(self, base: dict[str, Any]) -> Any:
        """The trainer's arguments object (TRL's DPOConfig / SFTConfig) from the shared `base` ones."""

    @abstractmethod
    def trainer(self, lm: Any, data: Prepared, args: Any, callbacks: list[Any] | None) -> Any:
        """The trainer, model and data in place."""

    def after_save(self, trainer: Any, saved: Path) -> Path:
        """What to do with the saved adapter or model (main process); returns the trained policy's folder."""
        return saved

    def summary(
        self, trainer: Any, result: Any, data: Prepared, seconds: float, resumed_from: str | None
    ) -> dict[str, Any]:
        """The recipe's own summary figures."""
        return {}

    @abstractmethod
    def closing(self, summary: dict[str, Any], data: Prepared, saved: Path) -> tuple[dict[str, Any], str]:
        """(stats, one-paragraph summary text) for the stage's `finish`."""


def run_training(recipe: Recipe) -> Outcome:
    """Check the data, load the model, train (resuming when possible), save, merge and summarise."""
    import torch

    from capdpo.models.loading import (
        check_model_source,
        load_checkpoint_weights,
        load_for_training,
        load_processor,
        resolve_device,
        resolve_dtype,
    )

    settings, common = recipe.settings, recipe.cfg.common
    check_model_source(recipe.model, recipe.model_field)
    processor = load_processor(
        recipe.model, common.min_pixels or None, common.max_pixels or None, common.trust_remote_code
    )
    data = recipe.prepare(processor)

    deepspeed = resolve_deepspeed(settings)
    device = resolve_device(common.device)
    dtype = resolve_dtype(common.dtype, device)
    check_qlora(settings, device)
    output = recipe.output
    checkpoints = output / "checkpoints"
    bound_to = signature(recipe, data.example_ids)
    resume_from = checkpoint_to_resume(checkpoints, settings, bound_to, recipe.fresh)
    base = trainer_arguments(
        settings,
        common,
        checkpoints,
        deepspeed=deepspeed,
        bf16=dtype == torch.bfloat16,
        use_cpu=device.type == "cpu",
        has_eval=bool(data.val),
    )
    args = recipe.arguments(base)
    _ = args.device  # sets up the process group (lazily done by transformers), so process_index is right
    if deepspeed:
        init_deepspeed_comm()
    is_main = args.process_index == 0
    stage = recipe.stage()
    if is_main:
        stage.claim()  # one training per output folder at a time
        stage.done_path.unlink(missing_ok=True)
        output.mkdir(parents=True, exist_ok=True)
        stage.write_meta()
        write_json(checkpoints / SIGNATURE, bound_to)

    lm = load_for_training(
        recipe.model,
        device=common.device,
        dtype=common.dtype,
        attn_implementation=common.attn_implementation,
        min_pixels=common.min_pixels or None,
        max_pixels=common.max_pixels or None,
        trust_remote_code=common.trust_remote_code,
        quantize_4bit=settings.method == "qlora",
        adapter=recipe.adapter or None,
        field=recipe.model_field,
    )
    callbacks = (
        [step_log(output / "log.jsonl", step_of(resume_from), recipe.tag, recipe.train_fields)] if is_main else None
    )
    trainer = recipe.trainer(lm, data, args, callbacks)
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    if resume_from and settings.method == "full":
        # after the trainer exists, so a reference copied from the policy holds the starting weights
        load_checkpoint_weights(trainer.model, resume_from)  # the Trainer's own load misses VLM key names
    if resume_from and is_main:
        print(f"[{recipe.tag}] resuming from {resume_from}", flush=True)
    started = time.time()
    result = trainer.train(resume_from_checkpoint=resume_from)
    seconds = time.time() - started
    eval_metrics = trainer.evaluate() if data.val else {}

    saved = output / ("model" if settings.method == "full" else "adapter")
    trainer.save_model(str(saved))
    merged = None
    policy = saved
    if is_main:
        lm.processor.save_pretrained(str(saved))
        if settings.method == "full":
            lm.model.generation_config.save_pretrained(str(saved))
        policy = recipe.after_save(trainer, saved)
        if settings.merge and settings.method != "full":
            merged = merge_adapter(common, recipe.model, policy, output / "merged", lm.dtype)
    history = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    world = trainer.accelerator.num_processes
    summary = {
        "method": settings.method,
        "steps": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "first_loss": history[0]["loss"] if history else float("nan"),
        "final_loss": history[-1]["loss"] if history else float("nan"),
        "train_loss": getattr(result, "training_loss", float("nan")),
        "eval": {k: v for k, v in eval_metrics.items() if isinstance(v, (int, float))},
        "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "world_size": world,
        "deepspeed": trainer.args.deepspeed,
        "train_seconds": round(seconds, 2),
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if torch.cuda.is_available()
        else None,
        **recipe.summary(trainer, result, data, seconds, resume_from),
        "saved": str(saved),
        "merged": str(merged) if merged else None,
        "policy": str(policy),
        "resumed_from": resume_from,
    }
    if is_main:
        write_json(output / "summary.json", summary)
        stats, text = recipe.closing(summary, data, saved)
        stage.finish(stats, text)
    trainer.accelerator.wait_for_everyone()
    end_distributed()
    return Outcome(trainer=trainer, summary=summary, output=output, saved=saved)
