"""Image features cached before training (capdpo.training.features): the same loss and gradients as encoding the
images in every step, no vision forward in the step, a pass that resumes after a kill, clear errors."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from capdpo.errors import InputError
from capdpo.training.data import pair_to_example
from capdpo.training.features import image_key
from tests.training.test_dpo import _loss_and_grads, _pairs, _set_lora_b, _trainer


def _three_images(sample_images) -> list:
    """Four pairs over three images (the first image in two pairs)."""
    base = _pairs(sample_images[0])
    pairs = list(base)
    for n, image in enumerate(sample_images[1:3], start=1):
        pairs.append(replace(base[0], id=f"ctx{n}", image_id=f"img{n}", image=str(image)))
    return pairs


def _vision_calls(trainer) -> list[int]:
    calls: list[int] = []
    from capdpo.models.patches import _vision_tower

    _vision_tower(trainer.model.get_base_model()).register_forward_hook(lambda *a: calls.append(1))
    return calls


@pytest.mark.parametrize(
    ("model", "share_prompt", "share_images"),
    [("strong", True, True), ("strong", False, True), ("strong", False, False), ("qwen3vl", True, True),
     ("qwen3vl", False, False), ("llava", True, True), ("llava", False, False)],
)  # fmt: skip
def test_cached_features_give_the_step_that_encodes_the_images(
    tiny_models, sample_images, tmp_path, model: str, share_prompt: bool, share_images: bool
) -> None:
    pairs = _three_images(sample_images)
    settings = dict(precompute_ref=True, share_prompt=share_prompt, share_image_features=share_images)
    cached = _trainer(tiny_models[model], tmp_path / "cached", pairs, **settings)
    plain = _trainer(tiny_models[model], tmp_path / "plain", pairs, cache_image_features=False, **settings)
    assert cached.features is not None and plain.features is None
    assert len(list(cached.features.folder.glob("*.safetensors"))) == 3  # one file per image
    results = {}
    for name, trainer in (("cached", cached), ("plain", plain)):
        _set_lora_b(trainer.model)
        calls = _vision_calls(trainer)
        results[name] = _loss_and_grads(trainer, pairs)
        assert len(calls) == (0 if name == "cached" else 1), name
    (loss_cached, grads_cached), (loss_plain, grads_plain) = results["cached"], results["plain"]
    assert abs(loss_plain - 0.6931) > 1e-3, "policy and reference must differ for the gradients to mean much"
    assert loss_cached == pytest.approx(loss_plain, abs=1e-5)
    assert grads_cached.keys() == grads_plain.keys() and any("lora_A" in n for n in grads_cached)
    for name, grad in grads_cached.items():
        assert torch.allclose(grad, grads_plain[name], atol=1e-5, rtol=1e-4), name


def test_the_feature_pass_resumes_after_a_kill_and_encodes_each_image_once(
    tiny_models, sample_images, tmp_path, monkeypatch
) -> None:
    from capdpo.training.features import FeatureCache

    pairs = _three_images(sample_images)
    saved: list[str] = []
    original = FeatureCache.save

    def save_then_die(self, key, features):
        if len(saved) == 1:
            raise KeyboardInterrupt  # killed after the first image's file was written
        saved.append(key)
        return original(self, key, features)

    def save_and_count(self, key, features):
        saved.append(key)
        return original(self, key, features)

    monkeypatch.setattr(FeatureCache, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        _trainer(tiny_models["strong"], tmp_path, pairs, precompute_ref=False, ref_batch_size=1)
    monkeypatch.setattr(FeatureCache, "save", save_and_count)
    trainer = _trainer(tiny_models["strong"], tmp_path, pairs, precompute_ref=False, ref_batch_size=2)
    keys = sorted({image_key(p.image_id, p.image) for p in pairs})
    assert len(keys) == 3 and sorted(saved) == keys  # every image exactly once over both runs
    assert not trainer.features.missing(keys)
    # a third run finds them all and encodes nothing
    saved.clear()
    _trainer(tiny_models["strong"], tmp_path, pairs, precompute_ref=False)
    assert saved == []


def test_a_disk_too_small_for_the_features_stops_the_pass_early_and_keeps_what_it_wrote(
    tiny_models, sample_images, tmp_path, monkeypatch
) -> None:
    import shutil
    from collections import namedtuple

    import capdpo.training.features as features_module

    pairs = _three_images(sample_images)
    real = shutil.disk_usage
    usage = namedtuple("usage", "total used free")
    # after the first image (one per forward), two more of its size must fit beside the 1 GiB kept free: give one
    first_size: list[int] = []
    original = features_module.FeatureCache.save

    def save(self, key, features):
        first_size.append(original(self, key, features))
        return first_size[-1]

    monkeypatch.setattr(features_module.FeatureCache, "save", save)
    monkeypatch.setattr(
        features_module.shutil, "disk_usage", lambda p: usage(0, 0, features_module._SPARE + first_size[0] + 1)
    )
    with pytest.raises(InputError) as err:
        _trainer(tiny_models["strong"], tmp_path, pairs, precompute_ref=False, ref_batch_size=1)
    message = str(err.value)
    assert "GiB free" in message and "cache_image_features: false" in message and "kept" in message
    assert "\n" not in message and len(first_size) == 1
    folder = tmp_path / "image_features"
    assert len(list(folder.rglob("*.safetensors"))) == 1  # the finished image stays
    assert str(next(folder.iterdir())) in message
    monkeypatch.setattr(features_module.shutil, "disk_usage", real)
    trainer = _trainer(tiny_models["strong"], tmp_path, pairs, precompute_ref=False, ref_batch_size=1)
    assert len(first_size) == 3  # the rerun encodes the other two only
    assert trainer.features.size() == (3, sum(f.stat().st_size for f in folder.rglob("*.safetensors")))


def test_an_unreadable_feature_file_is_a_clear_error(tiny_models, sample_images, tmp_path) -> None:
    pairs = _pairs(sample_images[0])
    trainer = _trainer(tiny_models["strong"], tmp_path, pairs, precompute_ref=False)
    path = trainer.features.path(image_key(pairs[0].image_id, pairs[0].image))
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(InputError) as err:
        trainer.data_collator([pair_to_example(p) for p in pairs])
    assert str(path) in str(err.value) and pairs[0].image in str(err.value) and "delete" in str(err.value)


def test_a_trainable_vision_tower_or_projector_encodes_in_every_step(tiny_models, sample_images, tmp_path) -> None:
    from capdpo.models.patches import vision_frozen

    pairs = _pairs(sample_images[0])
    lora_vision = _trainer(
        tiny_models["strong"], tmp_path / "v", pairs, precompute_ref=False, lora_vision=True,
        lora_targets=["q_proj", "qkv"],
    )  # fmt: skip
    assert lora_vision.features is None and lora_vision.data_collator.features is None
    assert not (tmp_path / "v" / "image_features").exists() or not any(
        (tmp_path / "v" / "image_features").rglob("*.safetensors")
    )
    # LLaVA's projector sits outside its tower: training it changes the features as much as training the tower
    llava = _trainer(tiny_models["llava"], tmp_path / "llava", pairs, precompute_ref=False)
    base = llava.model.get_base_model()
    assert llava.features is not None and vision_frozen(base)
    next(base.model.multi_modal_projector.parameters()).requires_grad_(True)
    assert not vision_frozen(base)


def test_qwen3_vl_files_hold_the_deepstack_features_beside_the_merged_ones(tiny_models, sample_images, tmp_path):
    from safetensors.torch import load_file

    from capdpo.training.trainer import _backbone

    pairs = _pairs(sample_images[0])
    trainer = _trainer(tiny_models["qwen3vl"], tmp_path, pairs, precompute_ref=False)
    backbone = _backbone(trainer.model)
    layers = len(backbone.config.vision_config.deepstack_visual_indexes)
    collator = trainer.data_collator
    assert layers >= 1 and collator([pair_to_example(pairs[0])])["pixel_values"].numel() == 0
    collator.features = None  # the same batch with its pixels, encoded by the tower itself
    batch = trainer._prepare_inputs(collator([pair_to_example(pairs[0])]))
    with torch.no_grad():
        grid = batch["image_grid_thw"][:1]
        encoded = backbone._capdpo_cached_original(batch["pixel_values"][: int(grid.prod())], grid)
    saved = load_file(trainer.features.path(image_key(pairs[0].image_id, pairs[0].image)))["features"]
    parts = saved.chunk(1 + layers, dim=-1)
    expected = [encoded.pooler_output[0], *(layer[0] for layer in encoded.deepstack_features)]
    assert len(parts) == len(expected) == 1 + layers
    for part, want in zip(parts, expected, strict=True):
        assert part.shape == want.shape and torch.allclose(part, want.float(), atol=1e-5)
    assert not torch.allclose(parts[0], parts[1])  # the deepstack layer is not a copy of the merged features


def test_mdpo_with_cached_features_equals_mdpo_without(tiny_models, sample_images, tmp_path) -> None:
    pairs = _pairs(sample_images[1])
    losses = {}
    for name, cache in (("cached", True), ("plain", False)):
        trainer = _trainer(
            tiny_models["strong"], tmp_path / name, pairs, loss_type=["sigmoid", "mdpo"], precompute_ref=True,
            cache_image_features=cache,
        )  # fmt: skip
        assert (trainer.features is not None) is cache
        _set_lora_b(trainer.model)
        losses[name] = _loss_and_grads(trainer, pairs)[0]
    assert losses["cached"] == pytest.approx(losses["plain"], abs=1e-5)


def test_every_process_shards_the_missing_list_read_before_any_writes(tmp_path):
    """Two processes (threads here) fill one feature cache: the one that reads the cache later must still see every
    key missing, or keys its share would have had fall to no one."""
    import threading
    import time
    from types import SimpleNamespace

    import torch

    from capdpo.training.features import FeatureCache
    from capdpo.training.trainer import CapdpoDPOTrainer

    cache = FeatureCache(tmp_path, {"model": "m"})
    cache.prepare()
    keys = [f"img{i}" for i in range(6)]
    barrier = threading.Barrier(2, timeout=30)
    shares: dict[int, list[str]] = {}

    def process(rank: int) -> None:
        trainer = SimpleNamespace(
            accelerator=SimpleNamespace(
                wait_for_everyone=barrier.wait, state=SimpleNamespace(process_index=rank, num_processes=2)
            )
        )
        if rank == 1:
            time.sleep(0.3)  # reads the cache after rank 0 could have written
        missing = CapdpoDPOTrainer._agreed_missing(trainer, cache, keys)
        batches = CapdpoDPOTrainer._my_batches(trainer, missing, batch_size=2)
        shares[rank] = [k for batch in batches for k in batch]
        for key in shares[rank]:
            cache.save(key, torch.zeros(2, 3))

    threads = [threading.Thread(target=process, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(shares[0] + shares[1]) == keys and not set(shares[0]) & set(shares[1])
    assert cache.missing(keys) == []
