"""The DPO pieces on fixed tensors and the tiny model: Uni-DPO against a float64 hand computation, completion
log-probs against an independent computation, the precomputed reference against the in-step one, one vision pass
per pair, and every TRL loss type running on our batches."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from capdpo.config import CommonConfig
from capdpo.errors import ConfigError, InputError
from capdpo.models.patches import _vision_tower
from capdpo.records import PairRecord
from capdpo.training.config import DpoConfig as TrainConfig
from capdpo.training.data import PairEncoder, pair_to_example
from capdpo.training.losses import LOSSES, UniDPOParams, map_scores, unidpo_loss
from capdpo.training.metrics import settle_metrics

# ---- Uni-DPO ------------------------------------------------------------------------------------------------


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _unidpo_by_hand(pc: float, pr: float, rc: float, rr: float, sc: float, sr: float, p: UniDPOParams) -> float:
    m = (pc - pr) - (rc - rr)
    w_qual = _sigmoid(p.eta * (sc - sr))
    w_perf = (1.0 - _sigmoid(p.beta * (pc - pr) - p.tau_ref)) ** p.gamma
    loss = -w_qual * w_perf * math.log(_sigmoid(p.beta * m))
    if sc >= p.tau_good and rc > pc:
        loss -= p.nll_lambda * pc
    return loss


# (policy chosen, policy rejected, ref chosen, ref rejected, score chosen, score rejected) as per-token averages
# and Uni-DPO-scale scores; the comment says whether the calibrated NLL term applies.
CASES = [
    (-1.20, -1.90, -1.00, -1.50, 4.0, 1.0),  # ref_c > pi_c and s_c >= tau_good: NLL on
    (-0.80, -1.90, -1.00, -1.50, 4.0, 1.0),  # pi_c > ref_c: off
    (-1.20, -1.90, -1.00, -1.50, 2.0, 1.0),  # s_c < tau_good: off
    (-2.00, -0.50, -1.10, -1.30, 2.5, 2.4),  # s_c == tau_good, ref_c > pi_c: on; policy prefers rejected
]


def test_unidpo_loss_equals_float64_hand_computation_with_nll_switching() -> None:
    params = UniDPOParams(beta=2.0, eta=0.7, tau_ref=2.0, gamma=3.0, nll_lambda=0.05, tau_good=2.5)
    columns = [torch.tensor(c, dtype=torch.float64) for c in zip(*CASES)]
    losses, parts = unidpo_loss(*columns, params)
    expected = [_unidpo_by_hand(*case, params) for case in CASES]
    assert losses.dtype == torch.float64
    for got, want in zip(losses.tolist(), expected):
        assert got == pytest.approx(want, rel=1e-12, abs=1e-14)
    assert parts["nll_active"].tolist() == [1.0, 0.0, 0.0, 1.0]
    # with lambda 0 the NLL term is gone even where it would apply
    no_nll, _ = unidpo_loss(*columns, UniDPOParams(beta=2.0, eta=0.7, tau_ref=2.0, gamma=3.0, nll_lambda=0.0))
    off = UniDPOParams(beta=2.0, eta=0.7, tau_ref=2.0, gamma=3.0, nll_lambda=0.0)
    for got, case in zip(no_nll.tolist(), CASES):
        assert got == pytest.approx(_unidpo_by_hand(*case, off), rel=1e-12)
    assert no_nll[0].item() != pytest.approx(losses[0].item(), rel=1e-6)  # the term really changed case 0


def test_unidpo_gradient_flows_through_the_performance_weight() -> None:
    params = UniDPOParams(nll_lambda=0.0)
    pc, pr, rc, rr, sc, sr = CASES[1]
    policy_chosen = torch.tensor([pc], dtype=torch.float64, requires_grad=True)
    rest = (torch.tensor([v], dtype=torch.float64) for v in (pr, rc, rr, sc, sr))
    loss, _ = unidpo_loss(policy_chosen, *rest, params)
    loss.sum().backward()
    h = 1e-6  # central difference of the hand formula, w_perf included (it is not detached)
    numeric = (
        _unidpo_by_hand(pc + h, pr, rc, rr, sc, sr, params) - _unidpo_by_hand(pc - h, pr, rc, rr, sc, sr, params)
    ) / (2 * h)
    assert policy_chosen.grad.item() == pytest.approx(numeric, rel=1e-6)
    # what a detached w_perf would give: clearly different, so the test above does check the w_perf path
    w_qual = _sigmoid(params.eta * (sc - sr))
    w_perf = (1.0 - _sigmoid(params.beta * (pc - pr) - params.tau_ref)) ** params.gamma

    def dpo_part(x: float) -> float:
        return -w_qual * w_perf * math.log(_sigmoid(params.beta * ((x - pr) - (rc - rr))))

    detached = (dpo_part(pc + h) - dpo_part(pc - h)) / (2 * h)
    assert abs(numeric - detached) > 1e-3 * abs(detached)


def test_score_mapping_is_linear_onto_the_configured_range() -> None:
    scores = torch.tensor([0.0, 0.5, 1.0])
    assert map_scores(scores, 0.0, 5.0).tolist() == [0.0, 2.5, 5.0]
    assert map_scores(scores, 1.0, 3.0).tolist() == [1.0, 2.0, 3.0]


# ---- config -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"loss_type": ["unidpo", "sigmoid"]}, "cannot be combined"),
        ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}, "1 weight(s) for 2"),
        ({"loss_type": ["dpo"]}, "unknown ['dpo']"),
        ({"method": "adapter"}, "train.method"),
        ({"loss_type": ["exo_pair"]}, "exo_pair needs"),
        ({"deepspeed": "zero4"}, "train.deepspeed"),
        ({"unidpo_score_low": 1.0, "unidpo_score_high": 1.0}, "unidpo_score_high"),
        ({"dataloader_workers": -1}, "train.dataloader_workers"),
    ],
)
def test_train_config_refuses_bad_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        TrainConfig(**kwargs)
    assert message in str(err.value)


def test_mpo_and_unidpo_defaults() -> None:
    mpo = TrainConfig(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0])
    assert mpo.resolved_beta() == 0.1 and mpo.resolved_learning_rate() == 5e-5
    assert TrainConfig(loss_type=["unidpo"]).resolved_beta() == 2.0
    assert TrainConfig(method="full").resolved_learning_rate() == 1e-6


def test_dataloader_workers_default_to_two_on_a_gpu_and_none_on_cpu() -> None:
    from capdpo.training.dpo import dpo_arguments
    from capdpo.training.setup import dataloader_workers

    assert TrainConfig().dataloader_workers is None
    assert dataloader_workers(TrainConfig(), use_cpu=False) == 2
    assert dataloader_workers(TrainConfig(), use_cpu=True) == 0
    assert dataloader_workers(TrainConfig(dataloader_workers=5), use_cpu=True) == 5
    assert dataloader_workers(TrainConfig(dataloader_workers=0), use_cpu=False) == 0
    args = dpo_arguments(TrainConfig(), CommonConfig(run_dir="/tmp/x"), Path("/tmp/x/c"), use_cpu=True)
    assert args.dataloader_num_workers == 0


# ---- the tiny model -----------------------------------------------------------------------------------------


def _pairs(image: Path) -> list[PairRecord]:
    return [
        PairRecord(
            id="ctx",
            image_id="img",
            image=str(image),
            prompt="Describe this image in detail.",
            chosen="A red circle on a white wall.",
            rejected="A blue dog runs on the grass near the road.",
            score_chosen=0.9,
            score_rejected=0.2,
            mode="context",
        ),
        PairRecord(
            id="sent",
            image_id="img",
            image=str(image),
            prompt="Describe this image in detail.",
            chosen="It is red.",
            rejected="It is a large green bus.",
            score_chosen=0.8,
            score_rejected=0.3,
            mode="sentence",
            assistant_prefix="The picture shows a circle.",
        ),
    ]


def _trainer(strong: Path, tmp: Path, pairs: list[PairRecord], **settings: object):
    from capdpo.models.loading import load_for_training
    from capdpo.training.dpo import build_trainer, reference_fingerprint
    from capdpo.training.dpo import dpo_arguments as dpo_args

    cfg = TrainConfig(**{"max_steps": 1, "gradient_accumulation_steps": 1, "batch_size": len(pairs), **settings})
    common = CommonConfig(run_dir=str(tmp), strong_model=str(strong))
    lm = load_for_training(str(strong), device="cpu")
    args = dpo_args(cfg, common, tmp / "checkpoints", deepspeed=None, bf16=False, use_cpu=True, has_eval=False)
    return build_trainer(
        cfg, lm, pairs, [], args, reference_root=tmp / "ref_logps", fingerprint=reference_fingerprint(cfg, common, lm)
    )


def _set_lora_b(model: torch.nn.Module, scale: float = 0.05) -> None:
    """Give LoRA B non-zero values (seeded by name) so the policy differs from the reference."""
    import zlib

    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
                param.copy_(torch.randn(param.shape, generator=g) * scale)


def _loss_and_grads(trainer, pairs: list[PairRecord]) -> tuple[float, dict[str, torch.Tensor]]:
    trainer.model.train()
    batch = trainer._prepare_inputs(trainer.data_collator([pair_to_example(p) for p in pairs]))
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.item(), grads


def _by_hand_logps(strong: Path, pair: PairRecord) -> tuple[float, int]:
    """Completion log-prob of a pair's chosen side computed independently: the whole conversation rendered by the
    chat template and tokenized at once, a plain forward, log-softmax in float64, summed over the tokens after the
    generation prompt up to and including the first <|im_end|>."""
    from capdpo.images import load_image
    from capdpo.models.loading import load_vlm

    lm = load_vlm(str(strong), device="cpu")
    processor, tokenizer = lm.processor, lm.tokenizer
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": pair.prompt}]}
    answer = f"{pair.assistant_prefix} {pair.chosen}" if pair.assistant_prefix else pair.chosen
    full = processor.apply_chat_template(
        [user, {"role": "assistant", "content": [{"type": "text", "text": answer}]}], tokenize=False
    )
    header = processor.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
    image = load_image(pair.image)
    full_ids = processor(text=[full], images=[image], return_tensors="pt")
    prompt_ids = processor(text=[header + pair.assistant_prefix], images=[image], return_tensors="pt")["input_ids"][
        0
    ].tolist()
    ids = full_ids["input_ids"][0].tolist()
    start = len(prompt_ids)
    assert ids[:start] == prompt_ids, "the prompt must tokenize the same inside the full conversation"
    end = ids.index(tokenizer.convert_tokens_to_ids("<|im_end|>"), start)
    assert ids[end + 1 :] == tokenizer("\n", add_special_tokens=False)["input_ids"]  # the template's tail after it
    with torch.no_grad():
        logits = lm.model(**full_ids).logits[0].double()
    logprobs = torch.log_softmax(logits, dim=-1)
    total = sum(logprobs[t - 1, ids[t]].item() for t in range(start, end + 1))
    return total, end + 1 - start


def _by_hand_side_logps(model_path: Path, pair: PairRecord, side: str) -> tuple[float, int]:
    """A side's completion log-prob computed independently, for any family: the conversation rendered by the chat
    template and split where the model's own answer starts, the prompt tokenized as generation sees it and the rest
    on its own, one plain forward, log-softmax in float64, summed from the first answer token
    to the template's first end-of-turn token (Qwen's <|im_end|>, LLaVA's </s>), inclusive."""
    from capdpo.images import load_image
    from capdpo.models.loading import load_vlm

    lm = load_vlm(str(model_path), device="cpu")
    processor, tokenizer = lm.processor, lm.tokenizer
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": pair.prompt}]}
    text = getattr(pair, side)
    answer = f"{pair.assistant_prefix} {text}" if pair.assistant_prefix else text
    full = processor.apply_chat_template(
        [user, {"role": "assistant", "content": [{"type": "text", "text": answer}]}], tokenize=False
    )
    # the prompt: the generation prompt, or with an assistant prefix the rendered turn up to the prefix's end (the
    # model continues its own answer: LLaVA's template puts a space after "ASSISTANT:" that the prefix then carries)
    prompt_text = processor.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
    if pair.assistant_prefix:
        prompt_text = full[: full.index(answer) + len(pair.assistant_prefix)]
    assert full.startswith(prompt_text)
    inputs = processor(text=[prompt_text], images=[load_image(pair.image)], return_tensors="pt")
    start = inputs["input_ids"].shape[1]
    completion = torch.tensor([tokenizer(full[len(prompt_text) :], add_special_tokens=False)["input_ids"]])
    for key, value in list(inputs.items()):  # per-token tensors grow by the completion (text tokens)
        if torch.is_tensor(value) and value.dim() == 2 and value.shape[1] == start:
            fill = completion if key == "input_ids" else torch.full_like(completion, int(key == "attention_mask"))
            inputs[key] = torch.cat([value, fill], dim=1)
    ids = inputs["input_ids"][0].tolist()
    end = min(i for i in range(start, len(ids)) if ids[i] in lm.end_of_turn_ids())
    with torch.no_grad():
        logprobs = torch.log_softmax(lm.model(**inputs).logits[0].double(), dim=-1)
    return sum(logprobs[t - 1, ids[t]].item() for t in range(start, end + 1)), end + 1 - start


@pytest.mark.parametrize("family", ["strong", "qwen3vl", "llava"])
def test_both_sides_log_probs_cover_exactly_their_completion_tokens_in_every_family(
    tiny_models, sample_images, tmp_path, family
) -> None:
    """The chosen and the rejected answer's summed log-probs, through the trainer and through the training loss's
    metrics, equal a plain forward pass over the whole rendered conversation summed by hand over exactly the
    answer's tokens and its end-of-turn token: context mode and sentence mode (an assistant prefix)."""
    pairs = _pairs(sample_images[2])
    trainer = _trainer(tiny_models[family], tmp_path, pairs, precompute_ref=False)
    for pair in pairs:
        batch = trainer._prepare_inputs(trainer.data_collator([pair_to_example(pair)]))
        trainer.model.eval()
        with torch.no_grad():
            sums, counts, _, _ = trainer.completion_logps(trainer.model, trainer._model_inputs(trainer.model, batch))
        trainer.model.train()
        trainer._metrics["train"].clear()
        with torch.no_grad():
            trainer.compute_loss(trainer.model, batch)
        settle_metrics(trainer._metrics)
        for row, side in enumerate(("chosen", "rejected")):
            expected, n_tokens = _by_hand_side_logps(tiny_models[family], pair, side)
            assert int(counts[row]) == n_tokens, (pair.id, side)
            assert sums[row].item() == pytest.approx(expected, abs=1e-4), (pair.id, side)
            assert trainer._metrics["train"][f"logps/{side}"][0] == pytest.approx(expected, abs=1e-4), (pair.id, side)


def test_completion_logprobs_cover_exactly_the_completion_tokens(tiny_models, sample_images, tmp_path) -> None:
    pairs = _pairs(sample_images[0])
    trainer = _trainer(tiny_models["strong"], tmp_path, pairs, precompute_ref=False)
    tokenizer = trainer.processing_class.tokenizer
    for pair in pairs:
        expected, n_tokens = _by_hand_logps(tiny_models["strong"], pair)
        completion = f" {pair.chosen}" if pair.assistant_prefix else pair.chosen
        assert n_tokens == len(tokenizer(completion, add_special_tokens=False)["input_ids"]) + 1  # + <|im_end|>
        batch = trainer._prepare_inputs(trainer.data_collator([pair_to_example(pair)]))
        assert int(batch["completion_mask"][0].sum()) == n_tokens
        trainer.model.eval()
        with torch.no_grad():
            sums, counts, _, _ = trainer.completion_logps(trainer.model, trainer._model_inputs(trainer.model, batch))
        assert int(counts[0]) == n_tokens
        assert sums[0].item() == pytest.approx(expected, abs=1e-4)
        # the same number through the path training takes (TRL's loss, which logs logps/chosen)
        trainer.model.train()
        trainer._metrics["train"].clear()
        with torch.no_grad():
            trainer.compute_loss(trainer.model, batch)
        settle_metrics(trainer._metrics)
        assert trainer._metrics["train"]["logps/chosen"][0] == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("loss_type", [["sigmoid"], ["unidpo"]])
def test_precomputed_reference_gives_the_same_loss_and_gradients(
    tiny_models, sample_images, tmp_path, loss_type
) -> None:
    pairs = _pairs(sample_images[1])
    precomputed = _trainer(tiny_models["strong"], tmp_path / "pre", pairs, loss_type=loss_type, precompute_ref=True)
    in_step = _trainer(tiny_models["strong"], tmp_path / "fly", pairs, loss_type=loss_type, precompute_ref=False)
    assert precomputed.reference is not None and len(precomputed.reference) == len(pairs)
    assert in_step.reference is None
    for trainer in (precomputed, in_step):
        _set_lora_b(trainer.model)  # after the reference pass: policy != reference from here on

    forwards = []
    hook = precomputed.model.get_base_model().model.language_model.register_forward_hook(lambda *a: forwards.append(1))
    loss_pre, grads_pre = _loss_and_grads(precomputed, pairs)
    hook.remove()
    loss_fly, grads_fly = _loss_and_grads(in_step, pairs)
    assert len(forwards) == 1, "with a precomputed reference only the policy forward runs"
    assert abs(loss_pre - math.log(2)) > 1e-3, "policy and reference must differ for this check to mean anything"
    assert loss_pre == pytest.approx(loss_fly, abs=1e-4)
    assert grads_pre.keys() == grads_fly.keys() and any("lora_A" in n for n in grads_pre)
    for name, grad in grads_pre.items():
        assert torch.allclose(grad, grads_fly[name], atol=1e-4, rtol=1e-4), name


@pytest.mark.parametrize("family", ["strong", "qwen3vl"])
def test_each_image_is_encoded_once_per_pair(tiny_models, sample_images, tmp_path, family: str) -> None:
    pairs = _pairs(sample_images[2])
    # two rows per pair (the packed step holds each image once anyway: tests/training/test_packing.py)
    # the vision tower runs in the step (no cached features: tests/training/test_features.py)
    shared = _trainer(
        tiny_models[family], tmp_path / "shared", pairs, precompute_ref=True, share_prompt=False,
        cache_image_features=False,
    )  # fmt: skip
    repeated = _trainer(
        tiny_models[family],
        tmp_path / "repeated",
        pairs,
        precompute_ref=True,
        share_image_features=False,
        share_prompt=False,
        cache_image_features=False,
    )
    assert shared.share_images and not repeated.share_images
    results = []
    for trainer in (shared, repeated):
        _set_lora_b(trainer.model)
        images_seen: list[int] = []
        visual = trainer.model.get_base_model().model.visual

        def count_images(module, args, kwargs, out, seen=images_seen) -> None:
            seen.append(int(kwargs["grid_thw"].shape[0]))

        hook = visual.register_forward_hook(count_images, with_kwargs=True)
        results.append((_loss_and_grads(trainer, pairs), images_seen))
        hook.remove()
    (loss_shared, grads_shared), seen_shared = results[0]
    (loss_repeated, grads_repeated), seen_repeated = results[1]
    assert seen_shared == [len(pairs)]  # one vision pass, one image per pair
    assert seen_repeated == [2 * len(pairs)]  # TRL's way: every image twice
    assert loss_shared == pytest.approx(loss_repeated, abs=1e-5)
    for name, grad in grads_shared.items():
        assert torch.allclose(grad, grads_repeated[name], atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("share_prompt", [True, False])
def test_plain_dpo_equals_trls_loss_gradients_and_metrics_without_reading_the_device(
    tiny_models, sample_images, tmp_path, monkeypatch, share_prompt: bool
) -> None:
    """Plain DPO (the default) is computed by capdpo with its metrics kept on the device: the same loss, gradients
    and logged metrics as TRL's `_compute_loss` on the same batch over two steps, without TRL's float reads."""
    from trl import DPOTrainer

    from capdpo.training.trainer import images_shared

    pairs = _pairs(sample_images[4])
    trainer = _trainer(
        tiny_models["strong"], tmp_path, pairs, precompute_ref=True, share_prompt=share_prompt, beta=0.02,
        cache_image_features=False,  # TRL's _compute_loss, called below as is, runs the vision tower
    )  # fmt: skip
    _set_lora_b(trainer.model)
    trainer.loss_weights = [0.7]
    batch = trainer._prepare_inputs(trainer.data_collator([pair_to_example(p) for p in pairs]))
    kwargs = trainer._model_inputs(trainer.model, batch)
    assert trainer._dpo_on_device(return_outputs=False) and not trainer._dpo_on_device(return_outputs=True)

    item = torch.Tensor.item
    reads = []
    monkeypatch.setattr(torch.Tensor, "item", lambda self: reads.append(1) or item(self))

    def counted(fn) -> tuple[object, int]:
        """fn's result and how many floats it read from the device (each read waits for all the queued work)."""
        before = len(reads)
        result = fn()
        return result, len(reads) - before

    def trl_loss():
        with trainer._prompts_shared(trainer.model), images_shared([trainer.model], trainer.share_images):
            return DPOTrainer._compute_loss(trainer, trainer.model, kwargs, False)

    def two_steps(loss_fn):
        trainer._metrics["train"].clear()
        trainer._total_train_tokens = 0
        trainer.model.train()
        trainer.model.zero_grad()
        losses, step_reads = [], []
        for _ in range(2):
            loss, n = counted(loss_fn)
            loss.backward()
            losses.append(item(loss))
            step_reads.append(n)
        grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        settle_metrics(trainer._metrics)
        return losses, grads, dict(trainer._metrics["train"]), trainer._total_train_tokens, step_reads

    with torch.no_grad():  # the model's forward alone reads a few (transformers checks the image token count)
        _, forward_reads = counted(lambda: trainer.completion_logps(trainer.model, kwargs))
    loss_ours, grads_ours, metrics_ours, tokens_ours, reads_ours = two_steps(
        lambda: trainer.compute_loss(trainer.model, batch)
    )
    loss_trl, grads_trl, metrics_trl, tokens_trl, reads_trl = two_steps(trl_loss)
    assert reads_ours == [forward_reads] * 2, "plain DPO must read no float beyond the model's own forward"
    assert all(n >= forward_reads + 10 for n in reads_trl)

    # policy and reference differ, and the loss is far from saturated: its gradients are not vanishing
    assert 0.05 < loss_trl[0] < 0.7 * math.log(2) - 0.05
    assert loss_ours == pytest.approx(loss_trl, rel=1e-6)
    assert grads_ours.keys() == grads_trl.keys() and any("lora_A" in n for n in grads_ours)
    for name, grad in grads_ours.items():
        assert torch.allclose(grad, grads_trl[name], atol=1e-6, rtol=1e-5), name
    assert list(metrics_ours) == list(metrics_trl)  # the same names, logged in the same order
    for name, values in metrics_trl.items():
        assert [type(v) for v in metrics_ours[name]] == [type(v) for v in values], name
        assert metrics_ours[name] == pytest.approx(values, rel=1e-5, abs=1e-6), name
    assert tokens_ours == tokens_trl == 2 * int(batch["attention_mask"].sum())
    assert metrics_ours["num_tokens"] == [tokens_trl]


def test_under_deepspeed_the_collator_casts_the_pixels_as_the_step_would(tiny_models, sample_images, tmp_path):
    """Trainer casts float inputs to DeepSpeed's dtype in the step; the collators get that dtype and cast the pixels
    in the DataLoader's workers instead: the same tensors reach the model, and nothing else is cast."""
    from types import SimpleNamespace

    from capdpo.training.trainer import cast_pixels_in_workers

    pairs = _pairs(sample_images[5])
    trainer = _trainer(tiny_models["strong"], tmp_path, pairs, precompute_ref=True)
    collator = trainer.data_collator
    assert collator.pixel_dtype is None  # no DeepSpeed: nothing to cast
    examples = [pair_to_example(p) for p in pairs]
    plain = collator(examples)
    plugin = SimpleNamespace(hf_ds_config=SimpleNamespace(dtype=lambda: torch.bfloat16))
    deepspeed = SimpleNamespace(
        is_deepspeed_enabled=True, accelerator=SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin))
    )
    assert cast_pixels_in_workers(deepspeed, [collator, None]) is torch.bfloat16
    cast = collator(examples)
    assert plain["pixel_values"].dtype == torch.float32 and cast["pixel_values"].dtype == torch.bfloat16
    assert torch.equal(cast["pixel_values"], plain["pixel_values"].to(torch.bfloat16))  # the step's own cast
    assert plain.keys() == cast.keys()
    for key, value in plain.items():
        if key != "pixel_values":
            assert cast[key].dtype == value.dtype and torch.equal(cast[key], value), key
    assert cast_pixels_in_workers(SimpleNamespace(is_deepspeed_enabled=False), [collator]) is None


def test_every_trl_loss_type_and_mpo_weights_run_on_our_batches(tiny_models, sample_images, tmp_path) -> None:
    pairs = _pairs(sample_images[3])
    trainer = _trainer(tiny_models["strong"], tmp_path, pairs, precompute_ref=True, label_smoothing=0.1)
    _set_lora_b(trainer.model)
    batch = trainer._prepare_inputs(trainer.data_collator([pair_to_example(p) for p in pairs]))
    trainer.model.train()
    values = {}
    for loss_type in [*[[t] for t, loss in LOSSES.items() if loss.trl], ["sigmoid", "bco_pair", "sft"]]:
        trainer.loss_types = loss_type
        trainer.loss_weights = [0.8, 0.2, 1.0] if len(loss_type) == 3 else [1.0]
        with torch.no_grad():
            values["+".join(loss_type)] = trainer.compute_loss(trainer.model, batch).item()
    assert all(math.isfinite(v) for v in values.values()), values
    mpo = values["sigmoid+bco_pair+sft"]
    assert mpo == pytest.approx(0.8 * values["sigmoid"] + 0.2 * values["bco_pair"] + 1.0 * values["sft"], rel=1e-5)
    assert len({round(v, 6) for v in values.values()}) > 10  # the loss types really differ


def test_encoder_shortens_completions_and_refuses_cut_images(tiny_models, sample_images) -> None:
    from capdpo.models.loading import load_processor

    processor = load_processor(str(tiny_models["strong"]))
    pair = _pairs(sample_images[0])[0]
    full = PairEncoder(processor, 0).encode(pair)
    prompt_len = int(full.prompt["input_ids"].shape[1])
    limit = prompt_len + 3
    short = PairEncoder(processor, limit).encode(pair)
    assert short.truncated and len(short.chosen_ids) == 3 and short.chosen_ids == full.chosen_ids[:3]
    length = PairEncoder(processor, 0).prompt_length(pair)
    assert length.prompt == prompt_len and length.image_tokens > 0
    with pytest.raises(InputError, match=r"pair ctx: its prompt is \d+ tokens \(\d+ image tokens"):
        PairEncoder(processor, length.image_end - 1).encode(pair)


@pytest.mark.parametrize("family", ["strong", "qwen3vl", "llava"])
def test_a_frozen_vision_tower_records_no_graph_under_gradient_checkpointing(
    tiny_models, sample_images, tmp_path, family: str
) -> None:
    """Gradient checkpointing makes the vision patch embedding's output require grad; a frozen tower must still be
    run without autograd (nothing to recompute or back-propagate), with the same loss and LoRA gradients."""
    pairs = _pairs(sample_images[0])
    results = {}
    for name, settings in {
        "frozen": {"gradient_checkpointing": True},
        "plain": {"gradient_checkpointing": False},
        # the vision attention's fused `qkv` exists in both Qwen families' towers (their MLP names differ), `q_proj`
        # in LLaVA's
        "vision_lora": {"gradient_checkpointing": True, "lora_vision": True, "lora_targets": ["q_proj", "qkv"]},
    }.items():
        trainer = _trainer(
            tiny_models[family], tmp_path / name, pairs, precompute_ref=True, cache_image_features=False, **settings
        )
        _set_lora_b(trainer.model)
        visual = _vision_tower(trainer.model.get_base_model())
        recorded: list[bool] = []
        hook = visual.register_forward_hook(
            lambda module, args, out, seen=recorded: seen.append(
                (out.pooler_output if hasattr(out, "pooler_output") else out[0]).requires_grad
            )
        )
        results[name] = _loss_and_grads(trainer, pairs)
        hook.remove()
        assert recorded == [name == "vision_lora"], name
    (loss_frozen, grads_frozen), (loss_plain, grads_plain) = results["frozen"], results["plain"]
    assert loss_frozen == pytest.approx(loss_plain, abs=1e-5)
    tower = ("visual", "vision_tower")
    assert grads_frozen.keys() == grads_plain.keys() and not any(t in n for n in grads_frozen for t in tower)
    for name, grad in grads_frozen.items():
        assert torch.allclose(grad, grads_plain[name], atol=1e-5, rtol=1e-4), name
    assert any(t in n for n in results["vision_lora"][1] for t in tower)  # LoRA on the tower still learns


def test_per_step_lookups_are_done_once(monkeypatch):
    """The training step asks for the transformers model inside its wrappers and transformers asks for a FLOPs
    count in every step; both walk every module, so both are worked out once and give the library's answers."""
    import accelerate.utils
    from peft import LoraConfig, get_peft_model

    from capdpo.training.trainer import CapdpoDPOTrainer, hf_model

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj = torch.nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.q_proj(x)

    base = Net()
    wrapped = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"]))
    lookups = []
    extract = accelerate.utils.extract_model_from_parallel
    monkeypatch.setattr(accelerate.utils, "extract_model_from_parallel", lambda m: lookups.append(m) or extract(m))
    assert hf_model(wrapped) is base and hf_model(wrapped) is base and len(lookups) == 1

    class Model:
        main_input_name = "input_ids"
        counted = 0

        def num_parameters(self, exclude_embeddings: bool) -> int:
            assert exclude_embeddings
            Model.counted += 1
            return 1000

    trainer = CapdpoDPOTrainer.__new__(CapdpoDPOTrainer)
    trainer.model = Model()
    ids = torch.zeros(4, 25, dtype=torch.long)
    assert [trainer.floating_point_ops({"input_ids": ids}) for _ in range(3)] == [6 * 100 * 1000] * 3
    assert Model.counted == 1 and trainer.floating_point_ops({"pixel_values": ids}) == 0


def test_train_mode_is_set_once_and_still_restores_switched_modules(monkeypatch):
    """Trainer calls `model.train()` in every step, which sets the flag on every module; in the training step it
    returns at once while all modules train, and still switches back a module that was put in eval mode."""
    from capdpo.training.trainer import train_mode_kept

    model = torch.nn.Sequential(
        torch.nn.Linear(4, 4), torch.nn.Sequential(torch.nn.Dropout(0.1), torch.nn.Linear(4, 4))
    )
    model.train()
    calls = []
    library = torch.nn.Module.train
    monkeypatch.setattr(torch.nn.Module, "train", lambda self, mode=True: calls.append(mode) or library(self, mode))
    with train_mode_kept(model):
        assert model.train() is model and calls == []  # nothing to set: no walk
        model[1][0].eval()  # a module switched inside the step: the next call sets it again
        calls.clear()
        model.train()
        assert calls and all(m.training for m in model.modules())
        model.eval()  # eval is never skipped
        assert not any(m.training for m in model.modules())
    assert "train" not in vars(model)
    model[1].eval()
    calls.clear()
    with train_mode_kept(model):  # entered with a module in eval mode: the library's call
        model.train()
    assert calls and all(m.training for m in model.modules())
