"""TRL's DPOTrainer with what TRL 1.x lacks for vision DPO.

1. **One image encoding per pair.** TRL's vision collator repeats each image for the chosen and the rejected row,
   so the vision tower runs twice per pair (four times with the reference). Here the collator passes each image
   once, and the backbone's `get_image_features` (wrapped by `install_shared_image_features`) encodes it once
   and gives the features to both rows, inside the model's own forward. With the vision tower frozen (the
   default) no autograd graph is built for it, so the backward pass never enters it.
2. **Precomputed reference log-probs for vision data** (TRL raises for them): `precompute_reference` computes
   them once with the adapter disabled (or, for full fine-tuning, from the weights before the first step),
   caches them by pair id (`capdpo.training.reference`), and training then reads them from the batch: no
   reference forward, no reference model in memory.
3. **Uni-DPO** and **mDPO**, capdpo's own losses (`capdpo.training.losses`): Uni-DPO needs per-token averages and
   the pairs' quality scores and stands alone; mDPO adds its image-conditional term and anchor
   (`capdpo.training.conditional`) to the listed TRL losses.
4. **One prompt per pair** (`share_prompt`): each pair's prompt runs once and both completions attend to it, in
   one packed row under a block attention mask (`capdpo.training.packing`); the per-token log-probs come back in
   the two-row layout, so every loss reads them unchanged.

5. **Loss metrics that do not wait for the device.** TRL's `_compute_loss` reads 13 floats from the device for its
   metrics in every step, and each read waits for all the queued work. For plain DPO (the `sigmoid` loss
   alone, reverse KL, no LD-DPO or WPO weighting, precomputed reference: the default), this class computes the
   same loss and the same metrics itself and keeps the metrics on the device until they are logged
   (`capdpo.training.metrics`).

Every other TRL loss type and loss-weight combination (MPO included) runs through TRL's own `_compute_loss`, for
which this class only prepares the inputs; Uni-DPO replaces it, and mDPO adds its terms to either's result.
"""

from __future__ import annotations

import contextlib
import math
import time
import weakref
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from trl import DPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import use_adapter

from capdpo.models.patches import use_grouped_vision_attention, vision_frozen, vision_parameters
from capdpo.training.conditional import ConditionalTerm, MdpoParams
from capdpo.training.data import EXTRA_PREFIX, PairCollator
from capdpo.training.features import (
    FeatureCache,
    cached_features,
    encode_first_images,
    image_key,
    install_cached_image_features,
)
from capdpo.training.losses import LOSSES, UniDPOParams, map_scores, unidpo_loss
from capdpo.training.metrics import record_metrics, record_ratio, reward_metrics, settle_metrics
from capdpo.training.packing import install_prompt_sharing, prompts_shared
from capdpo.training.reference import ReferenceCache
from capdpo.training.setup import speed_up_training

_FEATURES_KEY = EXTRA_PREFIX + "image_features"  # the batch's cached image features (`capdpo.training.features`)
_NON_MODEL_KEYS = ("completion_mask", "ref_chosen_logps", "ref_rejected_logps", _FEATURES_KEY)


def _is_peft(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PeftModel)


def hf_model(model: Any) -> Any:
    """The transformers model inside DeepSpeed / DDP / PEFT wrappers (found once per wrapper: the library's lookup
    walks every module, and the training step asks for it twice)."""
    try:
        found = _HF_MODELS.get(model)
    except TypeError:  # not weakly referable: looked up every time
        found = None
    if found is None:
        from accelerate.utils import extract_model_from_parallel

        found = extract_model_from_parallel(model)
        found = found.get_base_model() if _is_peft(found) else found
        with contextlib.suppress(TypeError):
            _HF_MODELS[model] = found
    return found


_HF_MODELS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def train_mode_kept(model: Any) -> Iterator[None]:
    """Inside the block, `model.train()` returns at once while every module of `model` is already in training mode.
    Trainer calls it at the start of every step, and it sets the flag on every module (~2,700 for a 7B VLM with
    LoRA adapters: 26 ms of host time per step on a 2-core CPU); a module that was switched to eval mode, and
    `model.train(False)`, still go the library's way."""
    modules = _MODULES.get(model)
    if modules is None:
        modules = _MODULES[model] = list(model.modules())
    if not all(m.training for m in modules):
        yield
        return
    library = type(model).train

    def train(mode: bool = True) -> Any:
        return model if mode and all(m.training for m in modules) else library(model, mode)

    model.train = train
    try:
        yield
    finally:
        del model.train


_MODULES: weakref.WeakKeyDictionary[Any, list[Any]] = weakref.WeakKeyDictionary()


_SHARED_FLAG = "_capdpo_share_images"
# Per-image metadata that the collator passes once per image and the model needs once per row.
PER_IMAGE_KEYS = ("image_grid_thw", "image_sizes")


def _backbone(model: Any) -> Any:
    base = hf_model(model)
    backbone = getattr(base, "base_model", None)
    return None if backbone is base else backbone


def install_shared_image_features(model: Any) -> bool:
    """Make the model able to encode each image once for two rows; False if its backbone has no hook for it.

    The backbone's `get_image_features` is wrapped: inside `images_shared(...)`, it receives the pixels of B images
    and per-image metadata for the 2B rows (chosen rows, then rejected rows), encodes the B images once and returns
    their features twice. It runs inside the model's own forward, so DeepSpeed ZeRO-3 sees the usual module order,
    and a reference forward (adapter disabled, or a separate reference model) encodes with its own weights.
    """
    backbone = _backbone(model)
    if backbone is None or not hasattr(backbone, "get_image_features"):
        return False
    if "_capdpo_get_image_features" in vars(backbone):
        return True
    original = backbone.get_image_features

    def get_image_features(pixel_values: Any, *args: Any, **kwargs: Any) -> Any:
        if not getattr(backbone, _SHARED_FLAG, False):
            return original(pixel_values, *args, **kwargs)
        args = tuple(_first_half(a) for a in args)
        kwargs = {k: _first_half(v) if k in PER_IMAGE_KEYS else v for k, v in kwargs.items()}
        return _repeat_for_both_rows(original(pixel_values, *args, **kwargs))

    backbone._capdpo_get_image_features = original
    backbone.get_image_features = get_image_features
    return True


def install_frozen_vision_no_grad(model: Any) -> bool:
    """Encode images without autograd while no vision parameter (`vision_parameters`) trains; False without a hook.

    With gradient checkpointing, transformers makes every sub-model's input embeddings require grad (the vision
    tower's patch embedding included), so a frozen vision tower would still be recorded, recomputed and
    back-propagated through in every step for gradients nothing uses. The check runs per call, so LoRA on the
    vision tower or a full fine-tune with it unfrozen keeps the usual graph.
    """
    backbone = _backbone(model)
    if backbone is None or not hasattr(backbone, "get_image_features") or not vision_parameters(backbone):
        return False
    if "_capdpo_frozen_vision" in vars(backbone):
        return True
    inner = backbone.get_image_features

    def get_image_features(*args: Any, **kwargs: Any) -> Any:
        if any(p.requires_grad for p in vision_parameters(backbone)):
            return inner(*args, **kwargs)
        with torch.no_grad():
            return inner(*args, **kwargs)

    backbone._capdpo_frozen_vision = inner
    backbone.get_image_features = get_image_features
    return True


def cast_pixels_in_workers(trainer: Any, collators: list[PairCollator | None]) -> Any:
    """Under DeepSpeed, Trainer casts every float input to DeepSpeed's dtype on its way to the GPU, in the step;
    give that dtype to the collators, which then cast the pixels in the DataLoader's workers (the same conversion,
    so the same values). Returns the dtype (None: not under DeepSpeed, nothing changed)."""
    if not trainer.is_deepspeed_enabled:
        return None
    dtype = trainer.accelerator.state.deepspeed_plugin.hf_ds_config.dtype()
    for collator in collators:
        if collator is not None:
            collator.pixel_dtype = dtype
    return dtype


def _first_half(value: Any) -> Any:
    return value[: value.shape[0] // 2] if torch.is_tensor(value) else value


@contextlib.contextmanager
def images_shared(models: list[Any], on: bool) -> Iterator[None]:
    """Within the block, the models' forwards encode each pair's image once (see install_shared_image_features)."""
    backbones = [b for b in (_backbone(m) for m in models if m is not None) if b is not None]
    previous = [getattr(b, _SHARED_FLAG, False) for b in backbones]
    for b in backbones:
        setattr(b, _SHARED_FLAG, on)
    try:
        yield
    finally:
        for b, old in zip(backbones, previous):
            setattr(b, _SHARED_FLAG, old)


def _repeat_for_both_rows(features: Any) -> Any:
    """Image features of B pairs -> features for 2B rows (chosen rows first, then rejected rows)."""
    if not hasattr(features, "pooler_output"):
        raise TypeError("get_image_features returned no pooler_output; this model family cannot share image features")
    features.pooler_output = tuple(features.pooler_output) * 2
    deepstack = getattr(features, "deepstack_features", None)
    if deepstack is not None:  # Qwen3-VL: per-layer features, each split per image
        features.deepstack_features = [tuple(layer) * 2 for layer in deepstack]
    return features


@contextlib.contextmanager
def _no_reference_model_load() -> Iterator[None]:
    """Full fine-tuning with a precomputed reference: keep TRL from loading a second copy of the model.

    TRL builds a reference model whenever the policy is not a PEFT model and its own (text-only) precompute is
    off; ours replaces that precompute, so the copy would never be used.
    """
    import trl.trainer.dpo_trainer as dpo_module

    original = dpo_module.create_model_from_path
    dpo_module.create_model_from_path = lambda *args, **kwargs: None
    try:
        yield
    finally:
        dpo_module.create_model_from_path = original


class CapdpoDPOTrainer(DPOTrainer):
    """DPOTrainer over `PairCollator` batches (see the module docstring).

    Args:
        model, args, train_dataset, eval_dataset, processing_class, peft_config, callbacks: as for DPOTrainer.
        data_collator: the training `PairCollator`.
        loss_type: the configured loss types (`capdpo.training.losses.LOSSES`; TRL computes its own).
        unidpo: Uni-DPO constants; score_range: (low, high) our 0..1 scores map onto.
        reference: the reference cache, or None to run the reference forward in every step.
        reference_collator: a `PairCollator` without reference columns, for the reference pass.
        reference_batch_size: pairs per forward in the reference pass.
        mdpo: the `mdpo` loss type's constants (None: not listed); its terms are added to TRL's loss.
        share_prompt: run each pair's prompt once for both completions (`capdpo.training.packing`).
        fused_kernels: the training kernels of `capdpo.models.patches.tune_for_training`.
        compile_layers: with them, each language-model layer compiled whole (`compile_decoder_layers`).
    """

    _parameter_count: int | None = None

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """transformers' count for its `total_flos` log (6 × input tokens × parameters without embeddings) with the
        parameters counted once, not in every step (counting them walks every module)."""
        main_input = getattr(self.model, "main_input_name", "input_ids")
        if main_input not in inputs or not hasattr(self.model, "num_parameters"):
            return 0
        if self._parameter_count is None:
            self._parameter_count = self.model.num_parameters(exclude_embeddings=True)
        return 6 * inputs[main_input].numel() * self._parameter_count

    def __init__(
        self,
        *,
        model: Any,
        args: Any,
        data_collator: PairCollator,
        train_dataset: Any,
        eval_dataset: Any = None,
        processing_class: Any = None,
        peft_config: Any = None,
        callbacks: list[Any] | None = None,
        loss_type: list[str] | None = None,
        unidpo: UniDPOParams | None = None,
        score_range: tuple[float, float] = (0.0, 5.0),
        reference: ReferenceCache | None = None,
        features: FeatureCache | None = None,
        reference_collator: PairCollator | None = None,
        reference_batch_size: int = 4,
        mdpo: MdpoParams | None = None,
        share_prompt: bool = True,
        fused_kernels: bool = True,
        compile_layers: bool = True,
    ) -> None:
        full_finetune = peft_config is None and not _is_peft(model)
        guard = _no_reference_model_load() if (reference is not None and full_finetune) else contextlib.nullcontext()
        with guard:
            super().__init__(
                model=model,
                args=args,
                data_collator=data_collator,
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                processing_class=processing_class,
                peft_config=peft_config,
                callbacks=callbacks,
            )
        own = [t for t in (loss_type or []) if not LOSSES[t].trl and not LOSSES[t].combines]
        self.own_loss = own[0] if own else None  # a loss capdpo computes, not TRL (it stands alone: see LOSSES)
        self.conditional = ConditionalTerm(mdpo) if mdpo is not None else None  # mdpo: added to TRL's loss
        self.unidpo_params = unidpo or UniDPOParams(beta=self.beta)
        self.score_range = score_range
        use_grouped_vision_attention()  # one SDPA call per window size, not per window (SDPA only; exact)
        # innermost: the wrappers below (one encoding per pair) pass it the grids of the images they need
        cache_features = features is not None and vision_frozen(hf_model(self.model))
        # a separate reference model (full fine-tuning, reference not precomputed) holds the same frozen tower
        for m in (self.model, self.ref_model):
            if m is not None:
                cache_features = cache_features and install_cached_image_features(hf_model(m), _backbone(m))
        install_frozen_vision_no_grad(self.model)
        self.share_images = data_collator.share_images and install_shared_image_features(self.model)
        if self.share_images and self.ref_model is not None:
            self.share_images = install_shared_image_features(self.ref_model)
        data_collator.share_images = self.share_images
        if reference_collator is not None:
            reference_collator.share_images = self.share_images
        cast_pixels_in_workers(self, [data_collator, reference_collator])
        # after DPOTrainer's constructor, which gives the model the fused LM head this wraps
        self.share_prompt = share_prompt and install_prompt_sharing(hf_model(self.model), _SHARED_FLAG)
        self.tuned = speed_up_training(self, hf_model(self.model), fused_kernels, compile_layers)
        self.reference = reference
        self.reference_seconds = 0.0
        self.reference_computed = 0
        if reference is not None:
            datasets = [train_dataset] + ([eval_dataset] if eval_dataset is not None else [])
            self.precompute_reference(datasets, reference_collator or data_collator, reference_batch_size)
            self.precompute_ref_logps = True  # TRL's _compute_loss now reads ref_*_logps from the batch
        self.features = features if cache_features else None
        self.feature_seconds = 0.0
        if self.features is not None:
            datasets = [train_dataset] + ([eval_dataset] if eval_dataset is not None else [])
            self.precompute_features(datasets, reference_collator or data_collator, reference_batch_size)
            data_collator.features = self.features

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        settle_metrics(self._metrics)
        super().log(logs, start_time)

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Any:
        with train_mode_kept(model):
            return super().training_step(model, inputs, num_items_in_batch)

    # ---- inputs ---------------------------------------------------------------------------------------------
    def _prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        # Under DeepSpeed, Trainer casts every float tensor of the batch to bf16, which would round reference
        # log-prob sums (around -100) by ~0.5 and the scores by ~0.4%: move those to the device unchanged.
        inputs = dict(inputs)
        exact = {k: inputs.pop(k) for k in list(inputs) if k.startswith(("ref_", EXTRA_PREFIX))}
        prepared = super()._prepare_inputs(inputs)
        prepared.update({k: v.to(self.accelerator.device) for k, v in exact.items()})
        return prepared

    def _model_inputs(self, model: Any, inputs: dict[str, Any]) -> dict[str, Any]:
        """Batch -> forward kwargs: our extra keys dropped; with shared images, per-image metadata given per row
        (rope positions need it for every row) while the pixels stay once per pair."""
        kwargs = {k: v for k, v in inputs.items() if not k.startswith(EXTRA_PREFIX) or k == _FEATURES_KEY}
        if self.share_images:
            for key in PER_IMAGE_KEYS:
                if torch.is_tensor(kwargs.get(key)):
                    kwargs[key] = torch.cat([kwargs[key], kwargs[key]], dim=0)
        return kwargs

    def _compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool) -> Any:
        extras = {k[len(EXTRA_PREFIX) :]: v for k, v in inputs.items() if k.startswith(EXTRA_PREFIX)}
        kwargs = self._model_inputs(model, inputs)
        cached = kwargs.pop(_FEATURES_KEY, None)  # TRL's forward passes every other key to the model
        with (
            images_shared([model, self.ref_model], self.share_images),
            self._prompts_shared(model),
            self._features_cached(model, cached),
        ):
            if self.own_loss is not None:
                own_losses = {"unidpo": self._unidpo_loss}
                return own_losses[self.own_loss](model, kwargs, extras, return_outputs)
            preference_loss = self._dpo_loss if self._dpo_on_device(return_outputs) else super()._compute_loss
            if self.conditional is not None:
                return self.conditional.compute(
                    self, model, kwargs, extras, lambda m, k: preference_loss(m, k, return_outputs)
                )
            return preference_loss(model, kwargs, return_outputs)

    def _prompts_shared(self, model: Any) -> Any:
        return prompts_shared([hf_model(model)], self.share_prompt)

    def _features_cached(self, model: Any, features: Any) -> Any:
        """Within the block, the model (and a separate reference model) read `features` for the batch's images
        (None: they encode them)."""
        stack = contextlib.ExitStack()
        for m in (model, self.ref_model) if features is not None else ():
            if m is not None:
                stack.enter_context(cached_features(_backbone(m), features))
        return stack

    # ---- log-probs --------------------------------------------------------------------------------------------
    @staticmethod
    def _scored_forward(model: Any, kwargs: dict[str, Any]) -> tuple[Any, Any]:
        """The model's forward under the fused LM head, which scores the completion tokens only: (its outputs, the
        completion mask shifted to the scored positions)."""
        completion_mask = kwargs["completion_mask"]
        forward = {k: v for k, v in kwargs.items() if k not in _NON_MODEL_KEYS}
        forward["use_cache"] = False
        labels = kwargs["input_ids"].masked_fill(completion_mask == 0, -100)
        return model(**forward, labels=labels, fused_lm_head=True), completion_mask[:, 1:]

    def completion_logps(self, model: Any, kwargs: dict[str, Any]) -> tuple[Any, Any, Any, Any]:
        """Completion log-probs of each row [2B]: (sums, token counts, per-token log-probs, completion mask).

        Position t of the per-token tensors scores token t + 1 given tokens 0..t; only completion tokens (the
        assistant's answer and its end-of-turn token) are counted, never prompt or image tokens.
        """
        with (
            images_shared([model], self.share_images),
            self._prompts_shared(model),
            self._features_cached(model, kwargs.get(_FEATURES_KEY)),
        ):
            out, mask = self._scored_forward(model, kwargs)
        per_token = out.log_probs[:, -mask.size(1) :]
        return (per_token * mask).sum(dim=1), mask.sum(dim=1), per_token, mask

    @torch.no_grad()
    def reference_values(self, model: Any, batch: dict[str, Any]) -> list[dict[str, Any]]:
        """Reference sums, shared-length sums (LD-DPO) and token counts per pair of a collated batch."""
        kwargs = self._model_inputs(model, batch)
        unwrapped = self.accelerator.unwrap_model(model)
        adapter_off = use_adapter(unwrapped, adapter_name=None) if _is_peft(unwrapped) else contextlib.nullcontext()
        with (
            adapter_off,
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            self.accelerator.autocast(),
            images_shared([model], self.share_images),
        ):
            sums, counts, per_token, mask = self.completion_logps(model, kwargs)
        position = mask.cumsum(dim=1)
        chosen_n, rejected_n = counts.chunk(2)
        shared = torch.minimum(chosen_n, rejected_n).repeat(2).unsqueeze(1)
        shared_sums = (per_token * mask * (position <= shared)).sum(dim=1)
        rows = [t.float().cpu().tolist() for t in (*sums.chunk(2), *shared_sums.chunk(2), chosen_n, rejected_n)]
        return [
            {
                "chosen_sum": cs,
                "rejected_sum": rs,
                "chosen_shared": csh,
                "rejected_shared": rsh,
                "chosen_tokens": int(cn),
                "rejected_tokens": int(rn),
            }
            for cs, rs, csh, rsh, cn, rn in zip(*rows)
        ]

    def _reference_model(self) -> Any:
        if self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3:
            from trl.models import prepare_deepspeed

            # ZeRO-3 shards the weights at load time; an inference engine gathers them for the forward.
            if getattr(self, "_precompute_engine", None) is None:
                self._precompute_engine = prepare_deepspeed(self.model, self.accelerator)
            return self._precompute_engine
        if getattr(hf_model(self.model), "is_loaded_in_4bit", False):
            return self.model  # QLoRA: already on its GPU, and 4-bit weights cannot be moved
        return self.model.to(self.accelerator.device)  # ZeRO-1/2 and plain: DeepSpeed has not placed it yet

    def precompute_reference(self, datasets: list[Any], collator: PairCollator, batch_size: int) -> None:
        """Fill the reference cache for every pair of `datasets` that it lacks, sharded over the processes."""
        cache = self.reference
        self._prepare_cache(cache)
        cache.reload()
        examples = {ex["id"]: ex for ds in datasets for ex in ds}
        missing = self._agreed_missing(cache, sorted(examples))
        start = time.time()
        if missing:
            # Every process runs the same number of forwards (ZeRO-3 gathers weights collectively); a process
            # that runs out repeats a pair and discards the result.
            batches = self._my_batches(missing, batch_size, same_count=True)
            rounds = len(batches)
            with self._pass_model() as model, cache.appender(self.accelerator.process_index) as out:
                for r, ids in enumerate(batches):
                    batch = self._prepare_inputs(collator([examples[i] for i in (ids or missing[:1])]))
                    values = self.reference_values(model, batch)
                    if self.conditional is not None:  # mdpo: the chosen answer's sum with the corrupted image too
                        self.conditional.add_reference(self, model, batch, values)
                    out.write({"id": i, **v} for i, v in zip(ids, values))
                    if self.accelerator.is_main_process and ((r + 1) % max(1, rounds // 4) == 0 or r == rounds - 1):
                        done = min((r + 1) * batch_size * self.accelerator.num_processes, len(missing))
                        print(f"[train] reference log-probs: {done}/{len(missing)} pairs", flush=True)
            self.reference_computed = len(missing)
        self.accelerator.wait_for_everyone()
        cache.reload()
        left = cache.missing(sorted(examples))
        if left:
            raise RuntimeError(f"reference pass left {len(left)} pair(s) without values (first: {left[0]})")
        self.reference_seconds = time.time() - start

    def precompute_features(self, datasets: list[Any], collator: PairCollator, batch_size: int) -> None:
        """Encode every image of `datasets` that the feature cache lacks, `batch_size` images per forward, sharded
        over the processes (`capdpo.training.features`)."""
        cache = self.features
        self._prepare_cache(cache)
        first: dict[str, dict[str, Any]] = {}  # image key -> one example showing the image
        for dataset in datasets:
            for example in dataset:
                first.setdefault(image_key(example["image_id"], example["image"]), example)
        missing = self._agreed_missing(cache, sorted(first))
        start = time.time()
        if missing:
            with self._pass_model() as model, torch.no_grad(), self.accelerator.autocast():
                backbone = _backbone(model)
                for n, ids in enumerate(self._my_batches(missing, batch_size)):
                    batch = self._prepare_inputs(collator([first[i] for i in ids]))
                    # the first images: one per pair, in order
                    encoded = encode_first_images(backbone, batch, len(ids))
                    written = sum(cache.save(key, features) for key, features in zip(ids, encoded, strict=True))
                    if n == 0:  # before filling the disk: the rest at this batch's size per image must fit
                        cache.check_room(
                            written / len(ids) * (len(missing) - len(ids) * self.accelerator.num_processes)
                        )
            if self.accelerator.is_main_process:
                print(f"[train] image features: {len(missing)} image(s) encoded", flush=True)
        self.accelerator.wait_for_everyone()
        left = cache.missing(sorted(first))
        if left:
            raise RuntimeError(f"feature pass left {len(left)} image(s) without features (first: {left[0]})")
        self.feature_seconds = time.time() - start

    def _prepare_cache(self, cache: ReferenceCache | FeatureCache) -> None:
        """The main process creates the cache's folder and fingerprint; every process waits for it."""
        if self.accelerator.is_main_process:
            cache.prepare()
        self.accelerator.wait_for_everyone()

    def _agreed_missing(self, cache: ReferenceCache | FeatureCache, keys: list[str]) -> list[str]:
        """`cache.missing(keys)` as every process reads it before any of them writes, so that all shard one list (a
        process that read the cache after another had started writing would shard a shorter list, and keys would
        fall to no process)."""
        missing = cache.missing(keys)
        self.accelerator.wait_for_everyone()
        return missing

    def _my_batches(self, missing: list[str], batch_size: int, same_count: bool = False) -> list[list[str]]:
        """This process's share of `missing`, `batch_size` keys per forward. With `same_count` every process gets as
        many batches as the busiest one, an empty batch where it has run out."""
        state = self.accelerator.state
        mine = missing[state.process_index :: state.num_processes]
        share = math.ceil(len(missing) / state.num_processes) if same_count else len(mine)
        return [mine[at : at + batch_size] for at in range(0, share, batch_size)]

    @contextlib.contextmanager
    def _pass_model(self) -> Iterator[Any]:
        """The model for a pass before training (`_reference_model`), in eval mode within the block."""
        model = self._reference_model()
        was_training = model.training
        model.eval()
        try:
            yield model
        finally:
            model.train(was_training)
            engine = getattr(self, "_precompute_engine", None)
            if engine is not None:
                # Its ZeRO-3 hooks on the shared modules would clash with the training engine's.
                engine.destroy()
                self._precompute_engine = None

    # ---- plain DPO ----------------------------------------------------------------------------------------------
    def _dpo_on_device(self, return_outputs: bool) -> bool:
        """Whether this step's loss is plain DPO, which `_dpo_loss` computes as TRL does (read per step: the loss
        settings are attributes that may change)."""
        return (
            list(self.loss_types) == ["sigmoid"]
            and self.f_divergence_type == "reverse_kl"
            and self.ld_alpha is None
            and not self.use_weighting
            and not self.aux_loss_enabled
            and self.precompute_ref_logps
            and not return_outputs  # TRL recomputes the logits for that (deprecated) case
        )

    def _dpo_loss(self, model: Any, kwargs: dict[str, Any], return_outputs: bool = False) -> Any:
        """TRL's `sigmoid` loss with its reference log-probs read from the batch, and TRL's metrics under TRL's
        names and definitions, kept on the device (`_dpo_on_device` says when this replaces TRL's `_compute_loss`).
        """
        mode = "train" if self.model.training else "eval"
        out, mask = self._scored_forward(model, kwargs)
        seq_len = mask.size(1)
        chosen_logps, rejected_logps = out.log_probs[:, -seq_len:].sum(dim=1).chunk(2)
        chosen_ratio = chosen_logps - kwargs["ref_chosen_logps"]
        rejected_ratio = rejected_logps - kwargs["ref_rejected_logps"]
        loss = -F.logsigmoid(self.beta * (chosen_ratio - rejected_ratio)).mean() * self.loss_weights[0]

        record_ratio(self, mode, "entropy", (out.entropy[:, -seq_len:] * mask).sum(), mask.sum())
        if mode == "train":
            tokens = self.accelerator.gather_for_metrics(kwargs["attention_mask"].sum()).sum()
            self._total_train_tokens = self._total_train_tokens + tokens // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        chosen_mask, rejected_mask = mask.bool().chunk(2)
        chosen_logits, rejected_logits = out.mean_logits[:, -seq_len:].chunk(2)
        record_ratio(self, mode, "logits/chosen", chosen_logits.where(chosen_mask, 0.0).sum(), chosen_mask.sum())
        record_ratio(
            self, mode, "logits/rejected", rejected_logits.where(rejected_mask, 0.0).sum(), rejected_mask.sum()
        )
        chosen_top1 = out.is_top1[:, -seq_len:].chunk(2)[0]
        record_ratio(self, mode, "mean_token_accuracy", (chosen_top1 & chosen_mask).sum(), chosen_mask.sum())
        rewards = reward_metrics(self.beta * chosen_ratio, self.beta * rejected_ratio, chosen_logps, rejected_logps)
        record_metrics(self, mode, rewards)
        return loss

    # ---- Uni-DPO ------------------------------------------------------------------------------------------------
    def _unidpo_loss(self, model: Any, kwargs: dict[str, Any], extras: dict[str, Any], return_outputs: bool) -> Any:
        mode = "train" if self.model.training else "eval"
        sums, counts, _, _ = self.completion_logps(model, kwargs)
        counts = counts.clamp(min=1)
        policy_chosen, policy_rejected = (sums / counts).chunk(2)
        chosen_n, rejected_n = counts.chunk(2)
        if self.precompute_ref_logps:
            ref_chosen = extras["ref_chosen_sum"].to(sums.device) / chosen_n
            ref_rejected = extras["ref_rejected_sum"].to(sums.device) / rejected_n
        else:
            with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
                if self.ref_model is None:
                    unwrapped = self.accelerator.unwrap_model(self.model)
                    with use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None):
                        ref_sums, _, _, _ = self.completion_logps(self.model, kwargs)
                else:
                    ref_sums, _, _, _ = self.completion_logps(self.ref_model, kwargs)
            ref_chosen, ref_rejected = (ref_sums / counts).chunk(2)
        low, high = self.score_range
        score_chosen = map_scores(extras["score_chosen"].to(sums.device), low, high)
        score_rejected = map_scores(extras["score_rejected"].to(sums.device), low, high)
        losses, parts = unidpo_loss(
            policy_chosen, policy_rejected, ref_chosen, ref_rejected, score_chosen, score_rejected, self.unidpo_params
        )
        loss = losses.mean()

        beta = self.unidpo_params.beta
        chosen_sums, rejected_sums = sums.chunk(2)
        values = reward_metrics(
            beta * (policy_chosen - ref_chosen), beta * (policy_rejected - ref_rejected), chosen_sums, rejected_sums
        ) | {f"unidpo/{name}": parts[name] for name in ("w_qual", "w_perf", "nll_active")}
        record_metrics(self, mode, values)
        if return_outputs:
            return loss, {"losses": losses.detach()}
        return loss
