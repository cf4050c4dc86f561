"""The DPO recipe (stage 6): preference pairs in, the strong model's adapter out.

Before any model is loaded every pair is checked: a missing image, a duplicate id, or a prompt whose image tokens
`max_length` would cut is a one-line error. Then, unless `precompute_ref: false`, a reference pass computes each
pair's reference log-probs once (cached in `06_train/ref_logps/`), and training runs TRL's DPOTrainer with each
image encoded once per pair (`capdpo.training.trainer`). With `strong_adapter` (an earlier round's policy) the
adapter trained here is composed with it into `06_train/policy_adapter/`.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict
from pathlib import Path
from typing import Any

from capdpo.config import CommonConfig, LoadedConfig
from capdpo.errors import InputError
from capdpo.jsonl import iter_jsonl
from capdpo.models.adapters import adapter_identity, compose_adapters
from capdpo.pipeline import stage as stage_info
from capdpo.records import PairRecord
from capdpo.run import Stage
from capdpo.training.config import DpoConfig
from capdpo.training.setup import Outcome, Prepared, Recipe, peft_setup, run_training, step_of, trainer_arguments

POLICY_ADAPTER = "policy_adapter"  # in 06_train/: strong_adapter + the adapter trained this round, composed


def load_pairs(stage: Stage, settings: DpoConfig) -> tuple[Path, list[tuple[int, PairRecord]]]:
    """The pairs file and its records (record number, pair)."""
    if settings.pairs_file:
        path = Path(settings.pairs_file)
        if not path.is_file():
            raise InputError(f"train.pairs_file: {path} not found")
        records = list(iter_jsonl(path))
    else:
        path = stage.run_dir / stage_info("pairs").output
        records = stage.read_input("pairs")
    pairs = [(n, PairRecord.from_dict(r, where=f"{path}: record {n}")) for n, r in enumerate(records, start=1)]
    return path, pairs


def strong_adapter_key(common: CommonConfig) -> dict[str, str]:
    """The merged-in adapter's content hash, for fingerprints (nothing without one, so older keys stay valid)."""
    return {"strong_adapter": adapter_identity(common.strong_adapter)} if common.strong_adapter else {}


def reference_fingerprint(
    settings: DpoConfig, common: CommonConfig, lm: Any, weights: dict[str, Any] | None = None
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
        **strong_adapter_key(common),
        **({"conditional": asdict(corruption_of(settings))} if "mdpo" in settings.loss_type else {}),
    }


def corruption_of(settings: DpoConfig) -> Any:
    """The corruption recipe of the `mdpo` loss type's corrupted images."""
    from capdpo.training.corruption import Corruption

    return Corruption(
        kind=settings.mdpo_corruption,
        crop_keep=settings.mdpo_crop_keep,
        mask_share=settings.mdpo_mask_share,
        noise_std=settings.mdpo_noise_std,
        seed=settings.mdpo_seed,
    )


def mdpo_params(settings: DpoConfig) -> Any:
    """The `mdpo` loss type's constants, or None when it is not listed."""
    from capdpo.training.conditional import MdpoParams

    if "mdpo" not in settings.loss_type:
        return None
    weights = list(settings.loss_weights) or [1.0] * len(settings.loss_type)
    return MdpoParams(
        beta=settings.resolved_beta(),
        conditional_weight=settings.mdpo_conditional_weight,
        anchor_weight=settings.mdpo_anchor_weight,
        anchor=settings.mdpo_anchor,
        weight=weights[settings.loss_type.index("mdpo")],
    )


def dpo_loss_arguments(settings: DpoConfig) -> dict[str, Any]:
    """DPOConfig's loss arguments for our settings."""
    # TRL computes every listed type but mdpo, whose terms capdpo's trainer adds
    trl_types = [(t, w) for t, w in zip(settings.loss_type, settings.loss_weights or [None] * len(settings.loss_type))]
    trl_types = [(t, w) for t, w in trl_types if t != "mdpo"]
    return dict(
        beta=settings.resolved_beta(),
        loss_type=[t for t, _ in trl_types],
        loss_weights=[w for _, w in trl_types] if settings.loss_weights else None,
        label_smoothing=settings.label_smoothing,
        ld_alpha=settings.ld_alpha,
        use_weighting=settings.use_weighting,
        f_divergence_type=settings.f_divergence_type,
        f_alpha_divergence_coef=settings.f_alpha_divergence_coef,
        discopop_tau=settings.discopop_tau,
        disable_dropout=settings.disable_dropout,
        precompute_ref_log_probs=False,  # capdpo's own reference pass replaces TRL's (which refuses vision data)
    )


def dpo_arguments(
    settings: DpoConfig,
    common: CommonConfig,
    output_dir: Path,
    *,
    deepspeed: str | None = None,
    bf16: bool = False,
    use_cpu: bool = True,
    has_eval: bool = False,
) -> Any:
    """TRL's DPOConfig: the arguments every recipe shares plus the loss. Built before the model is loaded, so ZeRO-3
    can shard it while loading."""
    from trl import DPOConfig

    base = trainer_arguments(
        settings, common, output_dir, deepspeed=deepspeed, bf16=bf16, use_cpu=use_cpu, has_eval=has_eval
    )
    return DPOConfig(**base, **dpo_loss_arguments(settings))


def build_trainer(
    settings: DpoConfig,
    lm: Any,
    train_pairs: list[PairRecord],
    val_pairs: list[PairRecord],
    args: Any,
    *,
    reference_root: Path | None,
    fingerprint: dict[str, Any] | None = None,
    callbacks: list[Any] | None = None,
) -> Any:
    """capdpo's DPOTrainer over the pairs (also used by bench/train_gpu.py with an in-memory model)."""
    from datasets import Dataset

    from capdpo.training.data import PairCollator, PairEncoder, pair_to_example
    from capdpo.training.losses import UniDPOParams
    from capdpo.training.reference import ReferenceCache
    from capdpo.training.trainer import CapdpoDPOTrainer

    peft_config = peft_setup(settings, lm.model)
    encoder = PairEncoder(lm.processor, settings.max_length)
    reference = None
    if settings.precompute_ref and reference_root is not None:
        reference = ReferenceCache(reference_root, fingerprint or {})
    features = None
    if settings.cache_image_features and reference_root is not None:
        from capdpo.training.features import FeatureCache

        features = FeatureCache(Path(reference_root).parent / "image_features", fingerprint or {})
    corruption = corruption_of(settings) if "mdpo" in settings.loss_type else None
    collator = PairCollator(
        encoder, settings.share_image_features, reference=reference, ld_alpha=settings.ld_alpha, corruption=corruption
    )
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
        train_dataset=Dataset.from_list([pair_to_example(p) for p in train_pairs]),
        eval_dataset=Dataset.from_list([pair_to_example(p) for p in val_pairs]) if val_pairs else None,
        processing_class=lm.processor,
        peft_config=peft_config,
        callbacks=callbacks,
        loss_type=list(settings.loss_type),
        unidpo=unidpo,
        score_range=(settings.unidpo_score_low, settings.unidpo_score_high),
        reference=reference,
        features=features,
        reference_collator=PairCollator(encoder, settings.share_image_features, corruption=corruption),
        mdpo=mdpo_params(settings),
        reference_batch_size=settings.ref_batch_size,
        share_prompt=settings.share_prompt,
        fused_kernels=settings.fused_kernels,
        compile_layers=settings.compile_layers,
    )


class DpoRecipe(Recipe):
    """Stage 6 as a `Recipe` (see `capdpo.training.setup.run_training`)."""

    tag = "train"
    model_field = "strong_model"
    train_fields = (("acc", "rewards/accuracies", ".2f"), ("margin", "rewards/margins", "+.4f"))
    signature_keys = ("strong_model", "pairs")

    def __init__(self, cfg: LoadedConfig) -> None:
        self.cfg = cfg
        self.settings: DpoConfig = cfg.section
        self.output = Path(cfg.common.run_dir) / stage_info("train").output
        self.model = cfg.common.strong_model
        self.adapter = cfg.common.strong_adapter
        self._stage = Stage("train", cfg)

    def stage(self) -> Stage:
        return self._stage

    def prepare(self, processor: Any) -> Prepared:
        from capdpo.training.data import PairEncoder, check_pairs

        source, pairs = load_pairs(self._stage, self.settings)
        train = [p for _, p in pairs if p.split == "train"]
        val = [p for _, p in pairs if p.split != "train"]
        if self.settings.max_pairs:
            train = train[: self.settings.max_pairs]
        if not train:
            raise InputError(f"{source}: no pairs in the train split")
        used = {p.id for p in train + val}
        encoder = PairEncoder(processor, self.settings.max_length)
        length_stats = check_pairs([(n, p) for n, p in pairs if p.id in used], encoder, source)
        return Prepared(train=train, val=val, example_ids=sorted(used), length_stats=length_stats)

    def signature_extra(self) -> dict[str, Any]:
        return strong_adapter_key(self.cfg.common)

    def arguments(self, base: dict[str, Any]) -> Any:
        from trl import DPOConfig

        return DPOConfig(**base, **dpo_loss_arguments(self.settings))

    def trainer(self, lm: Any, data: Prepared, args: Any, callbacks: list[Any] | None) -> Any:
        return build_trainer(
            self.settings,
            lm,
            data.train,
            data.val,
            args,
            reference_root=self.output / "ref_logps",
            fingerprint=reference_fingerprint(self.settings, self.cfg.common, lm),
            callbacks=callbacks,
        )

    def after_save(self, trainer: Any, saved: Path) -> Path:
        strong_adapter = self.cfg.common.strong_adapter
        if strong_adapter and self.settings.method != "full":
            # `saved` trained on strong_model + strong_adapter; one adapter on strong_model holds both, exactly
            return compose_adapters(strong_adapter, saved, self.output / POLICY_ADAPTER)
        return saved

    def summary(
        self, trainer: Any, result: Any, data: Prepared, seconds: float, resumed_from: str | None
    ) -> dict[str, Any]:
        history = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
        last = history[-1] if history else {}
        pairs_per_step = self.settings.batch_size * self.settings.gradient_accumulation_steps
        pairs_per_step *= trainer.accelerator.num_processes
        steps_run = trainer.state.global_step - step_of(resumed_from)
        reference, features = trainer.reference, trainer.features
        feature_images, feature_bytes = features.size() if features is not None else (0, 0)
        return {
            "train_pairs": len(data.train),
            "val_pairs": len(data.val),
            "final_rewards": {k.split("/", 1)[1]: v for k, v in last.items() if k.startswith("rewards/")},
            "loss_type": list(self.settings.loss_type),
            "beta": self.settings.resolved_beta(),
            "share_image_features": trainer.share_images,
            "reference": {
                "precomputed": reference is not None,
                "computed_now": trainer.reference_computed,
                "cached_pairs": len(reference) if reference is not None else 0,
                "seconds": round(trainer.reference_seconds, 2),
                "folder": str(reference.folder) if reference is not None else None,
            },
            "image_features": {
                "cached": features is not None,
                "seconds": round(trainer.feature_seconds, 2),
                "folder": str(features.folder) if features is not None else None,
                "images": feature_images,
                "bytes": feature_bytes,
            },
            "truncated_completions": data.length_stats["pairs_truncated"],
            "longest_pair_tokens": data.length_stats["longest_pair_tokens"],
            "pairs_per_second": round(steps_run * pairs_per_step / seconds, 4)
            if seconds > 0 and steps_run > 0
            else 0.0,
        }

    def closing(self, summary: dict[str, Any], data: Prepared, saved: Path) -> tuple[dict[str, Any], str]:
        stats = {k: summary[k] for k in ("train_pairs", "val_pairs", "steps", "final_loss", "pairs_per_second")}
        stats["truncated_completions"] = data.length_stats["pairs_truncated"]
        text = (
            f"{summary['steps']} steps on {len(data.train)} pairs, final loss {summary['final_loss']:.4f}, "
            f"reward accuracy {summary['final_rewards'].get('accuracies', float('nan')):.2f}; {saved.name} in {saved}."
        )
        return stats, text


def run_dpo(cfg: LoadedConfig) -> Outcome:
    """Stage 6: train the strong model on the pairs."""
    return run_training(DpoRecipe(cfg))
