"""Training config sections: the fields DPO (`train:`, stage 6) and SFT (`sft:`) share, and each one's own.

Kept free of heavy imports: every command validates every section of a run YAML.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from capdpo.config import option, require, require_at_least, require_choice, require_known
from capdpo.training.losses import LOSSES

METHODS = ("lora", "qlora", "full")
# Short names for the DeepSpeed configs shipped in configs/deepspeed/.
DEEPSPEED_PRESETS = ("zero2", "zero3", "zero2_offload", "zero3_offload")
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
REPORT_TO = ("none", "tensorboard", "wandb", "trackio", "mlflow", "all")
LANGUAGE_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class TrainingConfig:
    """What every fine-tuning run shares: what is trained, how it is optimised, saved, logged and resumed.

    Subclasses set `section` (the YAML section, named in errors), `learning_rates` ((LoRA/QLoRA, full) defaults)
    and `resume_fields` (settings a checkpoint is bound to), and redeclare fields whose defaults differ.
    """

    section: ClassVar[str] = "training"
    learning_rates: ClassVar[tuple[float, float]] = (5e-5, 1e-6)
    # Settings that change what a checkpoint means; resuming with different values is refused.
    resume_fields: ClassVar[tuple[str, ...]] = (
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

    # ---- what is trained -------------------------------------------------------------------------------------
    method: str = option("'lora' (default), 'qlora' (4-bit base, needs bitsandbytes and a GPU) or 'full'.", "lora")
    lora_r: int = option("LoRA rank.", 64)
    lora_alpha: int = option("LoRA scaling numerator (the update is scaled by alpha / r).", 128)
    lora_dropout: float = option("Dropout on the LoRA input.", 0.0)
    lora_targets: list[str] = option(
        "Names of the linear layers that get LoRA. They are matched in the language model only: Qwen2.5-VL's "
        "vision blocks reuse gate_proj/up_proj/down_proj.",
        factory=lambda: list(LANGUAGE_LINEARS),
    )
    lora_vision: bool = option("Also put LoRA on the vision tower's layers of those names (off by default).", False)
    freeze_vision: bool = option("Full fine-tuning: keep the vision tower and projector frozen (on by default).", True)

    # ---- optimisation ------------------------------------------------------------------------------------------
    learning_rate: float | None = option("Peak learning rate (default: 5e-5 for LoRA/QLoRA, 1e-6 for full).", None)
    lr_scheduler: str = option("Learning-rate schedule (transformers name: cosine, linear, constant, ...).", "cosine")
    warmup_ratio: float = option("Share of the steps spent warming the learning rate up.", 0.05)
    weight_decay: float = option("AdamW weight decay.", 0.0)
    max_grad_norm: float = option("Gradient clipping norm.", 1.0)
    optim: str = option("transformers optimizer name (adamw_torch, adamw_torch_fused, ...).", "adamw_torch")
    batch_size: int = option("Examples per device per forward.", 1)
    gradient_accumulation_steps: int = option("Forwards per optimizer step.", 8)
    epochs: float = option("Passes over the training data.", 1.0)
    max_steps: int = option("Stop after this many optimizer steps (0: run the epochs).", 0)
    max_length: int = option(
        "Token limit of prompt (image tokens included) + answer. An example whose image tokens would be cut is "
        "refused; an answer that does not fit is shortened (counted in the stats). 0: no limit.",
        2048,
    )
    gradient_checkpointing: bool = option(
        "Recompute activations in the backward pass (less memory, ~30% slower).", True
    )
    fused_kernels: bool = option(
        "Add the LoRA update inside its GEMM and, on CUDA, run the language model's norms and gating and the frozen "
        "vision tower's elementwise parts as compiled kernels (the same functions; false: the library's modules).",
        True,
    )
    compile_layers: bool = option(
        "Also compile each layer of the language model whole with torch.compile on CUDA (with fused_kernels): its "
        "forward, recomputation and backward run as compiled graphs, with far fewer operator launches; the first "
        "steps pay a compilation of about a minute (false: the layers run eagerly).",
        True,
    )
    deepspeed: str = option(
        "DeepSpeed config: zero2, zero3, zero2_offload, zero3_offload (configs/deepspeed/*.json) or a JSON path. "
        "Empty: none, or the one `accelerate launch --config_file` names.",
        "",
    )
    dataloader_workers: int | None = option(
        "Worker processes that load and preprocess images, off the training step's critical path (null: 2 per "
        "process when training on a GPU, none on CPU).",
        None,
    )

    # ---- saving, logging, resuming -----------------------------------------------------------------------------
    save_steps: int = option("Write a resumable checkpoint every this many optimizer steps.", 100)
    save_total_limit: int = option("Keep at most this many checkpoints (0: all).", 2)
    logging_steps: int = option("Log every this many optimizer steps.", 1)
    eval_steps: int = option("Evaluate on the validation data every this many steps (0: only at the end).", 0)
    resume: bool = option("Continue from the last checkpoint in <output>/checkpoints when there is one.", True)
    merge: bool = option("Also save the base model with the adapter merged in (<output>/merged/).", False)
    report_to: list[str] = option(
        "Where metrics go besides <output>/log.jsonl: none, tensorboard, wandb.", factory=lambda: ["none"]
    )

    def __post_init__(self) -> None:
        s = self.section
        require_choice(f"{s}.method", self.method, METHODS)
        require(self.learning_rate is None or self.learning_rate > 0, f"{s}.learning_rate", "must be > 0")
        require_at_least(s, self, 1, ("lora_r", "lora_alpha", "batch_size", "gradient_accumulation_steps"))
        require_at_least(s, self, 1, ("save_steps", "logging_steps"))
        require_at_least(s, self, 0, ("max_steps", "max_length", "eval_steps", "save_total_limit"))
        require(
            self.dataloader_workers is None or self.dataloader_workers >= 0,
            f"{s}.dataloader_workers",
            "must be >= 0 (or null: 2 on a GPU, 0 on CPU)",
        )
        require(self.epochs > 0 or self.max_steps > 0, f"{s}.epochs", "must be > 0 (or set max_steps)")
        require(0 <= self.warmup_ratio < 1, f"{s}.warmup_ratio", "must be in [0, 1)")
        require(0 <= self.lora_dropout < 1, f"{s}.lora_dropout", "must be in [0, 1)")
        require(bool(self.lora_targets) or self.method == "full", f"{s}.lora_targets", "give at least one layer name")
        require(
            not self.deepspeed or self.deepspeed in DEEPSPEED_PRESETS or self.deepspeed.endswith(".json"),
            f"{s}.deepspeed",
            f"'{self.deepspeed}' is neither one of {', '.join(DEEPSPEED_PRESETS)} nor a .json path",
        )
        require(
            not (self.method == "qlora" and self.deepspeed.startswith("zero3")),
            f"{s}.deepspeed",
            "QLoRA's 4-bit weights cannot be sharded by ZeRO-3; use zero2",
        )
        require_known(f"{s}.report_to", self.report_to, REPORT_TO)

    @property
    def trains_vision(self) -> bool:
        """Whether any vision-tower or projector weight is trained (then image features differ from the reference's)."""
        return (self.method == "full" and not self.freeze_vision) or (self.method != "full" and self.lora_vision)

    def resolved_learning_rate(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        adapter, full = self.learning_rates
        return full if self.method == "full" else adapter


@dataclass
class DpoConfig(TrainingConfig):
    """Stage 6 (`train:`): DPO training of the strong model on the pairs."""

    section: ClassVar[str] = "train"
    resume_fields: ClassVar[tuple[str, ...]] = (*TrainingConfig.resume_fields, "loss_type", "loss_weights", "beta")

    lora_dropout: float = option("Dropout on the LoRA input (0 while disable_dropout is on).", 0.0)
    batch_size: int = option("Pairs per device per forward (each pair is two sequences sharing one image).", 1)
    disable_dropout: bool = option("Turn every dropout off in the policy and reference (TRL's default).", True)

    # ---- the loss ----------------------------------------------------------------------------------------------
    loss_type: list[str] = option(
        f"One or more loss types ({', '.join(LOSSES)}), combined with loss_weights (MPO: [sigmoid, bco_pair, sft] "
        "with [0.8, 0.2, 1.0]); a loss that cannot combine (unidpo) stands alone.",
        factory=lambda: ["sigmoid"],
    )
    loss_weights: list[float] = option("One weight per loss type (default: 1.0 each).", factory=list)
    beta: float | None = option("DPO beta (default 0.1; 2.0 for unidpo, its published default).", None)
    label_smoothing: float = option("Robust DPO flip probability / EXO epsilon (exo_pair needs > 0).", 0.0)
    ld_alpha: float | None = option("LD-DPO weight of the tokens beyond the shorter completion (None: off).", None)
    use_weighting: bool = option("WPO weighting of pairs by the policy's length-normalised probabilities.", False)
    f_divergence_type: str = option(
        "f-DPO regulariser: reverse_kl, forward_kl, js_divergence, alpha_divergence.", "reverse_kl"
    )
    f_alpha_divergence_coef: float = option("alpha of the alpha-divergence regulariser.", 0.5)
    discopop_tau: float = option("DiscoPOP temperature.", 0.05)
    unidpo_eta: float = option("Uni-DPO quality weight sharpness: w_qual = sigmoid(eta * (s_c - s_r)).", 0.7)
    unidpo_tau_ref: float = option("Uni-DPO performance weight offset tau_ref.", 2.0)
    unidpo_gamma: float = option("Uni-DPO performance weight exponent gamma.", 3.0)
    unidpo_nll_lambda: float = option("Uni-DPO calibrated NLL weight lambda (0: off).", 0.001)
    unidpo_tau_good: float = option(
        "Uni-DPO: the NLL term applies to pairs whose mapped chosen score is >= this.", 2.5
    )
    unidpo_score_low: float = option("Uni-DPO score mapping: our score 0 (inaccurate) maps to this value.", 0.0)
    unidpo_score_high: float = option(
        "Uni-DPO score mapping: our score 1 (accurate) maps to this value. With 0..5, tau_good 2.5 means "
        "'the validator found the chosen side accurate with probability >= 0.5'.",
        5.0,
    )
    mdpo_conditional_weight: float = option(
        "mdpo: weight of the conditional term (the chosen answer likelier with the true image than a corrupted one).",
        1.0,
    )
    mdpo_anchor_weight: float = option(
        "mdpo: weight of the anchor term (keeps the chosen reward above the anchor).", 1.0
    )
    mdpo_anchor: float = option("mdpo: the anchor delta (0: the chosen reward is kept positive).", 0.0)
    mdpo_corruption: str = option(
        "mdpo, for pairs without rejected_image: 'crop' (a random crop keeping a small share of the area, resized "
        "back), 'mask' (most of an 8 x 8 grid filled with the mean colour) or 'noise' (Gaussian pixel noise).",
        "crop",
    )
    mdpo_crop_keep: float = option("mdpo crop: the kept share of the area is uniform in [keep / 10, keep].", 0.2)
    mdpo_mask_share: float = option("mdpo mask: share of the grid cells masked.", 0.8)
    mdpo_noise_std: float = option("mdpo noise: standard deviation on pixels scaled to [0, 1].", 0.5)
    mdpo_seed: int = option("mdpo: seed of the corruptions (each pair's is fixed by this and its id).", 0)

    # ---- reference and speed ---------------------------------------------------------------------------------
    precompute_ref: bool = option(
        "Compute the reference log-probs once before training (cached in 06_train/ref_logps/); training then "
        "runs no reference forward.",
        True,
    )
    ref_batch_size: int = option("Pairs per forward in the reference pass.", 4)
    share_image_features: bool = option(
        "Encode each pair's image once and give the features to both completions (instead of once per completion).",
        True,
    )
    cache_image_features: bool = option(
        "With the vision tower frozen, encode each training image once before training and keep its features in "
        "06_train/image_features/ (Qwen2.5-VL, Qwen3-VL, LLaVA; about 1.8 MB per 448-px image for Qwen2.5-VL-7B); the "
        "steps then read them instead of running the vision tower.",
        True,
    )
    share_prompt: bool = option(
        "Run each pair's prompt once with both completions attending to it (one packed row per pair under a block "
        "attention mask; sdpa/eager attention, Qwen2.5-VL, Qwen3-VL and LLaVA), instead of once per completion.",
        True,
    )

    # ---- input -------------------------------------------------------------------------------------------------
    pairs_file: str = option("Train on this pairs JSONL (05_pairs format) instead of <run_dir>/05_pairs.jsonl.", "")
    max_pairs: int = option("Use only the first N training pairs (0: all); for quick trials.", 0)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(bool(self.loss_type), "train.loss_type", "give at least one loss type")
        require_known("train.loss_type", self.loss_type, LOSSES)
        alone = [t for t in self.loss_type if not LOSSES[t].combines]
        require(
            not alone or len(self.loss_type) == 1,
            "train.loss_type",
            f"'{alone[0] if alone else ''}' cannot be combined with other loss types",
        )
        require(len(set(self.loss_type)) == len(self.loss_type), "train.loss_type", "a loss type is listed twice")
        require(
            not self.loss_weights or len(self.loss_weights) == len(self.loss_type),
            "train.loss_weights",
            f"{len(self.loss_weights)} weight(s) for {len(self.loss_type)} loss type(s)",
        )
        require(self.beta is None or self.beta > 0, "train.beta", "must be > 0")
        require(
            self.ld_alpha is None or 0 <= self.ld_alpha <= 1, "train.ld_alpha", "must be in [0, 1] (or null for off)"
        )
        require(
            "exo_pair" not in self.loss_type or self.label_smoothing > 0,
            "train.label_smoothing",
            "exo_pair needs a value > 0 (its paper uses 1e-3)",
        )
        require(0 <= self.label_smoothing < 0.5, "train.label_smoothing", "must be in [0, 0.5)")
        require_choice("train.f_divergence_type", self.f_divergence_type, F_DIVERGENCES)
        require(
            "unidpo" not in self.loss_type
            or (self.ld_alpha is None and not self.use_weighting and self.f_divergence_type == "reverse_kl"),
            "train.loss_type",
            "unidpo does not combine with ld_alpha, use_weighting or f_divergence_type",
        )
        require(
            self.unidpo_score_high > self.unidpo_score_low,
            "train.unidpo_score_high",
            "must be greater than unidpo_score_low",
        )
        require(
            self.unidpo_gamma >= 0 and self.unidpo_nll_lambda >= 0,
            "train.unidpo_gamma / unidpo_nll_lambda",
            "must be >= 0",
        )
        require(
            "mdpo" not in self.loss_type or any(LOSSES[t].trl for t in self.loss_type),
            "train.loss_type",
            "mdpo adds to a preference loss: list it with one, e.g. [sigmoid, mdpo] (mDPO)",
        )
        require_choice("train.mdpo_corruption", self.mdpo_corruption, ("crop", "mask", "noise"))
        require(0 < self.mdpo_crop_keep <= 1, "train.mdpo_crop_keep", "must be in (0, 1]")
        require(0 < self.mdpo_mask_share <= 1, "train.mdpo_mask_share", "must be in (0, 1]")
        require(self.mdpo_noise_std > 0, "train.mdpo_noise_std", "must be > 0")
        require(
            self.mdpo_conditional_weight >= 0 and self.mdpo_anchor_weight >= 0,
            "train.mdpo_conditional_weight / mdpo_anchor_weight",
            "must be >= 0",
        )
        require_at_least("train", self, 1, ("ref_batch_size",))
        require_at_least("train", self, 0, ("max_pairs",))

    def resolved_beta(self) -> float:
        return self.beta if self.beta is not None else (2.0 if self.loss_type == ["unidpo"] else 0.1)


@dataclass
class SftConfig(TrainingConfig):
    """`sft:`: supervised fine-tuning on (image, prompt, response) records, with stage 6's LoRA/QLoRA/full
    machinery (`python -m capdpo sft`)."""

    section: ClassVar[str] = "sft"
    learning_rates: ClassVar[tuple[float, float]] = (2e-4, 1e-5)

    # ---- data ------------------------------------------------------------------------------------------------
    data_file: str = option(
        "JSONL of {image, prompt, response} records (02_descriptions records work too: `text` is the response). "
        "Empty: <run_dir>/02_descriptions.jsonl.",
        "",
    )
    val_file: str = option("Optional JSONL of validation records (same format). Empty: val_fraction of images.", "")
    val_fraction: float = option(
        "Share of images (never single records) held out for validation when there is no val_file.", 0.0
    )
    max_examples: int = option("Use only the first N training records (0: all); for quick trials.", 0)
    model: str = option("Hub id or local folder of the model to fine-tune. Empty: the run's strong_model.", "")
    output_dir: str = option("Folder for the outputs. Empty: <run_dir>/sft.", "")
    cache_images: bool = option(
        "Keep every image's pixel values in memory after its first use (Qwen-style processors): much faster for "
        "many epochs over few small images; costs memory for large ones.",
        False,
    )

    # ---- defaults that differ from DPO's ---------------------------------------------------------------------
    lora_r: int = option("LoRA rank.", 16)
    lora_alpha: int = option("LoRA scaling numerator (the update is scaled by alpha / r).", 32)
    lora_dropout: float = option("Dropout on the LoRA input.", 0.05)
    learning_rate: float | None = option("Peak learning rate (default: 2e-4 for LoRA/QLoRA, 1e-5 for full).", None)
    warmup_ratio: float = option("Share of the steps spent warming the learning rate up.", 0.03)
    batch_size: int = option("Records per device per forward.", 4)
    gradient_accumulation_steps: int = option("Forwards per optimizer step.", 4)
    save_steps: int = option("Write a resumable checkpoint every this many optimizer steps.", 200)
    logging_steps: int = option("Log every this many optimizer steps.", 10)

    def __post_init__(self) -> None:
        super().__post_init__()
        require_at_least("sft", self, 0, ("max_examples",))
        require(0 <= self.val_fraction < 1, "sft.val_fraction", "must be in [0, 1)")
        require(
            not (self.val_file and self.val_fraction),
            "sft.val_fraction",
            "give either val_file or val_fraction, not both",
        )
