"""The prompt-shared DPO step (`capdpo.training.packing`) against the two-row step: the packed layout and mask on
hand-made rows, then log-probs, loss, metrics and gradients equal in fp32 for Qwen2.5-VL, Qwen3-VL and LLaVA, right
and left padding, pairs over several images and prompts of several lengths."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from capdpo.records import PairRecord
from capdpo.training.data import pair_to_example
from capdpo.training.metrics import settle_metrics
from capdpo.training.packing import CHOSEN, PAD, PROMPT, REJECTED, block_mask, pack_pairs
from tests.training.test_dpo import _set_lora_b, _trainer


def test_pairs_pack_into_one_row_each_with_a_block_mask() -> None:
    # pair 0: prompt [5 6 7], chosen [1 2], rejected [3]; pair 1: prompt [8 9], chosen [4], rejected [2 2 2]
    # right padding, rows [chosen_0, chosen_1, rejected_0, rejected_1], pad id 0
    ids = torch.tensor([[5, 6, 7, 1, 2], [8, 9, 4, 0, 0], [5, 6, 7, 3, 0], [8, 9, 2, 2, 2]])
    mask = (ids != 0).long()
    completion = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 1, 1, 1]])
    labels = ids.masked_fill(completion == 0, -100)
    packed = pack_pairs(ids, mask, labels)
    assert packed is not None
    assert packed.input_ids.tolist() == [[5, 6, 7, 1, 2, 7, 3], [8, 9, 4, 9, 2, 2, 2]]
    assert packed.segment.tolist() == [
        [PROMPT, PROMPT, PROMPT, CHOSEN, CHOSEN, REJECTED, REJECTED],
        [PROMPT, PROMPT, CHOSEN, REJECTED, REJECTED, REJECTED, REJECTED],
    ]
    assert packed.labels.tolist() == [[-100, -100, -100, 1, 2, -100, 3], [-100, -100, 4, -100, 2, 2, 2]]
    allowed = block_mask(packed)[:, 0].long().tolist()
    assert allowed[0] == [
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0],
        [1, 1, 0, 0, 0, 1, 0],  # the repeated last prompt token stands in for it: not the original, no chosen
        [1, 1, 0, 0, 0, 1, 1],
    ]
    # every scored token's prediction maps to its place in the two-row layout ([4, 4] predictions)
    pairs = sorted(zip(packed.packed_at.tolist(), packed.plain_at.tolist()))
    assert pairs == [(2, 2), (3, 3), (5, 10), (7, 5), (9, 13), (10, 14), (11, 15)]


def test_pairs_with_different_prompts_or_padding_inside_stay_unpacked() -> None:
    ids = torch.tensor([[5, 6, 1], [5, 7, 3]])
    labels = torch.tensor([[-100, -100, 1], [-100, -100, 3]])
    assert pack_pairs(ids, torch.ones_like(ids), labels) is None  # prompts differ
    same = torch.tensor([[5, 6, 1], [5, 6, 3]])
    assert pack_pairs(same, torch.ones_like(same), torch.full_like(same, -100)) is None  # nothing scored
    gap = torch.tensor([[-100, 1, -100], [-100, 3, -100]])
    assert pack_pairs(same, torch.ones_like(same), gap) is None  # completion not at the end
    packed = pack_pairs(same, torch.ones_like(same), labels)
    assert packed is not None and (packed.segment == PAD).sum() == 0


def _reference_pack(ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> dict | None:
    """The packed layout token by token, from the module docstring's definition (None: not packable)."""
    pairs, length = ids.shape[0] // 2, ids.shape[1]
    layouts = []
    for i in range(pairs):
        parts = []
        for row in (i, pairs + i):
            cols = [c for c in range(length) if mask[row, c]]
            scored = [k for k, c in enumerate(cols) if labels[row, c] != -100]
            if not scored or scored[0] == 0 or scored != list(range(scored[0], len(cols))):
                return None  # no completion, no prompt, or a completion that is not the row's last real tokens
            parts.append((row, cols[: scored[0]], cols[scored[0] :]))
        (rc, prompt_c, chosen), (rr, prompt_r, rejected) = parts
        if ids[rc, prompt_c].tolist() != ids[rr, prompt_r].tolist():
            return None
        source = [(rc, c) for c in prompt_c + chosen] + [(rr, prompt_r[-1])] + [(rr, c) for c in rejected]
        segment = [PROMPT] * len(prompt_c) + [CHOSEN] * len(chosen) + [REJECTED] * (1 + len(rejected))
        layouts.append((source, segment, len(prompt_c)))
    width = max(len(source) for source, _, _ in layouts)
    out: dict[str, list] = {k: [] for k in ("ids", "segment", "row", "col", "labels", "packed_at", "plain_at")}
    out |= {"end": [], "repeat": []}
    for i, (source, segment, n_prompt) in enumerate(layouts):
        pad = width - len(source)
        out["ids"].append([int(ids[r, c]) for r, c in source] + [0] * pad)
        out["segment"].append(segment + [PAD] * pad)
        out["row"].append([r for r, _ in source] + [0] * pad)
        out["col"].append([c for _, c in source] + [0] * pad)
        out["end"].append(n_prompt - 1)
        out["repeat"].append(segment.index(REJECTED))
        out["labels"].append([-100] * width)
        for j, (r, c) in enumerate(source):
            if segment[j] == CHOSEN or (segment[j] == REJECTED and segment[j - 1] == REJECTED):
                out["labels"][-1][j] = int(ids[r, c])
                out["packed_at"].append(i * (width - 1) + j - 1)
                out["plain_at"].append(r * (length - 1) + c - 1)
    return out


def test_packing_equals_its_token_by_token_definition_on_random_batches() -> None:
    """Random pairs: left and right padding, padding inside a row, prompts that differ by a token, rows without a
    prompt or a completion, a completion with a gap, scored padding; packable and not."""
    gen = torch.Generator().manual_seed(0)

    def randint(low: int, high: int) -> int:
        return int(torch.randint(low, high + 1, (), generator=gen))

    def chance(p: float) -> bool:
        return float(torch.rand((), generator=gen)) < p

    packed_count = 0
    for _ in range(400):
        pairs, length = randint(1, 4), randint(4, 14)
        ids = torch.zeros(2 * pairs, length, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for i in range(pairs):
            prompt = [randint(1, 5) for _ in range(randint(0 if chance(0.05) else 1, length - 2))]
            for row in (i, pairs + i):
                tokens = list(prompt)
                if tokens and chance(0.1):
                    tokens[randint(0, len(tokens) - 1)] += 1
                n_prompt = len(tokens)
                tokens += [randint(1, 5) for _ in range(randint(0 if chance(0.05) else 1, length - 1 - n_prompt))]
                real = [True] * len(tokens)
                flags = [k >= n_prompt for k in range(len(tokens))]
                if len(tokens) > 1 and chance(0.05):
                    k = randint(0, len(tokens) - 1)
                    flags[k] = not flags[k]
                if len(tokens) < length and chance(0.1):  # padding inside the row
                    k = randint(1, len(tokens))
                    tokens, real, flags = (
                        tokens[:k] + [0] + tokens[k:],
                        real[:k] + [False] + real[k:],
                        flags[:k] + [False] + flags[k:],
                    )
                offset = length - len(tokens) if chance(0.5) else 0
                for k, (token, is_real, flag) in enumerate(zip(tokens, real, flags, strict=True)):
                    ids[row, offset + k] = token
                    mask[row, offset + k] = int(is_real)
                    labels[row, offset + k] = token if flag else -100
                if chance(0.05):
                    labels[row][mask[row] == 0] = 3  # labels on padding are not scored
        mm = torch.randint(0, 3, ids.shape, generator=gen)
        expected = _reference_pack(ids, mask, labels)
        packed = pack_pairs(ids, mask, labels, {"mm_token_type_ids": mm})
        assert (packed is None) == (expected is None), (ids, mask, labels)
        if packed is None:
            continue
        packed_count += 1
        assert packed.input_ids.tolist() == expected["ids"]
        assert packed.segment.tolist() == expected["segment"]
        assert packed.source[0].tolist() == expected["row"] and packed.source[1].tolist() == expected["col"]
        assert packed.packed_at.tolist() == expected["packed_at"] and packed.plain_at.tolist() == expected["plain_at"]
        assert packed.prompt_end.tolist() == expected["end"] and packed.repeat_at.tolist() == expected["repeat"]
        assert packed.labels.tolist() == expected["labels"]
        src_row, src_col = packed.source
        pad = packed.segment == PAD
        assert torch.equal(packed.sequence["mm_token_type_ids"], mm[src_row, src_col].masked_fill(pad, 0))
    assert 100 < packed_count < 350, packed_count  # both kinds were drawn often


def _pairs(images: list[Path]) -> list[PairRecord]:
    """Three pairs over two images, with prompts of three lengths (the third has an assistant prefix)."""

    def pair(i: int, image: Path, prompt: str, chosen: str, rejected: str, prefix: str = "") -> PairRecord:
        return PairRecord(
            id=f"p{i}",
            image_id=image.stem,
            image=str(image),
            prompt=prompt,
            chosen=chosen,
            rejected=rejected,
            score_chosen=0.9,
            score_rejected=0.2,
            mode="sentence" if prefix else "context",
            assistant_prefix=prefix,
        )

    return [
        pair(0, images[0], "Describe this image.", "A red circle on a white wall.", "A dog."),
        pair(1, images[1], "Describe this image in great detail, please.", "Green.", "A green ring on grey paper."),
        pair(2, images[0], "Describe this image.", "It is red.", "It is a large blue bus.", "There is a circle."),
    ]


def _left_padded(batch: dict) -> dict:
    """The same rows with their padding moved to the left."""
    out = dict(batch)
    real = batch["attention_mask"].bool()
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "completion_mask"):
        if key not in batch:
            continue
        value = batch[key]
        rows = []
        for row, keep in zip(value, real):
            kept = row[keep]
            fill = row[~keep]
            rows.append(torch.cat([fill, kept]))
        out[key] = torch.stack(rows)
    return out


def _step(trainer, batch: dict, share_prompt: bool) -> tuple[float, dict, dict, torch.Tensor]:
    trainer.share_prompt = share_prompt
    trainer.model.train()
    trainer.model.zero_grad()
    trainer._metrics["train"].clear()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    settle_metrics(trainer._metrics)  # plain DPO keeps its metrics on the device until it logs
    metrics = {k: v[0] for k, v in trainer._metrics["train"].items() if k != "num_tokens"}
    with torch.no_grad():
        _, _, per_token, _ = trainer.completion_logps(trainer.model, trainer._model_inputs(trainer.model, batch))
    return loss.item(), grads, metrics, per_token


@pytest.mark.parametrize("family", ["strong", "qwen3vl", "llava"])
def test_the_prompt_shared_step_equals_the_two_row_step(tiny_models, sample_images, tmp_path, family: str) -> None:
    pairs = _pairs(sample_images[:2])
    trainer = _trainer(tiny_models[family], tmp_path, pairs, precompute_ref=True)
    assert trainer.share_prompt
    _set_lora_b(trainer.model)  # policy != reference, so the loss and its gradients mean something
    language_model = trainer.model.get_base_model().model.language_model
    right = trainer._prepare_inputs(trainer.data_collator([pair_to_example(p) for p in pairs]))
    attentions = ["sdpa", "eager"] if family == "strong" else ["sdpa"]
    for attention in attentions:
        trainer.model.get_base_model().set_attn_implementation(attention)
        for batch in (right, _left_padded(right)):
            rows: list[int] = []
            hook = language_model.register_forward_hook(
                lambda m, a, k, o, rows=rows: rows.append(k["inputs_embeds"].shape[0]), with_kwargs=True
            )
            loss_two, grads_two, metrics_two, logps_two = _step(trainer, batch, share_prompt=False)
            loss_one, grads_one, metrics_one, logps_one = _step(trainer, batch, share_prompt=True)
            hook.remove()
            assert rows == [2 * len(pairs)] * 2 + [len(pairs)] * 2, "the packed step must run one row per pair"
            assert abs(loss_two - 0.6931) > 1e-3
            assert loss_one == pytest.approx(loss_two, abs=1e-4)
            assert torch.allclose(logps_one, logps_two, atol=1e-4)
            assert metrics_one.keys() == metrics_two.keys()
            for name, value in metrics_two.items():
                assert metrics_one[name] == pytest.approx(value, abs=1e-4), name
            assert grads_one.keys() == grads_two.keys() and any("lora_A" in n for n in grads_one)
            for name, grad in grads_two.items():
                assert torch.allclose(grads_one[name], grad, atol=1e-4, rtol=1e-4), (attention, name)


def test_share_prompt_off_keeps_two_rows(tiny_models, sample_images, tmp_path) -> None:
    pairs = _pairs(sample_images[:2])[:1]
    trainer = _trainer(tiny_models["strong"], tmp_path, pairs, precompute_ref=True, share_prompt=False)
    assert not trainer.share_prompt
    rows: list[int] = []
    language_model = trainer.model.get_base_model().model.language_model
    hook = language_model.register_forward_hook(
        lambda m, a, k, o: rows.append(k["inputs_embeds"].shape[0]), with_kwargs=True
    )
    trainer.compute_loss(trainer.model, trainer._prepare_inputs(trainer.data_collator([pair_to_example(pairs[0])])))
    hook.remove()
    assert rows == [2]
