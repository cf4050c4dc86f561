"""Supervised fine-tuning of a VLM on (image, prompt, response) records, with stage 6's machinery.

A record becomes one sequence::

    [chat template + user turn (image first, then the prompt) + assistant header] [response + end-of-turn token]

rendered and tokenized exactly as stage 6 renders a pair's chosen side (`PairEncoder`), so what SFT trains on is
what the DPO stage and the generation engine see. Labels are -100 on every prompt token (the template, the image
tokens, the user's text, the assistant header); the loss covers only the response and its end-of-turn token.
TRL's SFTTrainer runs the steps (its dataset preparation is skipped: the collator builds the labels), with the
same LoRA targets (language model only by default), QLoRA loading, DeepSpeed configs and checkpoint resume as
stage 6.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from capdpo.config import CommonConfig, LoadedConfig
from capdpo.errors import ConfigError, InputError
from capdpo.jsonl import JsonlAppender, iter_jsonl, stable_id, write_json, write_jsonl
from capdpo.records import PairRecord
from capdpo.run import STAGE_FILES, Stage
from capdpo.sft_config import SftConfig
from capdpo.training.data import SEQUENCE_KEYS, PairEncoder, PromptLength

# Settings that change what a checkpoint means; resuming with different values is refused.
RESUME_SIGNATURE_FIELDS = (
    "method",
    "lora_r",
    "lora_alpha",
    "lora_targets",
    "lora_vision",
    "freeze_vision",
    "learning_rate",
    "lr_scheduler",
    "optim",
    "batch_size",
    "gradient_accumulation_steps",
    "max_length",
)
EXAMPLE_COLUMNS = ("id", "image_id", "image", "prompt", "response")


@dataclass
class SftExample:
    """One supervised example: the model should answer `prompt` about `image` with `response`."""

    id: str
    image_id: str
    image: str
    prompt: str
    response: str
    split: str = "train"

    def as_pair(self) -> PairRecord:
        """The example as a pair whose chosen side is the response (for `PairEncoder`'s rendering)."""
        return PairRecord(
            id=self.id,
            image_id=self.image_id,
            image=self.image,
            prompt=self.prompt,
            chosen=self.response,
            rejected=self.response,
            score_chosen=1.0,
            score_rejected=1.0,
            mode="sft",
        )


def read_examples(path: str | Path, default_split: str = "train") -> list[tuple[int, SftExample]]:
    """(record number, example) for every record of an SFT JSONL.

    A record needs `image`, `prompt` and `response` (or `text`, as stage 2's descriptions have); `id`, `image_id`
    and `split` are optional. Missing fields and unreadable images are one-line `InputError`s naming the record.
    """
    path = Path(path)
    out = []
    for number, record in enumerate(iter_jsonl(path), start=1):
        where = f"{path}: record {number}"
        response = record.get("response", record.get("text"))
        missing = [k for k, v in (("image", record.get("image")), ("prompt", record.get("prompt"))) if not v]
        if response is None or not str(response).strip():
            missing.append("response")
        if missing:
            raise InputError(f"{where}: missing or empty field(s) {', '.join(missing)} (need image, prompt, response)")
        if not all(isinstance(record[k], str) for k in ("image", "prompt")) or not isinstance(response, str):
            raise InputError(f"{where}: image, prompt and response must be strings")
        image = record["image"]
        if not Path(image).is_file():
            raise InputError(f"{where}: image {image} not found")
        split = record.get("split", default_split)
        if split not in ("train", "val"):
            raise InputError(f"{where}: split '{split}' is not train or val")
        example = SftExample(
            id=str(record.get("id") or stable_id("sft", number, image, record["prompt"], response)),
            image_id=str(record.get("image_id") or image),
            image=image,
            prompt=record["prompt"],
            response=response,
            split=split,
        )
        out.append((number, example))
    return out


def split_by_image(examples: list[SftExample], fraction: float, seed: int) -> list[SftExample]:
    """Examples with `split` set: images (not single records) whose seeded hash falls below `fraction` go to val."""
    if not fraction:
        return examples
    out = []
    for ex in examples:
        held_out = int(stable_id("sft-split", seed, ex.image_id)[:8], 16) / 0xFFFFFFFF < fraction
        out.append(replace(ex, split="val" if held_out else ex.split))
    return out


def torch_equal(a: Any, b: Any) -> bool:
    import torch

    return torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape and bool(torch.equal(a, b))


# ---- encoding ----------------------------------------------------------------------------------------------
@dataclass
class EncodedExample:
    prompt: dict[str, Any]  # processor output for the prompt (batch of 1): input_ids, pixel_values, ...
    response_ids: list[int]
    truncated: bool


class SftEncoder:
    """Renders and tokenizes SFT examples with a model's processor, exactly as stage 6 renders a chosen side.

    Args:
        processor: the model's processor.
        max_length: token limit of prompt + response (0: none).
        cache_images: keep each image's pixel values after its first use and expand the image tokens of the
            text directly (Qwen-style processors), instead of re-processing the image for every record and epoch.
            Checked once against the processor's own output; a processor that differs never uses the cache.
    """

    def __init__(self, processor: Any, max_length: int = 0, cache_images: bool = False) -> None:
        self.pairs = PairEncoder(processor, max_length)
        self.max_length = max_length
        self.pad_id = self.pairs.pad_id
        merge = getattr(getattr(processor, "image_processor", None), "merge_size", None)
        usable = cache_images and merge is not None and getattr(processor, "image_token", None) is not None
        self.image_cache: dict[str, dict[str, Any]] | None = {} if usable else None
        self._cache_keys: set[str] | None = None  # the processor's output keys, once checked

    def prompt_inputs(self, prompt_text: str, image_path: str) -> dict[str, Any]:
        """Processor output for one prompt with its image (batch of 1)."""
        from capdpo.engine import load_image

        processor = self.pairs.processor
        if self.image_cache is None:
            return dict(processor(text=[prompt_text], images=[load_image(image_path)], return_tensors="pt"))
        image = self.image_cache.get(image_path)
        if image is None:
            image = dict(processor.image_processor(images=[load_image(image_path)], return_tensors="pt"))
            self.image_cache[image_path] = image
        n_tokens = int(image["image_grid_thw"].prod()) // processor.image_processor.merge_size**2
        marker = "\x00capdpo-image\x00"
        text = prompt_text.replace(processor.image_token, marker).replace(marker, processor.image_token * n_tokens)
        out = dict(self.pairs.tokenizer([text], add_special_tokens=False, return_tensors="pt"))
        out["mm_token_type_ids"] = (out["input_ids"] == self.pairs.image_token_id).long()
        out.update(image)
        if self._cache_keys is None:
            reference = dict(processor(text=[prompt_text], images=[load_image(image_path)], return_tensors="pt"))
            if not (set(reference) <= set(out) and all(torch_equal(reference[k], out[k]) for k in reference)):
                self.image_cache = None  # this processor does more than expand tokens: never use the shortcut
                return reference
            self._cache_keys = set(reference)
        return {k: v for k, v in out.items() if k in self._cache_keys}

    def response_ids(self, example: SftExample) -> list[int]:
        """Token ids of the response up to and including the assistant turn's end token."""
        _, completion = self.pairs.render(example.as_pair(), example.response)
        return self.pairs.completion_ids(completion)

    def prompt_length(self, example: SftExample) -> PromptLength:
        return self.pairs.prompt_length(example.as_pair())

    def encode(self, example: SftExample) -> EncodedExample:
        pair = example.as_pair()
        prompt_text, completion = self.pairs.render(pair, example.response)
        prompt = self.prompt_inputs(prompt_text, example.image)
        response = self.pairs.completion_ids(completion)
        truncated = False
        if self.max_length:
            ids = prompt["input_ids"][0].tolist()
            image_id = self.pairs.image_token_id
            image_end = max((i + 1 for i, t in enumerate(ids) if t == image_id), default=0)
            self.pairs.check_fits(pair, PromptLength(len(ids), image_end, ids.count(image_id)), "sft data")
            room = self.max_length - len(ids)
            truncated = len(response) > room
            response = response[:room]
        return EncodedExample(prompt=dict(prompt), response_ids=response, truncated=truncated)


def example_row(example: SftExample) -> dict[str, Any]:
    """The dataset row of an example (flat string columns)."""
    return {name: getattr(example, name) for name in EXAMPLE_COLUMNS}


class SftCollator:
    """Batches examples for the trainer: right-padded input ids, labels -100 everywhere but the response tokens."""

    def __init__(self, encoder: SftEncoder) -> None:
        self.encoder = encoder
        self.truncated_ids: set[str] = set()

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        examples = [SftExample(**{k: row[k] for k in EXAMPLE_COLUMNS}) for row in rows]
        encoded = [self.encoder.encode(ex) for ex in examples]
        self.truncated_ids.update(ex.id for ex, enc in zip(examples, encoded) if enc.truncated)
        width = max(int(e.prompt["input_ids"].shape[1]) + len(e.response_ids) for e in encoded)
        seq_keys = [k for k in SEQUENCE_KEYS if k in encoded[0].prompt]
        batch: dict[str, Any] = {}
        for key in seq_keys:
            fill = self.encoder.pad_id if key == "input_ids" else 0
            out = torch.full((len(encoded), width), fill, dtype=encoded[0].prompt[key].dtype)
            for r, enc in enumerate(encoded):
                values = enc.prompt[key][0]
                n = values.shape[0]
                out[r, :n] = values
                if key == "input_ids":
                    out[r, n : n + len(enc.response_ids)] = torch.tensor(enc.response_ids, dtype=out.dtype)
                elif key == "attention_mask":
                    out[r, n : n + len(enc.response_ids)] = 1
            batch[key] = out
        labels = torch.full((len(encoded), width), -100, dtype=torch.long)
        for r, enc in enumerate(encoded):
            n = int(enc.prompt["input_ids"].shape[1])
            labels[r, n : n + len(enc.response_ids)] = torch.tensor(enc.response_ids, dtype=torch.long)
        batch["labels"] = labels
        for key, value in encoded[0].prompt.items():
            if key not in seq_keys and torch.is_tensor(value):
                batch[key] = torch.cat([e.prompt[key] for e in encoded], dim=0)
        return batch


def check_examples(examples: list[tuple[int, SftExample]], encoder: SftEncoder, source: Path | str) -> dict[str, int]:
    """Refuse duplicate ids and prompts whose image tokens max_length would cut; return length stats.

    Runs before any model is loaded; image token counts come from the image size where the processor can tell.
    """
    seen: set[str] = set()
    longest_prompt = longest_total = will_truncate = 0
    for number, example in examples:
        where = f"{source}: record {number}"
        if example.id in seen:
            raise InputError(f"{where}: id {example.id} appears twice; ids must be unique (or leave them out)")
        seen.add(example.id)
        length = encoder.prompt_length(example)
        encoder.pairs.check_fits(example.as_pair(), length, where)
        total = length.prompt + len(encoder.response_ids(example))
        longest_prompt = max(longest_prompt, length.prompt)
        longest_total = max(longest_total, total)
        will_truncate += bool(encoder.max_length and total > encoder.max_length)
    return {
        "longest_prompt_tokens": longest_prompt,
        "longest_example_tokens": longest_total,
        "examples_truncated": will_truncate,
    }


# ---- bookkeeping -------------------------------------------------------------------------------------------
class SftStage(Stage):
    """Stage bookkeeping for SFT: the output is a folder; meta, config, stats and `.done` sit beside it."""

    def __init__(self, cfg: LoadedConfig, output: Path) -> None:
        self.name = "sft"
        self.cfg = cfg
        self.run_dir = output.parent  # Stage.write_meta puts the resolved config.yaml here, beside the output
        self.output = output
        output.parent.mkdir(parents=True, exist_ok=True)
        stem = output.parent / output.name
        self.meta_path = Path(f"{stem}.meta.json")
        self.stats_path = Path(f"{stem}.stats.json")
        self.errors_path = Path(f"{stem}.errors.jsonl")
        self.done_path = Path(f"{stem}.done")
        self.errors: list[dict[str, Any]] = []
        self.counts: Counter[str] = Counter()
        self.started = time.time()


@dataclass
class SftOutcome:
    """What `run_sft` leaves: the trainer (model included), the summary and the output folder."""

    trainer: Any
    summary: dict[str, Any]
    output: Path
    saved: Path


def output_dir(cfg: LoadedConfig) -> Path:
    settings: SftConfig = cfg.section
    return Path(settings.output_dir) if settings.output_dir else Path(cfg.common.run_dir) / "sft"


def model_of(cfg: LoadedConfig) -> str:
    return cfg.section.model or cfg.common.strong_model


def load_examples(cfg: LoadedConfig) -> tuple[Path, list[tuple[int, SftExample]]]:
    """The training file and every example (train and val), validation records from val_file or val_fraction."""
    settings: SftConfig = cfg.section
    if settings.data_file:
        source = Path(settings.data_file)
        if not source.is_file():
            raise InputError(f"sft.data_file: {source} not found")
    else:
        source = Path(cfg.common.run_dir) / STAGE_FILES["describe"]
        Stage("describe", cfg).read_input("describe")  # refuses an unfinished stage 2 unless allow_partial
    examples = read_examples(source)
    if settings.val_file:
        if not Path(settings.val_file).is_file():
            raise InputError(f"sft.val_file: {settings.val_file} not found")
        examples += read_examples(settings.val_file, default_split="val")
    split = split_by_image([ex for _, ex in examples], settings.val_fraction, cfg.common.seed)
    return source, [(n, ex) for (n, _), ex in zip(examples, split)]


def sft_args(
    settings: SftConfig,
    common: CommonConfig,
    checkpoints: Path,
    *,
    deepspeed: str | None,
    bf16: bool,
    use_cpu: bool,
    has_eval: bool,
) -> Any:
    """TRL's SFTConfig for our settings (built before the model is loaded, so ZeRO-3 can shard it while loading)."""
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(checkpoints),
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
        remove_unused_columns=False,  # the collator reads the example columns
        dataloader_num_workers=settings.dataloader_workers,
        disable_tqdm=True,
        # the collator renders, tokenizes, masks and truncates
        dataset_kwargs={"skip_prepare_dataset": True},
        max_length=None,
        packing=False,
    )


def _signature(settings: SftConfig, cfg: LoadedConfig, example_ids: list[str]) -> dict[str, Any]:
    signature = {name: getattr(settings, name) for name in RESUME_SIGNATURE_FIELDS}
    data_hash = hashlib.sha256("\n".join(example_ids).encode()).hexdigest()[:16]
    return {**signature, "model": model_of(cfg), "seed": cfg.common.seed, "examples": data_hash}


def check_resume(checkpoints: Path, cfg: LoadedConfig, example_ids: list[str]) -> str | None:
    """The checkpoint to resume from (None: start fresh); refuses one made with other settings."""
    from transformers.trainer_utils import get_last_checkpoint

    settings: SftConfig = cfg.section
    last = get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None
    if last is None:
        return None
    if not settings.resume:
        raise ConfigError(
            f"sft.resume: {checkpoints} holds checkpoints; pass --resume true to continue from {Path(last).name}, "
            "or use a new output_dir"
        )
    signature_path = checkpoints / "capdpo_signature.json"
    if signature_path.is_file():
        old = json.loads(signature_path.read_text())
        new = _signature(settings, cfg, example_ids)
        changed = sorted(k for k in new if old.get(k) != new[k])
        if changed:
            raise ConfigError(
                f"{checkpoints}: its checkpoints were made with other {', '.join(changed)}; resuming would mix two "
                "trainings. Restore those settings, or use a new output_dir"
            )
    return last


def _step_log(path: Path, resumed_step: int) -> Any:
    from transformers import TrainerCallback

    class StepLog(TrainerCallback):
        """Appends every log to log.jsonl and prints one dense line per logged step (main process)."""

        def __init__(self) -> None:
            if resumed_step and path.exists():
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
            record = {"id": f"{kind}-{state.global_step}", "kind": kind, "step": state.global_step, **logs}
            with JsonlAppender(path) as out:
                out.write([record])
            now = time.time()
            if kind == "train":
                print(
                    f"[sft] step {state.global_step}/{state.max_steps} | loss {logs.get('loss', float('nan')):.4f}"
                    f" | token acc {logs.get('mean_token_accuracy', float('nan')):.3f}"
                    f" | lr {logs.get('learning_rate', 0):.2e} | {now - self.last:.1f} s",
                    flush=True,
                )
            elif kind == "eval":
                print(f"[sft] eval at step {state.global_step}: loss {logs.get('eval_loss', float('nan')):.4f}")
            self.last = now

    return StepLog()


def build_sft_trainer(
    settings: SftConfig,
    lm: Any,
    train: list[SftExample],
    val: list[SftExample],
    args: Any,
    callbacks: list[Any] | None = None,
) -> Any:
    """TRL's SFTTrainer over `SftCollator` batches, with stage 6's LoRA targets (language model only by default)."""
    from datasets import Dataset
    from trl import SFTTrainer

    from capdpo.stages.train import lora_config
    from capdpo.training.trainer import is_vision_parameter

    peft_config = None
    if settings.method == "full":
        if settings.freeze_vision:
            for name, param in lm.model.named_parameters():
                if is_vision_parameter(name):
                    param.requires_grad_(False)
    else:
        peft_config = lora_config(settings, lm.model)
    collator = SftCollator(SftEncoder(lm.processor, settings.max_length, settings.cache_images))
    return SFTTrainer(
        model=lm.model,
        args=args,
        data_collator=collator,
        train_dataset=Dataset.from_list([example_row(e) for e in train]),
        eval_dataset=Dataset.from_list([example_row(e) for e in val]) if val else None,
        processing_class=lm.processor,
        peft_config=peft_config,
        callbacks=callbacks,
    )


def resolve_deepspeed(settings: SftConfig) -> str | None:
    """The DeepSpeed JSON the trainer gets (stage 6's rule, errors named for the sft section)."""
    from capdpo.stages.train import resolve_deepspeed as stage6_resolve

    try:
        return stage6_resolve(settings)
    except ConfigError as err:
        raise ConfigError(str(err).replace("train.deepspeed", "sft.deepspeed")) from None


def run_sft(cfg: LoadedConfig) -> SftOutcome:
    """Check the data, load the model, fine-tune (resuming when possible), save and summarise."""
    settings: SftConfig = cfg.section
    common = cfg.common
    output = output_dir(cfg)
    source, examples = load_examples(cfg)
    train = [ex for _, ex in examples if ex.split == "train"]
    val = [ex for _, ex in examples if ex.split == "val"]
    if settings.max_examples:
        train = train[: settings.max_examples]
    if not train:
        raise InputError(f"{source}: no training records")
    used = {ex.id for ex in train + val}

    from capdpo.models import check_model_source, load_for_training, load_processor, resolve_device, resolve_dtype

    model = model_of(cfg)
    check_model_source(model, "sft.model")
    processor = load_processor(model, common.min_pixels or None, common.max_pixels or None, common.trust_remote_code)
    length_stats = check_examples(
        [(n, ex) for n, ex in examples if ex.id in used], SftEncoder(processor, settings.max_length), source
    )

    deepspeed = resolve_deepspeed(settings)
    device = resolve_device(common.device)
    import torch

    dtype = resolve_dtype(common.dtype, device)
    checkpoints = output / "checkpoints"
    example_ids = sorted(used)
    resume_from = check_resume(checkpoints, cfg, example_ids)
    args = sft_args(
        settings,
        common,
        checkpoints,
        deepspeed=deepspeed,
        bf16=dtype == torch.bfloat16,
        use_cpu=device.type == "cpu",
        has_eval=bool(val),
    )
    _ = args.device  # sets up the process group, so process_index is right
    is_main = args.process_index == 0
    stage = SftStage(cfg, output)
    if is_main:
        stage.done_path.unlink(missing_ok=True)
        output.mkdir(parents=True, exist_ok=True)
        stage.write_meta()
        write_json(checkpoints / "capdpo_signature.json", _signature(settings, cfg, example_ids))

    lm = load_for_training(
        model,
        device=common.device,
        dtype=common.dtype,
        attn_implementation=common.attn_implementation,
        min_pixels=common.min_pixels or None,
        max_pixels=common.max_pixels or None,
        trust_remote_code=common.trust_remote_code,
        quantize_4bit=settings.method == "qlora",
        field="sft.model",
    )
    resumed_step = int(Path(resume_from).name.rsplit("-", 1)[-1]) if resume_from else 0
    callbacks = [_step_log(output / "log.jsonl", resumed_step)] if is_main else None
    trainer = build_sft_trainer(settings, lm, train, val, args, callbacks)
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    if resume_from and settings.method == "full":
        from capdpo.models import load_checkpoint_weights

        load_checkpoint_weights(trainer.model, resume_from)  # the Trainer's own load misses VLM key names
    if resume_from and is_main:
        print(f"[sft] resuming from {resume_from}", flush=True)
    started = time.time()
    result = trainer.train(resume_from_checkpoint=resume_from)
    seconds = time.time() - started
    eval_metrics = trainer.evaluate() if val else {}

    saved = output / ("model" if settings.method == "full" else "adapter")
    trainer.save_model(str(saved))
    merged = None
    if is_main:
        lm.processor.save_pretrained(str(saved))
        if settings.method == "full":
            lm.model.generation_config.save_pretrained(str(saved))
        if settings.merge and settings.method != "full":
            from capdpo.stages.train import merge_adapter

            merged = merge_adapter(replace(common, strong_model=model), saved, output / "merged", lm.dtype)
    history = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    summary = {
        "model": model,
        "method": settings.method,
        "train_examples": len(train),
        "val_examples": len(val),
        "steps": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "first_loss": history[0]["loss"] if history else float("nan"),
        "final_loss": history[-1]["loss"] if history else float("nan"),
        "final_token_accuracy": history[-1].get("mean_token_accuracy", float("nan")) if history else float("nan"),
        "train_loss": getattr(result, "training_loss", float("nan")),
        "eval": {k: v for k, v in eval_metrics.items() if isinstance(v, (int, float))},
        "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "world_size": trainer.accelerator.num_processes,
        "deepspeed": trainer.args.deepspeed,
        "train_seconds": round(seconds, 2),
        "truncated_responses": length_stats["examples_truncated"],
        "longest_example_tokens": length_stats["longest_example_tokens"],
        "saved": str(saved),
        "merged": str(merged) if merged else None,
        "resumed_from": resume_from,
    }
    if is_main:
        write_json(output / "summary.json", summary)
        stats = {k: summary[k] for k in ("train_examples", "val_examples", "steps", "final_loss", "train_seconds")}
        text = (
            f"{summary['steps']} steps on {len(train)} records, loss {summary['first_loss']:.4f} -> "
            f"{summary['final_loss']:.4f}; {saved.name} in {saved}."
        )
        stage.finish(stats, text)
    trainer.accelerator.wait_for_everyone()
    from capdpo.stages.train import _end_distributed

    _end_distributed()
    return SftOutcome(trainer=trainer, summary=summary, output=output, saved=saved)
