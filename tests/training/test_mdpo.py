"""The `mdpo` loss type: its formula, the corrupted images, the conditional rows and their cached reference."""

from __future__ import annotations

import math

import pytest
import torch

from capdpo.errors import ConfigError, InputError
from capdpo.images import load_image
from capdpo.training.conditional import ConditionalTerm, MdpoParams, conditional_inputs
from capdpo.training.config import DpoConfig
from capdpo.training.corruption import Corruption
from capdpo.training.data import EXTRA_PREFIX, pair_to_example
from capdpo.training.dpo import dpo_loss_arguments
from capdpo.training.losses import mdpo_loss
from tests.training.test_dpo import _by_hand_logps, _pairs, _set_lora_b, _trainer


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_mdpo_loss_equals_a_hand_computation() -> None:
    pc, rc, pk, rk = [-10.0, -20.0], [-11.0, -19.0], [-14.0, -18.5], [-12.0, -19.5]
    params = MdpoParams(beta=0.5, conditional_weight=0.7, anchor_weight=1.3, anchor=0.2, weight=2.0)
    losses, parts = mdpo_loss(*(torch.tensor(v, dtype=torch.float64) for v in (pc, rc, pk, rk)), params)
    for i in range(2):
        reward = pc[i] - rc[i]
        conditional = -_log_sigmoid(0.5 * (reward - (pk[i] - rk[i])))
        anchor = -_log_sigmoid(0.5 * reward - 0.2)
        assert parts["conditional"][i].item() == pytest.approx(conditional, abs=1e-12)
        assert parts["anchor"][i].item() == pytest.approx(anchor, abs=1e-12)
        assert losses[i].item() == pytest.approx(2.0 * (0.7 * conditional + 1.3 * anchor), abs=1e-12)
    # pair 0 by hand: reward 1, corrupted reward -2, margin 3
    assert parts["conditional_margin"][0].item() == 3.0


def test_mdpo_config_and_trl_arguments() -> None:
    cfg = DpoConfig(loss_type=["sigmoid", "sft", "mdpo"], loss_weights=[1.0, 0.5, 2.0])
    args = dpo_loss_arguments(cfg)
    assert args["loss_type"] == ["sigmoid", "sft"] and args["loss_weights"] == [1.0, 0.5]
    assert dpo_loss_arguments(DpoConfig(loss_type=["sigmoid", "mdpo"]))["loss_weights"] is None
    with pytest.raises(ConfigError, match="mdpo adds to a preference loss"):
        DpoConfig(loss_type=["mdpo"])
    with pytest.raises(ConfigError, match="mdpo_corruption"):
        DpoConfig(loss_type=["sigmoid", "mdpo"], mdpo_corruption="blur")


@pytest.mark.parametrize("kind", ["crop", "mask", "noise"])
def test_corruptions_are_seeded_per_pair_and_keep_the_size(sample_images, kind: str) -> None:
    image = load_image(sample_images[2])
    corruption = Corruption(kind=kind, seed=3)
    first, again = corruption.apply(image, "pair-a"), corruption.apply(image, "pair-a")
    other = corruption.apply(image, "pair-b")
    assert first.size == image.size and first.mode == "RGB"
    assert first.tobytes() == again.tobytes()  # every epoch and the reference pass see the same image
    assert first.tobytes() != other.tobytes() and first.tobytes() != image.tobytes()


def test_conditional_rows_use_the_corrupted_image_and_nothing_else(tiny_models, sample_images, tmp_path) -> None:
    pair = _pairs(sample_images[0])[0]
    # a rejected image of the pair's size (resizing it is then the identity): the by-hand number can read the file
    rejected = tmp_path / "rejected.png"
    Corruption(kind="mask", seed=1).apply(load_image(pair.image), pair.id).save(rejected)
    pair.rejected_image = str(rejected)
    trainer = _trainer(
        tiny_models["strong"], tmp_path, [pair], loss_type=["sigmoid", "mdpo"], precompute_ref=False,
        cache_image_features=False,  # the true image's pixels are compared below
    )  # fmt: skip
    batch = trainer._prepare_inputs(trainer.data_collator([pair_to_example(pair)]))
    extras = {k[len(EXTRA_PREFIX) :]: v for k, v in batch.items() if k.startswith(EXTRA_PREFIX)}
    kwargs = trainer._model_inputs(trainer.model, batch)
    rows = conditional_inputs(kwargs, extras)
    # tokens and masks: exactly the chosen row's
    for key in ("input_ids", "attention_mask", "completion_mask"):
        assert torch.equal(rows[key], kwargs[key][:1]), key
    # pixels: the rejected image's, processed as the true one is
    processor = trainer.processing_class
    expected = processor(text=["<|vision_start|><|image_pad|><|vision_end|>"], images=[load_image(rejected)])
    assert torch.allclose(rows["pixel_values"], expected["pixel_values"].to(rows["pixel_values"].dtype))
    assert not torch.allclose(rows["pixel_values"], kwargs["pixel_values"])
    assert torch.equal(rows["image_grid_thw"], kwargs["image_grid_thw"][:1])
    # the conditional log-prob equals an independent forward on the chosen answer with the rejected image
    trainer.model.eval()
    with torch.no_grad():
        got = trainer.conditional.policy_sums(trainer, trainer.model, kwargs, extras)
    with_rejected = _pairs(sample_images[0])[0]
    with_rejected.image = str(rejected)
    by_hand, _ = _by_hand_logps(tiny_models["strong"], with_rejected)
    assert got[0].item() == pytest.approx(by_hand, abs=1e-4)
    true_image, _ = _by_hand_logps(tiny_models["strong"], pair)
    assert abs(by_hand - true_image) > 1e-3, "the corrupted image must change the number for this to mean anything"


def test_mdpo_training_loss_with_cached_and_in_step_reference(
    tiny_models, sample_images, tmp_path, monkeypatch
) -> None:
    pairs = _pairs(sample_images[1])
    settings = dict(
        loss_type=["sigmoid", "mdpo"], mdpo_conditional_weight=0.5, mdpo_anchor_weight=2.0, ref_batch_size=1
    )
    # the reference pass is killed after its first pair; the rerun computes only the second
    calls = []
    original = ConditionalTerm.add_reference

    def killed_after_one(self, *args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return original(self, *args)

    monkeypatch.setattr(ConditionalTerm, "add_reference", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        _trainer(tiny_models["strong"], tmp_path / "pre", pairs, precompute_ref=True, **settings)
    monkeypatch.setattr(ConditionalTerm, "add_reference", original)
    precomputed = _trainer(tiny_models["strong"], tmp_path / "pre", pairs, precompute_ref=True, **settings)
    assert precomputed.reference_computed == 1 and len(precomputed.reference) == 2
    assert all("corrupt_sum" in precomputed.reference.get(p.id) for p in pairs)
    in_step = _trainer(tiny_models["strong"], tmp_path / "fly", pairs, precompute_ref=False, **settings)

    # policy == reference: every log-ratio is 0, so sigmoid, conditional and anchor are each log 2
    batch = precomputed._prepare_inputs(precomputed.data_collator([pair_to_example(p) for p in pairs]))
    with torch.no_grad():
        assert precomputed.compute_loss(precomputed.model, batch).item() == pytest.approx(
            (1 + 0.5 + 2.0) * math.log(2), abs=1e-5
        )

    from tests.training.test_dpo import _loss_and_grads

    for trainer in (precomputed, in_step):
        _set_lora_b(trainer.model)
    loss_pre, grads_pre = _loss_and_grads(precomputed, pairs)
    loss_fly, grads_fly = _loss_and_grads(in_step, pairs)
    assert abs(loss_pre - 3.5 * math.log(2)) > 1e-3
    assert loss_pre == pytest.approx(loss_fly, abs=1e-4)
    for name, grad in grads_pre.items():
        assert torch.allclose(grad, grads_fly[name], atol=1e-4, rtol=1e-4), name
    assert precomputed._metrics["train"]["mdpo/conditional"], "the mDPO terms are logged"


def test_rejected_image_is_optional_and_checked_before_training(sample_images, tiny_models, tmp_path) -> None:
    from capdpo.models.loading import load_vlm
    from capdpo.training.data import PairEncoder, check_pairs

    pair = _pairs(sample_images[0])[0]
    assert "rejected_image" not in pair.to_dict()
    pair.rejected_image = str(tmp_path / "missing.png")
    assert pair.to_dict()["rejected_image"] == pair.rejected_image
    encoder = PairEncoder(load_vlm(str(tiny_models["strong"])).processor)
    with pytest.raises(InputError, match=r"pairs.jsonl: record 1: pair ctx: rejected_image .*missing.png not found"):
        check_pairs([(1, pair)], encoder, tmp_path / "pairs.jsonl")


def test_a_corrupted_image_that_changes_the_prompts_tokens_is_an_error_naming_the_pair(
    sample_images, tiny_models, monkeypatch
) -> None:
    """The conditional row must hold the true prompt's tokens; an image of another size (its image tokens change)
    is refused with the pair's id, never scored against the wrong tokens."""
    from PIL import Image

    from capdpo.models.loading import load_vlm
    from capdpo.training import corruption
    from capdpo.training.data import PairEncoder

    pair = _pairs(sample_images[0])[0]
    encoder = PairEncoder(load_vlm(str(tiny_models["strong"])).processor)
    encoded = encoder.encode(pair)
    noise = Corruption("noise")
    assert set(encoder.encode_corrupted(pair, encoded, noise)) >= {"pixel_values"}  # the control: same size, fine
    monkeypatch.setattr(corruption, "corrupted_image", lambda p, image, c: Image.new("RGB", (224, 224)))
    with pytest.raises(InputError, match=f"pair {pair.id}: its corrupted image gives other prompt tokens"):
        encoder.encode_corrupted(pair, encoded, noise)
