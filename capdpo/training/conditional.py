"""Image-conditional preference (the `mdpo` loss type): the chosen answer must be likelier with the true image.

Plain DPO on caption pairs can be satisfied from the language alone (a "triangle next to a circle" habit needs no
look at the image). `mdpo` adds two terms to the listed preference loss (`[sigmoid, mdpo]` is mDPO), from summed
completion log-probs of the policy (π) and the reference (ref)::

    r_c   = π(chosen | image)     − ref(chosen | image)
    r_k   = π(chosen | corrupted) − ref(chosen | corrupted)
    conditional = −log σ(β · (r_c − r_k))         # the true image must explain the chosen answer better
    anchor      = −log σ(β · r_c − δ)             # keeps the chosen reward above δ (0: positive)
    loss  += w_mdpo · (conditional_weight · conditional + anchor_weight · anchor)

The corrupted image is the pair's `rejected_image` when the record has one, else the pair's image corrupted at
training time (`Corruption`: a random crop keeping a small share of the area, a mask over most of it, or noise),
seeded by the pair's id (`capdpo.training.corruption`), so every epoch and the reference pass see the same image. It is resized to the true
image's size, so its image tokens, and with them every token of the row, are the chosen row's: the conditional row
differs from the chosen row in its pixels alone. It is encoded once per pair, in one extra row per pair.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

from capdpo.training.corruption import CORRUPT_PREFIX
from capdpo.training.data import EXTRA_PREFIX
from capdpo.training.metrics import record_metrics


@dataclass
class MdpoParams:
    """The conditional term's and the anchor's weights (their sum is scaled by the `mdpo` loss weight)."""

    beta: float = 0.1
    conditional_weight: float = 1.0
    anchor_weight: float = 1.0
    anchor: float = 0.0  # δ
    weight: float = 1.0  # the `mdpo` entry of loss_weights


def conditional_inputs(kwargs: dict[str, Any], extras: dict[str, Any]) -> dict[str, Any]:
    """Forward kwargs of the conditional rows: the chosen rows' tokens and masks with the corrupted images'
    tensors in place of the true images' (B rows, one image each)."""
    import torch

    images = {k[len(CORRUPT_PREFIX) :]: v for k, v in extras.items() if k.startswith(CORRUPT_PREFIX)}
    rows = int(kwargs["input_ids"].shape[0]) // 2
    out = {}
    for key, value in kwargs.items():
        if key in images:
            out[key] = images[key].to(value.device) if torch.is_tensor(value) else images[key]
        elif torch.is_tensor(value) and value.dim() == 2 and value.shape[0] == 2 * rows:
            out[key] = value[:rows]
    return out


class ConditionalTerm:
    """The trainer's side of `mdpo`: the conditional rows' log-probs (policy and reference) and the loss."""

    def __init__(self, params: MdpoParams) -> None:
        self.params = params

    @contextlib.contextmanager
    def _plain_rows(self, trainer: Any) -> Any:
        """One image per row and no packing while the conditional rows run (both are per-pair layouts)."""
        saved = {k: getattr(trainer, k) for k in ("share_images", "share_prompt") if hasattr(trainer, k)}
        for key in saved:
            setattr(trainer, key, False)
        try:
            yield
        finally:
            for key, value in saved.items():
                setattr(trainer, key, value)

    def policy_sums(self, trainer: Any, model: Any, kwargs: dict[str, Any], extras: dict[str, Any]) -> Any:
        with self._plain_rows(trainer):
            sums, _, _, _ = trainer.completion_logps(model, conditional_inputs(kwargs, extras))
        return sums

    def reference_sums(self, trainer: Any, kwargs: dict[str, Any], extras: dict[str, Any], device: Any) -> Any:
        """Cached reference sums where the reference was precomputed, else a reference forward now."""
        import torch
        from trl.models.utils import disable_gradient_checkpointing
        from trl.trainer.utils import use_adapter

        if trainer.precompute_ref_logps:
            return extras["ref_corrupt_sum"].to(device)
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(trainer.model, trainer.args.gradient_checkpointing_kwargs),
        ):
            if trainer.ref_model is None:
                unwrapped = trainer.accelerator.unwrap_model(trainer.model)
                with use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None):
                    return self.policy_sums(trainer, trainer.model, kwargs, extras)
            return self.policy_sums(trainer, trainer.ref_model, kwargs, extras)

    def compute(
        self, trainer: Any, model: Any, kwargs: dict[str, Any], extras: dict[str, Any], super_loss: Any
    ) -> Any:
        """TRL's loss for the other listed types plus the mDPO terms (`super_loss(model, kwargs)` is TRL's
        `_compute_loss`: the loss, or (loss, outputs))."""
        import torch

        from capdpo.training.losses import mdpo_loss

        capture = _Capture(model)
        result = super_loss(capture, kwargs)
        loss, outputs = (result[0], result[1:]) if isinstance(result, tuple) else (result, None)
        mask = kwargs["completion_mask"][:, 1:]
        per_token = capture.log_probs[:, -mask.size(1) :]
        policy_chosen = (per_token * mask).sum(dim=1).chunk(2)[0]
        policy_corrupt = self.policy_sums(trainer, model, kwargs, extras)
        if trainer.precompute_ref_logps:
            ref_chosen = extras["ref_chosen_sum"].to(policy_chosen.device)
        else:  # TRL's reference forward keeps its numbers to itself: one more for the chosen rows' sums
            with torch.no_grad():
                ref_chosen = self._reference_chosen(trainer, kwargs)
        ref_corrupt = self.reference_sums(trainer, kwargs, extras, policy_chosen.device)
        losses, parts = mdpo_loss(policy_chosen, ref_chosen, policy_corrupt, ref_corrupt, self.params)
        loss = loss + losses.mean()
        mode = "train" if trainer.model.training else "eval"
        names = ("conditional", "anchor", "conditional_margin")
        record_metrics(trainer, mode, {f"mdpo/{name}": parts[name] for name in names})
        return (loss, *outputs) if outputs is not None else loss

    def _reference_chosen(self, trainer: Any, kwargs: dict[str, Any]) -> Any:
        from trl.models.utils import disable_gradient_checkpointing
        from trl.trainer.utils import use_adapter

        with disable_gradient_checkpointing(trainer.model, trainer.args.gradient_checkpointing_kwargs):
            if trainer.ref_model is None:
                unwrapped = trainer.accelerator.unwrap_model(trainer.model)
                with use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None):
                    sums, _, _, _ = trainer.completion_logps(trainer.model, kwargs)
            else:
                sums, _, _, _ = trainer.completion_logps(trainer.ref_model, kwargs)
        return sums.chunk(2)[0]

    def add_reference(self, trainer: Any, model: Any, batch: dict[str, Any], values: list[dict[str, Any]]) -> None:
        """Add each pair's reference sum of the chosen answer with the corrupted image (`corrupt_sum`) to the
        values the reference pass caches (the adapter off, as for the other reference values)."""
        import torch
        from trl.models.utils import disable_gradient_checkpointing
        from trl.trainer.utils import use_adapter

        extras = {k[len(EXTRA_PREFIX) :]: v for k, v in batch.items() if k.startswith(EXTRA_PREFIX)}
        kwargs = {k: v for k, v in batch.items() if not k.startswith(EXTRA_PREFIX)}
        unwrapped = trainer.accelerator.unwrap_model(model)
        peft = hasattr(unwrapped, "peft_config")
        adapter_off = use_adapter(unwrapped, adapter_name=None) if peft else contextlib.nullcontext()
        with (
            torch.no_grad(),
            adapter_off,
            disable_gradient_checkpointing(trainer.model, trainer.args.gradient_checkpointing_kwargs),
            trainer.accelerator.autocast(),
        ):
            sums = self.policy_sums(trainer, model, kwargs, extras)
        for value, corrupt in zip(values, sums.float().cpu().tolist()):
            value["corrupt_sum"] = corrupt


class _Capture:
    """Calls the model and keeps the per-token log-probs of the last call (TRL's forward inside its loss)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.log_probs: Any = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self.model(*args, **kwargs)
        self.log_probs = out.log_probs
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)
