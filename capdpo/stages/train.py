"""Stage 6: DPO training of the strong model on the preference pairs (LoRA on the language model by default).

    python 6_train_dpo.py --config configs/demo.yaml [--method full --loss_type unidpo --max_steps 100 ...]
    accelerate launch --config_file configs/accelerate/zero2.yaml --num_processes 8 \\
        6_train_dpo.py --config run.yaml

Reads `05_pairs.jsonl` (refusing an unfinished one unless --allow_partial; `pairs_file` names another file in
the same format) and trains on the `train` split, evaluating on `val`. Before any model is loaded every pair is
checked: a missing image, a duplicate id, or a prompt whose image tokens `max_length` would cut is a one-line
error. Then, unless `precompute_ref: false`, a reference pass computes each pair's reference log-probs once
(cached in `06_train/ref_logps/`), and training runs TRL's DPOTrainer with each image encoded once per pair
(see `capdpo.training.trainer`).

Outputs, in `<run_dir>/`:
  06_train/adapter/      LoRA adapter + processor (full fine-tuning: 06_train/model/)
  06_train/merged/       base model with the adapter merged in (with `merge: true`)
  06_train/checkpoints/  resumable checkpoints; rerunning the same command continues from the last one
  06_train/log.jsonl     one record per logged step (loss, rewards/accuracies, rewards/margins, ...)
  06_train/summary.json  final loss, reward accuracy and margins, eval metrics, speed, reference pass
  06_train.meta.json, 06_train.config.yaml, 06_train.stats.json, 06_train.done   as for every stage
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capdpo.cli import run_cli
from capdpo.config import CommonConfig, LoadedConfig, load_config
from capdpo.errors import ConfigError, InputError
from capdpo.jsonl import JsonlAppender, iter_jsonl, write_json, write_jsonl
from capdpo.records import PairRecord
from capdpo.run import STAGE_FILES, Stage
from capdpo.train_config import DEEPSPEED_PRESETS, TrainConfig

ROOT = Path(__file__).resolve().parent.parent.parent
DEEPSPEED_DIR = ROOT / "configs" / "deepspeed"
OUTPUT_DIR = "06_train"
# Settings that change what a checkpoint means; resuming with different values is refused.
RESUME_SIGNATURE_FIELDS = (
    "method",
    "lora_r",
    "lora_alpha",
    "lora_targets",
    "lora_vision",
    "freeze_vision",
    "loss_type",
    "loss_weights",
    "beta",
    "learning_rate",
    "lr_scheduler",
    "optim",
    "batch_size",
    "gradient_accumulation_steps",
    "max_length",
)


class TrainStage(Stage):
    """Stage bookkeeping for training: its output is a folder, `<run_dir>/06_train/`.

    Meta, config, stats, errors and the completion marker sit beside it with the same names every stage uses
    (`06_train.meta.json`, ..., `06_train.done`).
    """

    def __init__(self, cfg: LoadedConfig) -> None:
        self.name = "train"
        self.cfg = cfg
        self.run_dir = Path(cfg.common.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.output = self.run_dir / OUTPUT_DIR
        self.meta_path = self.run_dir / f"{OUTPUT_DIR}.meta.json"
        self.stats_path = self.run_dir / f"{OUTPUT_DIR}.stats.json"
        self.errors_path = self.run_dir / f"{OUTPUT_DIR}.errors.jsonl"
        self.done_path = self.run_dir / f"{OUTPUT_DIR}.done"
        self.errors: list[dict[str, Any]] = []
        self.counts: Counter[str] = Counter()
        self.started = time.time()


@dataclass
class TrainOutcome:
    """What `run_training` leaves: the trainer (model included), the summary and the output folder."""

    trainer: Any
    summary: dict[str, Any]
    output: Path


def main(argv: list[str] | None = None) -> None:
    run_cli(_main, argv)


def _main(argv: list[str] | None) -> None:
    cfg = load_config("train", argv, description=__doc__.split("\n\n")[0])
    run_training(cfg)


# ---- inputs ---------------------------------------------------------------------------------------------------
def load_pairs(stage: TrainStage, settings: TrainConfig) -> tuple[Path, list[tuple[int, PairRecord]]]:
    """The pairs file and its records (record number, pair)."""
    if settings.pairs_file:
        path = Path(settings.pairs_file)
        if not path.is_file():
            raise InputError(f"train.pairs_file: {path} not found")
        records = list(iter_jsonl(path))
    else:
        path = stage.run_dir / STAGE_FILES["pairs"]
        records = stage.read_input("pairs")
    pairs = [(n, PairRecord.from_dict(r, where=f"{path}: record {n}")) for n, r in enumerate(records, start=1)]
    return path, pairs


def resolve_deepspeed(settings: TrainConfig) -> str | None:
    """The DeepSpeed JSON the trainer gets: the configured one, or the one `accelerate launch` was given."""
    from_launcher = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or None
    chosen = settings.deepspeed
    if chosen in DEEPSPEED_PRESETS:
        chosen = str(DEEPSPEED_DIR / f"{chosen}.json")
    if chosen and not Path(chosen).is_file():
        raise ConfigError(f"train.deepspeed: {chosen} not found")
    if chosen and from_launcher and Path(chosen).resolve() != Path(from_launcher).resolve():
        raise ConfigError(
            f"train.deepspeed: {chosen} differs from the accelerate config's deepspeed_config_file {from_launcher}; "
            "name one of them only"
        )
    return chosen or from_launcher


def dpo_args(
    settings: TrainConfig,
    common: CommonConfig,
    output_dir: Path,
    *,
    deepspeed: str | None,
    bf16: bool,
    use_cpu: bool,
    has_eval: bool,
) -> Any:
    """TRL's DPOConfig for our settings. Built before the model is loaded, so ZeRO-3 can shard it while loading."""
    from trl import DPOConfig

    eval_strategy = "steps" if (has_eval and settings.eval_steps) else "no"
    return DPOConfig(
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
        eval_strategy=eval_strategy,
        eval_steps=settings.eval_steps or None,
        report_to=[r for r in settings.report_to if r != "none"] or "none",
        remove_unused_columns=False,  # our collator reads the pair columns (id, scores, assistant_prefix)
        dataloader_num_workers=settings.dataloader_workers,
        disable_tqdm=True,  # one dense line per logged step instead (see StepLog)
        # the loss
        beta=settings.resolved_beta(),
        loss_type=list(settings.loss_type),
        loss_weights=list(settings.loss_weights) or None,
        label_smoothing=settings.label_smoothing,
        ld_alpha=settings.ld_alpha,
        use_weighting=settings.use_weighting,
        f_divergence_type=settings.f_divergence_type,
        f_alpha_divergence_coef=settings.f_alpha_divergence_coef,
        discopop_tau=settings.discopop_tau,
        disable_dropout=settings.disable_dropout,
        # our collator tokenizes, checks lengths and truncates; TRL's reference precompute is ours too
        max_length=None,
        precompute_ref_log_probs=False,
    )


def lora_config(settings: TrainConfig, model: Any) -> Any:
    """PEFT LoRA config whose targets are the language model's linear layers (vision only when asked)."""
    from peft import LoraConfig

    from capdpo.models import lora_target_regex

    return LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=lora_target_regex(model, tuple(settings.lora_targets), include_vision=settings.lora_vision),
        bias="none",
        task_type="CAUSAL_LM",
    )


def reference_fingerprint(
    settings: TrainConfig, common: CommonConfig, lm: Any, weights: dict[str, Any] | None = None
) -> dict[str, Any]:
    """What the cached reference log-probs depend on (the cache folder is a hash of it)."""
    from capdpo.training.reference import weights_signature

    template = getattr(lm.processor, "chat_template", None) or ""
    image_processor = getattr(lm.processor, "image_processor", None)
    return {
        "model": lm.name,
        "weights": weights if weights is not None else weights_signature(lm.name, lm.model),
        "reference": "initial weights" if settings.method == "full" else "base model (adapter disabled)",
        "dtype": str(lm.dtype),
        "attention": getattr(lm.model.config, "_attn_implementation", None),
        "image_size": getattr(image_processor, "size", None),
        "max_length": settings.max_length,
        "chat_template": hashlib.sha256(str(template).encode()).hexdigest()[:16],
        **_strong_adapter_key(common),
    }


# ---- logging --------------------------------------------------------------------------------------------------
def _step_log_callback(path: Path, resumed_step: int, total_hint: int) -> Any:
    from transformers import TrainerCallback

    class StepLog(TrainerCallback):
        """Appends every log to log.jsonl and prints one dense line per logged step (main process)."""

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
                "eval" if any(k.startswith("eval_") for k in logs) else ("end" if "train_runtime" in logs else "train")
            )
            record = {
                "id": f"{kind}-{state.global_step}",
                "kind": kind,
                "step": state.global_step,
                "epoch": state.epoch,
                **logs,
            }
            with JsonlAppender(path) as out:
                out.write([record])
            now = time.time()
            if kind == "train":
                print(
                    f"[train] step {state.global_step}/{state.max_steps or total_hint} | loss {logs.get('loss', float('nan')):.4f}"
                    f" | acc {logs.get('rewards/accuracies', float('nan')):.2f} | margin {logs.get('rewards/margins', float('nan')):+.4f}"
                    f" | lr {logs.get('learning_rate', 0):.2e} | {now - self.last:.1f} s",
                    flush=True,
                )
            elif kind == "eval":
                print(
                    f"[train] eval at step {state.global_step}: "
                    + json.dumps({k: round(v, 4) for k, v in logs.items() if isinstance(v, float)}),
                    flush=True,
                )
            self.last = now

    return StepLog()


# ---- the run --------------------------------------------------------------------------------------------------
def build_trainer(
    settings: TrainConfig,
    lm: Any,
    train_pairs: list[PairRecord],
    val_pairs: list[PairRecord],
    args: Any,
    *,
    reference_root: Path | None,
    fingerprint: dict[str, Any] | None = None,
    callbacks: list[Any] | None = None,
) -> Any:
    """Our DPOTrainer over the pairs (also used by bench/train_gpu.py with an in-memory model)."""
    from datasets import Dataset

    from capdpo.training.data import PairCollator, PairEncoder, pair_to_example
    from capdpo.training.losses import UniDPOParams
    from capdpo.training.reference import ReferenceCache
    from capdpo.training.trainer import CapdpoDPOTrainer, is_vision_parameter

    peft_config = None
    if settings.method == "full":
        if settings.freeze_vision:
            for name, param in lm.model.named_parameters():
                if is_vision_parameter(name):
                    param.requires_grad_(False)
    else:
        peft_config = lora_config(settings, lm.model)
    encoder = PairEncoder(lm.processor, settings.max_length)
    reference = None
    if settings.precompute_ref and reference_root is not None:
        reference = ReferenceCache(reference_root, fingerprint or {})
    collator = PairCollator(encoder, settings.share_image_features, reference=reference, ld_alpha=settings.ld_alpha)
    reference_collator = PairCollator(encoder, settings.share_image_features)
    train_dataset = Dataset.from_list([pair_to_example(p) for p in train_pairs])
    eval_dataset = Dataset.from_list([pair_to_example(p) for p in val_pairs]) if val_pairs else None
    unidpo = UniDPOParams(
        beta=settings.resolved_beta(),
        eta=settings.unidpo_eta,
        tau_ref=settings.unidpo_tau_ref,
        gamma=settings.unidpo_gamma,
        nll_lambda=settings.unidpo_nll_lambda,
        tau_good=settings.unidpo_tau_good,
    )
    return CapdpoDPOTrainer(
        model=lm.model,
        args=args,
        data_collator=collator,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=lm.processor,
        peft_config=peft_config,
        callbacks=callbacks,
        loss_type=list(settings.loss_type),
        unidpo=unidpo,
        score_range=(settings.unidpo_score_low, settings.unidpo_score_high),
        reference=reference,
        reference_collator=reference_collator,
        reference_batch_size=settings.ref_batch_size,
    )


def _check_resume(checkpoints: Path, settings: TrainConfig, common: CommonConfig, pair_ids: list[str]) -> str | None:
    """The checkpoint to resume from (None: start fresh); refuses one made with other settings."""
    from transformers.trainer_utils import get_last_checkpoint

    signature = _signature(settings, common, pair_ids)
    signature_path = checkpoints / "capdpo_signature.json"
    last = get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None
    if last is None:
        return None
    if not settings.resume:
        raise ConfigError(
            f"train.resume: {checkpoints} holds checkpoints; pass --resume true to continue from {Path(last).name}, "
            "or use a new run_dir"
        )
    if signature_path.is_file():
        old = json.loads(signature_path.read_text())
        changed = sorted(k for k in signature if old.get(k) != signature[k])
        if changed:
            raise ConfigError(
                f"{checkpoints}: its checkpoints were made with other {', '.join(changed)}; resuming would mix two "
                "trainings. Restore those settings, or use a new run_dir"
            )
    return last


def run_training(cfg: LoadedConfig) -> TrainOutcome:
    """Check the pairs, load the model, train (resuming when possible), save and summarise."""
    settings: TrainConfig = cfg.section
    common = cfg.common
    stage = TrainStage(cfg)
    source, pairs = load_pairs(stage, settings)
    train_pairs = [p for _, p in pairs if p.split == "train"]
    val_pairs = [p for _, p in pairs if p.split != "train"]
    if settings.max_pairs:
        train_pairs = train_pairs[: settings.max_pairs]
    if not train_pairs:
        raise InputError(f"{source}: no pairs in the train split")

    from capdpo.models import check_model_source, load_for_training, load_processor, resolve_device, resolve_dtype
    from capdpo.training.data import PairEncoder, check_pairs

    check_model_source(common.strong_model, "strong_model")
    processor = load_processor(
        common.strong_model, common.min_pixels or None, common.max_pixels or None, common.trust_remote_code
    )
    used = {p.id for p in train_pairs + val_pairs}
    length_stats = check_pairs(
        [(n, p) for n, p in pairs if p.id in used], PairEncoder(processor, settings.max_length), source
    )

    deepspeed = resolve_deepspeed(settings)
    device = resolve_device(common.device)
    dtype = resolve_dtype(common.dtype, device)
    _check_qlora(settings, device)
    import torch

    output = stage.output
    checkpoints = output / "checkpoints"
    resume_from = _check_resume(checkpoints, settings, common, sorted(used))
    args = dpo_args(
        settings,
        common,
        checkpoints,
        deepspeed=deepspeed,
        bf16=dtype == torch.bfloat16,
        use_cpu=device.type == "cpu",
        has_eval=bool(val_pairs),
    )
    _ = args.device  # sets up the process group (lazily done by transformers), so process_index is right
    if deepspeed:
        _init_deepspeed_comm()
    is_main = args.process_index == 0
    if is_main:
        stage.done_path.unlink(missing_ok=True)
        output.mkdir(parents=True, exist_ok=True)
        stage.write_meta()
        _write_signature(checkpoints, settings, common, sorted(used))

    lm = load_for_training(
        common.strong_model,
        device=common.device,
        dtype=common.dtype,
        attn_implementation=common.attn_implementation,
        min_pixels=common.min_pixels or None,
        max_pixels=common.max_pixels or None,
        trust_remote_code=common.trust_remote_code,
        quantize_4bit=settings.method == "qlora",
        adapter=common.strong_adapter or None,
        field="strong_model",
    )
    resumed_step = int(Path(resume_from).name.rsplit("-", 1)[-1]) if resume_from else 0
    log = _step_log_callback(output / "log.jsonl", resumed_step, 0) if is_main else None
    trainer = build_trainer(
        settings,
        lm,
        train_pairs,
        val_pairs,
        args,
        reference_root=output / "ref_logps",
        fingerprint=reference_fingerprint(settings, common, lm),
        callbacks=[log] if log else None,
    )
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    if resume_from and settings.method == "full":
        from capdpo.models import load_checkpoint_weights

        # after the trainer exists, so a reference copied from the policy holds the starting weights
        load_checkpoint_weights(trainer.model, resume_from)  # the Trainer's own load misses VLM key names
    if resume_from and is_main:
        print(f"[train] resuming from {resume_from}", flush=True)
    started = time.time()
    result = trainer.train(resume_from_checkpoint=resume_from)
    train_seconds = time.time() - started
    eval_metrics = trainer.evaluate() if val_pairs else {}

    saved = output / ("model" if settings.method == "full" else "adapter")
    trainer.save_model(str(saved))
    merged = None
    policy = saved  # the trained model relative to strong_model alone
    if is_main:
        lm.processor.save_pretrained(str(saved))
        if common.strong_adapter and settings.method != "full":
            from capdpo.rounds import POLICY_ADAPTER, compose_adapters

            # `saved` trained on strong_model + strong_adapter; one adapter on strong_model holds both, exactly
            policy = compose_adapters(common.strong_adapter, saved, output / POLICY_ADAPTER)
        if settings.merge and settings.method != "full":
            merged = merge_adapter(common, policy, output / "merged", lm.dtype)
    summary = _summary(
        trainer,
        result,
        eval_metrics,
        settings,
        train_pairs,
        val_pairs,
        length_stats,
        train_seconds,
        saved,
        merged,
        resume_from,
    )
    if is_main:
        summary["policy"] = str(policy)
        write_json(output / "summary.json", summary)
        stats = {k: summary[k] for k in ("train_pairs", "val_pairs", "steps", "final_loss", "pairs_per_second")}
        stats["truncated_completions"] = length_stats["pairs_truncated"]
        text = (
            f"{summary['steps']} steps on {len(train_pairs)} pairs, final loss {summary['final_loss']:.4f}, "
            f"reward accuracy {summary['final_rewards'].get('accuracies', float('nan')):.2f}; {saved.name} in {saved}."
        )
        stage.finish(stats, text)
    trainer.accelerator.wait_for_everyone()
    _end_distributed()
    return TrainOutcome(trainer=trainer, summary=summary, output=output)


def _signature(settings: TrainConfig, common: CommonConfig, pair_ids: list[str]) -> dict[str, Any]:
    signature = {name: getattr(settings, name) for name in RESUME_SIGNATURE_FIELDS}
    pairs_hash = hashlib.sha256("\n".join(pair_ids).encode()).hexdigest()[:16]
    return {
        **signature,
        "strong_model": common.strong_model,
        **_strong_adapter_key(common),
        "seed": common.seed,
        "pairs": pairs_hash,
    }


def _strong_adapter_key(common: CommonConfig) -> dict[str, str]:
    """The merged-in adapter's content hash, for fingerprints (nothing without one, so older keys stay valid)."""
    from capdpo.models import adapter_identity

    return {"strong_adapter": adapter_identity(common.strong_adapter)} if common.strong_adapter else {}


def _write_signature(checkpoints: Path, settings: TrainConfig, common: CommonConfig, pair_ids: list[str]) -> None:
    write_json(checkpoints / "capdpo_signature.json", _signature(settings, common, pair_ids))


def merge_adapter(common: CommonConfig, adapter: Path, target: Path, dtype: Any) -> Path:
    """Base model + adapter, merged, saved with its processor (loaded afresh on CPU: exact under ZeRO-3 and for
    QLoRA, whose training weights are 4-bit)."""
    import torch
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from capdpo.models import load_vlm

    # Training is over: without this, a ZeRO-3 run would load the base model sharded (collectively) on this one
    # process and wait forever for the others.
    unset_hf_deepspeed_config()
    merged = load_vlm(
        common.strong_model,
        device="cpu",
        dtype="bfloat16" if dtype == torch.bfloat16 else "float32",
        attn_implementation="sdpa",
        min_pixels=common.min_pixels or None,
        max_pixels=common.max_pixels or None,
        trust_remote_code=common.trust_remote_code,
        adapter=str(adapter),
        field="strong_model",
    )
    merged.model.save_pretrained(str(target), safe_serialization=True)
    merged.processor.save_pretrained(str(target))
    return target


def _summary(
    trainer: Any,
    result: Any,
    eval_metrics: dict[str, Any],
    settings: TrainConfig,
    train_pairs: list[PairRecord],
    val_pairs: list[PairRecord],
    length_stats: dict[str, int],
    seconds: float,
    saved: Path,
    merged: Path | None,
    resume_from: str | None,
) -> dict[str, Any]:
    import torch

    history = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    last = history[-1] if history else {}
    state = trainer.state
    world = trainer.accelerator.num_processes
    pairs_per_step = settings.batch_size * settings.gradient_accumulation_steps * world
    steps_run = state.global_step - (int(Path(resume_from).name.rsplit("-", 1)[-1]) if resume_from else 0)
    summary = {
        "train_pairs": len(train_pairs),
        "val_pairs": len(val_pairs),
        "steps": state.global_step,
        "epochs": state.epoch,
        "final_loss": last.get("loss", float("nan")),
        "train_loss": getattr(result, "training_loss", float("nan")),
        "final_rewards": {k.split("/", 1)[1]: v for k, v in last.items() if k.startswith("rewards/")},
        "eval": {k: v for k, v in eval_metrics.items() if isinstance(v, (int, float))},
        "method": settings.method,
        "loss_type": list(settings.loss_type),
        "beta": settings.resolved_beta(),
        "world_size": world,
        "deepspeed": trainer.args.deepspeed,
        "share_image_features": trainer.share_images,
        "reference": {
            "precomputed": trainer.reference is not None,
            "computed_now": trainer.reference_computed,
            "cached_pairs": len(trainer.reference) if trainer.reference is not None else 0,
            "seconds": round(trainer.reference_seconds, 2),
            "folder": str(trainer.reference.folder) if trainer.reference is not None else None,
        },
        "truncated_completions": length_stats["pairs_truncated"],
        "longest_pair_tokens": length_stats["longest_pair_tokens"],
        "train_seconds": round(seconds, 2),
        "pairs_per_second": round(steps_run * pairs_per_step / seconds, 4) if seconds > 0 and steps_run > 0 else 0.0,
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if torch.cuda.is_available()
        else None,
        "saved": str(saved),
        "merged": str(merged) if merged else None,
        "resumed_from": resume_from,
    }
    return summary


def _check_qlora(settings: TrainConfig, device: Any) -> None:
    """QLoRA's needs, checked before anything is written (the loader checks them again)."""
    import importlib.util

    if settings.method != "qlora":
        return
    if device.type != "cuda":
        raise ConfigError("train.method: qlora needs a CUDA GPU (bitsandbytes 4-bit kernels); use lora on CPU")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            "train.method: qlora needs the bitsandbytes package; `pip install -r requirements-qlora.txt` (or use lora)"
        )


def _init_deepspeed_comm() -> None:
    """Let DeepSpeed's comm layer adopt the process group before ZeRO-3 shards the model while it loads.

    On GPUs accelerate has done this already; on CPU processes (gloo) it has not, and ZeRO-3's loader would then
    see a world of one process.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        import deepspeed

        deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)


def _end_distributed() -> None:
    import torch.distributed as dist

    # Leaving the process group up makes the second process of a CPU run abort at exit.
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
